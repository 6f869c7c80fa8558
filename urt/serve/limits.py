"""Per-request limits of `urt serve`: defaults sized for what a judge is asked (a pair of images, a pair of
short videos, one chain-of-thought verdict) and no more, so that one request cannot take the server's memory
or time. Each refusal names the limit, its value and the flag that sets it."""

from __future__ import annotations

from dataclasses import dataclass, fields

from urt.errors import UrtError

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_images: int = 16  # image_url parts per request: a video pair sent as 8 frames each (official scripts)
    max_videos: int = 2  # video_url parts per request: a pair
    max_pixels: int = 2 ** 24  # decoded pixels of all images and kept video frames together (two 2048x2048 images)
    max_video_frames: int = 900  # frames in one video file (30 s at 30 fps), counted before any frame is decoded
    video_frames: int = 8  # frames kept per video, uniformly spaced (the official UnifiedReward sampling)
    max_media_bytes: int = 32 * MiB  # one media file or data URL payload, checked before decoding
    max_body_bytes: int = 64 * MiB  # one request body
    max_prompt_tokens: int | None = None  # None: the model's context (max_position_embeddings)
    max_n: int = 8  # completions per request
    max_tokens: int = 4096  # max_tokens a request may ask for
    max_concurrent_per_key: int = 32  # requests in flight per API key (per client address without keys)
    # seconds from a request's arrival in the queue to its answer: past it, its generation is stopped and it
    # gets a 504, so one long request cannot hold the worker (a 7B judge writes ~1k tokens in well under this)
    max_request_seconds: int = 600
    max_candidates: int = 16  # candidates in one /v1/rewards group (N(N-1) verdicts in both orders)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "max_prompt_tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UrtError(f"serve limit {f.name} ({self.flag(f.name)}) must be a positive integer, got {v!r}")

    def flag(self, name: str) -> str:
        """The `urt serve` option that sets limit `name`."""
        return "--max-tokens-limit" if name == "max_tokens" else "--" + name.replace("_", "-")

    def refuse(self, name: str, what: str, *, status: int = 400, param: str | None = None,
               code: str = "limit_exceeded"):
        """The RequestError for a request over limit `name`; `what` says what the request has ("'n' is 9")."""
        from urt.serve.errors import RequestError

        return RequestError(f"{what}, over this server's limit {name}={getattr(self, name)} ({self.flag(name)})",
                            status=status, param=param, code=code)
