"""`urt serve`: the command that loads a judge and runs `JudgeServer` until Ctrl-C."""

from __future__ import annotations

import argparse
import sys

from urt.serve.limits import Limits


def _cmd_serve(args: argparse.Namespace) -> int:
    from urt.errors import UrtError
    from urt.serve.auth import ENV_VAR, collect_keys, exposure_problem
    from urt.serve.media import media_roots

    # Everything the operator got wrong fails here, before the model takes minutes to load.
    keys = collect_keys(args.api_key or (), args.api_key_file or ())
    roots = media_roots(args.media_root or ())
    from urt.models.preprocessing import exported_frames

    # frames per video: as the model was trained (its folder's urt.json) unless given
    video_frames = args.video_frames if args.video_frames is not None else exported_frames(args.model,
                                                                                          Limits().video_frames)
    limits = Limits(max_images=args.max_images, max_videos=args.max_videos, max_pixels=args.max_pixels,
                    max_video_frames=args.max_video_frames, video_frames=video_frames,
                    max_media_bytes=args.max_media_bytes, max_body_bytes=args.max_body_bytes,
                    max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n, max_tokens=args.max_tokens_limit,
                    max_candidates=args.max_candidates,
                    max_concurrent_per_key=args.max_concurrent_per_key,
                    max_request_seconds=args.max_request_seconds)
    if args.max_new_tokens > limits.max_tokens:
        raise UrtError(f"--max-new-tokens {args.max_new_tokens} is over --max-tokens-limit {limits.max_tokens}")
    problem = exposure_problem(args.host, bool(keys))
    if problem and args.require_key:
        raise UrtError(f"{problem}; --require-key forbids serving it without one")
    if problem:
        print(f"urt serve: WARNING: {problem}", file=sys.stderr, flush=True)

    from urt.models import load_model
    from urt.serve.server import JudgeServer

    bundle = load_model(args.model, args.family, dtype=args.dtype, device=args.device)
    server = JudgeServer(bundle, host=args.host, port=args.port, model_name=args.served_model_name or args.model,
                         max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         max_new_tokens=args.max_new_tokens, limits=limits, api_keys=keys,
                         require_key=args.require_key, media_roots=roots)
    url = server.start()
    auth = f"{len(keys)} API key(s)" if keys else f"no API key (set one with --api-key-file or ${ENV_VAR})"
    media = ", ".join(map(str, roots)) if roots else "none (data URLs only)"
    print(f"urt serve: {server.model_name} ({bundle.family}) at {url}/v1  (Ctrl-C to stop)\n"
          f"urt serve: {auth}; media roots: {media}; prompt limit {server.limits.max_prompt_tokens} tokens; "
          f"time limit {server.request_timeout_s:g} s per request; {server.limits.video_frames} frames per video",
          flush=True)
    server.serve_forever()  # until Ctrl-C, then shuts down
    print("urt serve: stopped", flush=True)
    return 0


def register(subparsers) -> None:
    from urt.models.families import FAMILIES

    d = Limits()
    p = subparsers.add_parser("serve", help="OpenAI-compatible chat-completions server for a judge model",
                              description="OpenAI-compatible chat-completions server for a judge model. "
                                          "Running it on a cluster node: see docs/serve.md.")
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, or 'tiny' (needs --family)")
    p.add_argument("--family", choices=list(FAMILIES), default=None)
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="prompts per generate() call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the oldest queued request waits for companions")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="default max_tokens for requests")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")

    a = p.add_argument_group("authentication", "every endpoint but /health needs 'Authorization: Bearer <key>' "
                             "once a key is set; keys are also read from $URT_API_KEY (comma-separated)")
    a.add_argument("--api-key", action="append", metavar="KEY",
                   help="an accepted key (repeatable); visible in process listings: prefer --api-key-file")
    a.add_argument("--api-key-file", action="append", metavar="FILE",
                   help="file of accepted keys, one per line, blank lines and # comments ignored (repeatable)")
    a.add_argument("--require-key", action="store_true",
                   help="refuse to start on a non-loopback --host without a key (default: warn)")

    m = p.add_argument_group("media", "image_url / video_url parts: base64 data URLs, or paths under a media root")
    m.add_argument("--media-root", action="append", metavar="DIR",
                   help="directory that file:///... and /abs/path inputs may be read from (repeatable; "
                        "default: none, path inputs refused)")

    lim = p.add_argument_group("per-request limits", "over a limit: 400 (counts) or 413 (sizes), naming it")
    lim.add_argument("--max-images", type=int, default=d.max_images,
                     help="image_url parts per request (400; default %(default)s)")
    lim.add_argument("--max-videos", type=int, default=d.max_videos,
                     help="video_url parts per request (400; default %(default)s)")
    lim.add_argument("--max-pixels", type=int, default=d.max_pixels,
                     help="decoded pixels of a request's images and kept video frames (413; default %(default)s)")
    lim.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                     help="frames in one video, counted before decoding (413; default %(default)s)")
    lim.add_argument("--video-frames", type=int, default=None,
                     help=f"frames kept per video, uniformly spaced (default: as the model was trained, from its "
                          f"folder's urt.json, else {d.video_frames})")
    lim.add_argument("--max-media-bytes", type=int, default=d.max_media_bytes,
                     help="bytes of one media file or data URL payload (413; default %(default)s)")
    lim.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                     help="bytes of a request body (413; default %(default)s)")
    lim.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="prompt tokens, images included (400; default: the model's max_position_embeddings)")
    lim.add_argument("--max-candidates", type=int, default=d.max_candidates,
                     help="candidates in one /v1/rewards group (400; default %(default)s)")
    lim.add_argument("--max-n", type=int, default=d.max_n,
                     help="completions per request, 'n' (400; default %(default)s)")
    lim.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                     help="largest max_tokens a request may ask for (400; default %(default)s)")
    lim.add_argument("--max-concurrent-per-key", type=int, default=d.max_concurrent_per_key,
                     help="chat requests in flight per API key, or per client address without keys "
                          "(429; default %(default)s)")
    lim.add_argument("--max-request-seconds", type=int, default=d.max_request_seconds,
                     help="seconds a request may take, queue included: past it its generation is stopped and it "
                          "gets a 504 (default %(default)s); a client that disconnects has its generation stopped "
                          "at once")
    p.set_defaults(func=_cmd_serve)
