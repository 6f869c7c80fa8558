"""`urt serve`: the command that loads a judge and runs `JudgeServer` until Ctrl-C."""

from __future__ import annotations

import argparse


def _cmd_serve(args: argparse.Namespace) -> int:
    from urt.models import load_model
    from urt.serve.server import JudgeServer

    bundle = load_model(args.model, args.family, dtype=args.dtype, device=args.device)
    server = JudgeServer(bundle, host=args.host, port=args.port, model_name=args.served_model_name or args.model,
                         max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
    url = server.start()
    print(f"urt serve: {server.model_name} ({bundle.family}) at {url}/v1  (Ctrl-C to stop)", flush=True)
    server.serve_forever()  # until Ctrl-C, then shuts down
    print("urt serve: stopped", flush=True)
    return 0


def register(subparsers) -> None:
    from urt.models.families import FAMILIES

    p = subparsers.add_parser("serve", help="OpenAI-compatible chat-completions server for a judge model")
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, or 'tiny' (needs --family)")
    p.add_argument("--family", choices=list(FAMILIES), default=None)
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="prompts per generate() call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the oldest queued request waits for companions")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="default max_tokens for requests")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="refuse longer prompts (400)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_serve)
