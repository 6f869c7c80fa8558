"""`urt serve`: an OpenAI-compatible chat-completions server for a judge model (standard library only).

The official UnifiedReward inference scripts talk to a vLLM server through the `openai` client: a chat
request whose user message carries the visuals as `image_url` parts (base64 `data:` URLs; a video is
sent as several frame images) followed by the prompt text. `JudgeServer` answers the same requests with
urt's own batched `urt.generation.generate`, so a trained checkpoint can be queried exactly as the
released models are.

* `urt.serve.request`: chat messages -> a prompt-mode `Encoded`, and the sampling fields;
* `urt.serve.media`: image / video URLs (data URLs; paths under `--media-root`) -> decoded visuals;
* `urt.serve.limits`: the per-request limits (`Limits`) and their refusals;
* `urt.serve.auth`: API keys (`Authorization: Bearer`), per-key concurrency, the exposure check;
* `urt.serve.batching`: the worker that batches queued requests into `generate()` calls;
* `urt.serve.server`: `JudgeServer`, the endpoints and the HTTP handler;
* `urt.serve.cli`: the `urt serve` command.

docs/serve.md is the operator's guide: running it on a cluster node safely.
"""

from urt.lazy import lazy_exports

# Resolved on first use: `urt --help` registers `urt.serve.cli` without importing the server.
__getattr__, __all__ = lazy_exports(__name__, {
    "urt.serve.errors": ("RequestError",),
    "urt.serve.request": ("SamplingParams", "encode_messages", "parse_messages", "parse_sampling"),
    "urt.serve.media": ("MediaReader",),
    "urt.serve.limits": ("Limits",),
    "urt.serve.auth": ("KeyRing", "collect_keys", "read_key_file"),
    "urt.serve.batching": ("Batcher",),
    "urt.serve.server": ("JudgeServer",),
    "urt.serve.cli": ("register",),
})
