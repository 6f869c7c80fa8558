"""`urt serve`: an OpenAI-compatible chat-completions server for a judge model (standard library only).

The official UnifiedReward inference scripts talk to a vLLM server through the `openai` client: a chat
request whose user message carries the visuals as `image_url` parts (base64 `data:` URLs; a video is
sent as several frame images) followed by the prompt text. `JudgeServer` answers the same requests with
urt's own batched `urt.generation.generate`, so a trained checkpoint can be queried exactly as the
released models are:

* `POST /v1/chat/completions`: fields `model`, `messages`, `max_tokens` / `max_completion_tokens`,
  `temperature`, `top_p`, `n`, `seed`; the response follows the OpenAI schema (`choices[i].message.
  content`, `finish_reason` "stop" | "length", `usage`). `stream=true` is refused (400).
* `GET /v1/models` (the served model id), `GET /health` -> `{"status": "ok"}`.

Requests are turned into model inputs on the HTTP thread (so a bad request fails fast with a 4xx and
never reaches the model), then queued; one worker thread groups queued requests with the same sampling
parameters into one `generate()` call of up to `max_batch_size` prompts, waiting at most
`batch_wait_ms` after the oldest request for companions. Errors are JSON
`{"error": {"message", "type", "param", "code"}}`; a failing batch is retried one request at a time so
only the culprit gets the 500, and the server keeps serving.

Request -> model input (`encode_messages`): OpenAI messages (roles system / developer / user /
assistant; content a string or a list of `{"type": "text"}` and `{"type": "image_url"}` parts, images
only in user turns, only `data:image/...;base64,` URLs: nothing is fetched) become

* Qwen families: chat messages with `{"type": "image"}` items and text items in the order given, run
  through the processor's own chat template (no system message added, as `urt.prompts.render_chat`);
* llava_onevision: LLaVA's `qwen_1_5` ChatML, rendered here with the constants of `urt.prompts.render`
  (system turn "You are a helpful assistant." unless the request has one; per user turn the image tokens
  first, `<image>\\n <image>\\n` for exactly two images, else `<image>\\n` per image/frame, then the
  text), images passed to the processor as one nested list (one multi-image prompt).

The result is a prompt-mode `urt.data.encode.Encoded` (all labels -100, `meta["assistant_prefix"]` the
text the chat template opened the assistant turn with, e.g. Qwen3.5's `<think>\\n`), so `generate()`
batches it like any dataset prompt. Completions are returned as `generate()` gives them: the assistant
prefix prepended, i.e. exactly the text urt's parser reads. `usage.completion_tokens` and
`finish_reason` come from the generated token ids (stop token included in the count).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from urt.errors import UrtError

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
MAX_N = 16
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
# Request fields we cannot honour: refusing them beats silently ignoring them.
_UNSUPPORTED = {
    "stream": "streaming is not supported; send stream=false (or leave it out)",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "logprobs": "logprobs are not supported",
    "stop": "custom stop sequences are not supported (generation stops at <|im_end|> / eos)",
}


class RequestError(UrtError):
    """A client error: answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------- requests


def decode_data_url(url: Any, *, where: str = "image_url"):
    """A `data:image/...;base64,...` URL -> RGB PIL image; anything else -> RequestError (400)."""
    from urt.data.schema import load_image

    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: the image url must be a non-empty string", param=where)
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "file:", "ftp://")):
        raise RequestError(
            f"{where}: only base64 data URLs (data:image/png;base64,...) are accepted; this server fetches "
            f"nothing from the network or disk (got {url[:40]!r}...)", param=where, code="unsupported_image_url")
    m = _DATA_URL.match(url)
    if m is None:
        raise RequestError(f"{where}: not a data URL (expected data:image/<type>;base64,<data>)", param=where)
    mime = m.group("mime").strip().lower()
    params = [p.strip().lower() for p in m.group("params").split(";") if p.strip()]
    if mime and not mime.startswith("image/"):
        raise RequestError(f"{where}: data URL media type {mime!r} is not an image", param=where)
    if "base64" not in params:
        raise RequestError(f"{where}: the data URL must be base64-encoded (data:image/png;base64,...)", param=where)
    data = re.sub(r"\s+", "", m.group("data"))
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{where}: invalid base64 image data ({err})", param=where,
                           code="invalid_image") from None
    if not raw:
        raise RequestError(f"{where}: empty image data", param=where, code="invalid_image")
    try:
        return load_image(raw, where=where)
    except UrtError as err:
        raise RequestError(str(err), param=where, code="invalid_image") from None


@dataclass
class _Turn:
    role: str
    parts: list  # ("text", str) | ("image", PIL.Image)


def parse_messages(messages: Any, *, max_images: int = 64) -> list[_Turn]:
    """Validate OpenAI chat messages and decode their images."""
    if messages is None:
        raise RequestError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    turns: list[_Turn] = []
    n_images = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)}",
                               param=f"{where}.role")
        role = "system" if role == "developer" else role
        content = msg.get("content")
        parts: list = []
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            parts.append(("text", content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise RequestError(f"{pw} must be an object with a 'type'", param=pw)
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise RequestError(f"{pw}.text must be a string", param=pw)
                    parts.append(("text", text))
                elif kind == "image_url":
                    if role != "user":
                        raise RequestError(f"{pw}: images are only accepted in user messages", param=pw)
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    n_images += 1
                    if n_images > max_images:
                        raise RequestError(f"too many images in one request (limit {max_images})", param=pw)
                    parts.append(("image", decode_data_url(url, where=f"{pw}.image_url")))
                else:
                    raise RequestError(
                        f"{pw}: content part type {kind!r} is not supported; use 'text' or 'image_url' "
                        f"(send video frames as several image_url parts)", param=pw)
        else:
            raise RequestError(f"{where}.content must be a string or a list of content parts",
                               param=f"{where}.content")
        turns.append(_Turn(role, parts))
    return turns


def _text_of(parts: list) -> str:
    return "\n".join(p for k, p in parts if k == "text")


def _llava_prompt(turns: list[_Turn]) -> tuple[str, list]:
    from urt.prompts.render import IM_END, IM_START, LLAVA_IMAGE, LLAVA_IMAGE_PAIR, LLAVA_SYSTEM

    images: list = []
    text = ""
    if not turns or turns[0].role != "system":
        text += f"{IM_START}system\n{LLAVA_SYSTEM}{IM_END}\n"
    for t in turns:
        imgs = [p for k, p in t.parts if k == "image"]
        tokens = LLAVA_IMAGE_PAIR if len(imgs) == 2 else LLAVA_IMAGE * len(imgs)
        images += imgs
        text += f"{IM_START}{t.role}\n{tokens}{_text_of(t.parts)}{IM_END}\n"
    return text + f"{IM_START}assistant\n", images


def _qwen_messages(turns: list[_Turn]) -> tuple[list, list]:
    messages: list = []
    images: list = []
    for t in turns:
        items = []
        for kind, p in t.parts:
            if kind == "image":
                images.append(p)
                items.append({"type": "image"})
            else:
                items.append({"type": "text", "text": p})
        messages.append({"role": t.role, "content": items})
    return messages, images


def encode_messages(bundle, messages: Any, *, key: str = "request", max_images: int = 64,
                    max_prompt_tokens: int | None = None):
    """OpenAI chat messages -> a prompt-mode `Encoded` for `bundle` (see the module docstring).
    Raises RequestError (400) for anything the client got wrong."""
    import torch

    from urt.data.encode import IGNORE_INDEX, Encoded
    from urt.prompts.render import _assistant_prefix

    turns = parse_messages(messages, max_images=max_images)
    family = bundle.family
    processor = bundle.processor
    kw: dict[str, Any] = {}
    if family == "llava_onevision":
        text, images = _llava_prompt(turns)
        if images:
            kw["images"] = [images]
        prefix = ""
    else:
        msgs, images = _qwen_messages(turns)
        try:
            text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - jinja raises TemplateError etc. for odd conversations
            raise RequestError(f"the {family} chat template rejected these messages "
                               f"({type(err).__name__}: {err})", param="messages") from None
        if images:
            kw["images"] = images
        prefix = _assistant_prefix(text)
    try:
        out = processor(text=[text], return_tensors="pt", **kw)
    except Exception as err:  # noqa: BLE001 - processors raise many types on unusual images
        raise RequestError(f"the {family} processor could not encode this request "
                           f"({type(err).__name__}: {err})", param="messages") from None
    input_ids = out["input_ids"][0].long()
    if max_prompt_tokens is not None and len(input_ids) > max_prompt_tokens:
        raise RequestError(f"the prompt is {len(input_ids)} tokens (images included), more than this server's "
                           f"limit of {max_prompt_tokens}", param="messages", code="context_length_exceeded")
    mm = out.get("mm_token_type_ids")
    mm = mm[0].long() if mm is not None else None
    if mm is None and family in QWEN_FAMILIES:
        mm = torch.zeros_like(input_ids)  # keep every Qwen prompt batchable with every other
    visual = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in out.items()
              if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}
    return Encoded(key=key, task="chat", label="", input_ids=input_ids,
                   labels=torch.full_like(input_ids, IGNORE_INDEX), visual=visual, mm_token_type_ids=mm,
                   prompt_length=int(input_ids.shape[0]),
                   meta={"assistant_prefix": prefix, "mode": "prompt", "n_images": len(images)})


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None

    def group_key(self) -> tuple:
        # Greedy decoding ignores top_p and the seed: all greedy requests of a length batch together.
        if self.temperature == 0.0:
            return (self.max_tokens, 0.0, 1.0, self.n, None)
        return (self.max_tokens, self.temperature, self.top_p, self.n, self.seed)


def _number(body: dict, name: str, default, *, kind=float, lo=None, hi=None, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                           param=name)
    value = kind(value)
    if value != value or (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise RequestError(f"'{name}' must be in {rng}, got {value!r}", param=name)
    return value


def parse_sampling(body: dict, *, default_max_tokens: int, max_tokens_limit: int, default_temperature: float,
                   default_top_p: float, default_seed: int | None) -> SamplingParams:
    for name, why in _UNSUPPORTED.items():
        v = body.get(name)
        if v not in (None, False, [], ""):
            raise RequestError(f"'{name}': {why}", param=name, code="unsupported_parameter")
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _number(body, name, default_max_tokens, kind=int, lo=1, hi=max_tokens_limit)
    return SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(_number(body, "temperature", default_temperature, lo=0.0, hi=2.0)),
        top_p=float(_number(body, "top_p", default_top_p, lo=0.0, hi=1.0, lo_open=True)),
        n=int(_number(body, "n", 1, kind=int, lo=1, hi=MAX_N)),
        seed=_number(body, "seed", default_seed, kind=int, lo=-(2 ** 63), hi=2 ** 64 - 1),
    )


# ---------------------------------------------------------------------------------------- worker


@dataclass
class _Job:
    encoded: Any
    params: SamplingParams
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    texts: list | None = None
    tokens: list | None = None  # per completion: (completion_tokens, finish_reason)
    error: BaseException | None = None


class _RecordingModel:
    """Delegates to the real model; remembers each generate() call's new token rows so the server can
    report exact completion token counts and finish reasons (generate() itself returns only text)."""

    def __init__(self, model):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "records", [])

    def generate(self, *args, **kwargs):
        import torch

        out = self._model.generate(*args, **kwargs)
        if not isinstance(out, torch.Tensor):  # urt.generation's shared prefill (a dict with the cache): no rows
            return out
        ids = kwargs.get("input_ids", args[0] if args else None)
        width = int(ids.shape[1]) if isinstance(ids, torch.Tensor) else 0
        self.records.append(out[:, width:].tolist())
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)


class JudgeServer:
    """OpenAI-compatible chat server around a loaded `ModelBundle` (see the module docstring).

    `start()` runs it on background threads and returns the base URL (`http://host:port`); `shutdown()`
    stops it; also a context manager. `stats()` reports requests served and the batch sizes the worker
    ran. `max_new_tokens`, `temperature`, `top_p`, `seed` are the defaults for requests that leave them
    out; `max_tokens_limit` caps what a request may ask for."""

    def __init__(self, bundle, *, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                 max_batch_size: int = 8, batch_wait_ms: float = 10, max_new_tokens: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 max_tokens_limit: int | None = None, max_prompt_tokens: int | None = None, max_images: int = 64,
                 max_queue: int = 1024, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout_s: float = 3600.0, generate_fn: Callable | None = None):
        if isinstance(max_batch_size, bool) or int(max_batch_size) < 1:
            raise UrtError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1:
            raise UrtError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if float(batch_wait_ms) < 0:
            raise UrtError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
        self.bundle = bundle
        self.host = host
        self.port = int(port)
        self.model_name = model_name or self._default_name(bundle)
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.max_tokens_limit = int(max_tokens_limit or max(self.max_new_tokens, 32768))
        self.max_prompt_tokens = max_prompt_tokens
        self.max_images = int(max_images)
        self.max_queue = int(max_queue)
        self.max_body_bytes = int(max_body_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self._generate_fn = generate_fn
        self._recorder = _RecordingModel(bundle.model)
        from urt.models.loading import ModelBundle

        self._gen_bundle = ModelBundle(model=self._recorder, processor=bundle.processor, family=bundle.family)
        self._stops: list[int] | None = None
        self._encode_lock = threading.Lock()  # processor / tokenizer calls from HTTP threads
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._stopping = False
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stats_lock = threading.Lock()
        self._batch_sizes: deque[int] = deque(maxlen=100_000)
        self._counts = {"requests": 0, "completed": 0, "client_errors": 0, "server_errors": 0, "batches": 0}
        self.created = int(time.time())

    @staticmethod
    def _default_name(bundle) -> str:
        name = getattr(getattr(bundle.model, "config", None), "_name_or_path", "") or ""
        return str(name) or f"urt-{bundle.family}"

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise UrtError("the server is not started")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self._httpd.server_address[1]}"

    def start(self) -> str:
        if self._httpd is not None:
            return self.url
        handler = type("_BoundHandler", (_Handler,), {"judge": self})
        try:
            self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as err:
            raise UrtError(f"cannot listen on {self.host}:{self.port}: {err}") from None
        self._httpd.daemon_threads = True
        self._stopping = False
        worker = threading.Thread(target=self._worker, name="urt-serve-worker", daemon=True)
        httpd_thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                name="urt-serve-http", daemon=True)
        self._threads = [worker, httpd_thread]
        for t in self._threads:
            t.start()
        return self.url

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._httpd is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout)
        with self._cond:
            left = list(self._pending)
            self._pending.clear()
        for job in left:
            job.error = RequestError("the server is shutting down", status=503, type="server_error")
            job.done.set()
        self._httpd = None
        self._threads = []

    def __enter__(self) -> "JudgeServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def serve_forever(self) -> None:
        """start() and block until KeyboardInterrupt, then shut down."""
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def stats(self) -> dict:
        with self._stats_lock:
            sizes = list(self._batch_sizes)
            out = dict(self._counts)
        out["batch_sizes"] = sizes
        out["max_batch_size_seen"] = max(sizes, default=0)
        out["mean_batch_size"] = (sum(sizes) / len(sizes)) if sizes else 0.0
        with self._cond:
            out["queued"] = len(self._pending)
        return out

    def _count(self, name: str, k: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += k

    # ------------------------------------------------------------------------------ worker

    def _take_batch(self) -> list[_Job] | None:
        """Block until a batch is ready: the oldest job plus queued jobs with its sampling params, up to
        max_batch_size, waiting at most batch_wait_s after the oldest arrived. None when stopping."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait(0.5)
            if self._stopping:
                return None
            first = self._pending[0]
            key = first.params.group_key()
            deadline = first.enqueued + self.batch_wait_s
            while not self._stopping:
                same = sum(1 for j in self._pending if j.params.group_key() == key)
                left = deadline - time.monotonic()
                if same >= self.max_batch_size or left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                return None
            batch: list[_Job] = []
            rest: deque[_Job] = deque()
            for j in self._pending:
                if len(batch) < self.max_batch_size and j.params.group_key() == key:
                    batch.append(j)
                else:
                    rest.append(j)
            self._pending = rest
            return batch

    def _worker(self) -> None:
        while True:
            try:
                batch = self._take_batch()
            except Exception:  # noqa: BLE001 - never let the worker die
                log.exception("urt serve: batching failed")
                continue
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            self._generate(batch)
            with self._stats_lock:
                self._batch_sizes.append(len(batch))
                self._counts["batches"] += 1
        except Exception as err:  # noqa: BLE001 - a failure answers the requests, not the process
            if len(batch) > 1:  # find the culprit: the others still get their answers
                for job in batch:
                    self._run([job])
                return
            log.warning("urt serve: generation failed: %s: %s", type(err).__name__, err)
            batch[0].error = err
        for job in batch:
            job.done.set()

    def _generate(self, batch: list[_Job]) -> None:
        from urt.generation import GenerationConfig, stop_token_ids

        gen = self._generate_fn
        if gen is None:
            from urt.generation import generate as gen
        p = batch[0].params
        if p.seed is not None:
            seed = p.seed
        elif p.temperature == 0 or self.seed is not None:
            seed = self.seed or 0  # greedy ignores it; a server-wide seed makes sampling reproducible
        else:
            seed = secrets.randbelow(2 ** 31)  # unseeded sampling: a fresh draw per batch
        cfg = GenerationConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                               num_return_sequences=p.n, batch_size=len(batch), seed=int(seed) % (2 ** 63))
        if self._stops is None:
            self._stops = stop_token_ids(self.bundle)
        self._recorder.records.clear()
        results = gen(self._gen_bundle, [j.encoded for j in batch], cfg)
        if not isinstance(results, list) or len(results) != len(batch):
            raise UrtError(f"generate() returned {type(results).__name__} of length "
                           f"{len(results) if hasattr(results, '__len__') else '?'} for {len(batch)} prompts")
        by_text = self._token_counts(p.max_tokens)
        for job, texts in zip(batch, results):
            if not isinstance(texts, list) or len(texts) != p.n or not all(isinstance(t, str) for t in texts):
                raise UrtError(f"generate() returned {texts!r} for one prompt; expected {p.n} strings")
            prefix = job.encoded.meta.get("assistant_prefix", "") or ""
            job.texts = texts
            job.tokens = [by_text.get(t[len(prefix):] if t.startswith(prefix) else t)
                          or self._estimate(t[len(prefix):] if t.startswith(prefix) else t, p.max_tokens)
                          for t in texts]

    def _token_counts(self, max_tokens: int) -> dict[str, tuple[int, str]]:
        """decoded text -> (completion tokens incl. the stop token, finish reason) from recorded rows."""
        tok = self.bundle.tokenizer
        stops = set(self._stops or [])
        out: dict[str, tuple[int, str]] = {}
        for rows in self._recorder.records:
            for seq in rows:
                cut = next((j for j, t in enumerate(seq) if t in stops), None)
                body = seq if cut is None else seq[:cut]
                text = tok.decode(body, skip_special_tokens=True)
                if cut is None:
                    out.setdefault(text, (len(seq), "length"))
                else:
                    out.setdefault(text, (cut + 1, "stop"))
        self._recorder.records.clear()
        return out

    def _estimate(self, text: str, max_tokens: int) -> tuple[int, str]:
        n = len(self.bundle.tokenizer(text, add_special_tokens=False)["input_ids"])
        return (n, "length" if n >= max_tokens else "stop")

    # ------------------------------------------------------------------------------ requests

    def submit(self, encoded, params: SamplingParams) -> _Job:
        job = _Job(encoded=encoded, params=params)
        with self._cond:
            if self._stopping or self._httpd is None:
                raise RequestError("the server is shutting down", status=503, type="server_error")
            if len(self._pending) >= self.max_queue:
                raise RequestError(f"the server is overloaded ({self.max_queue} requests queued); retry later",
                                   status=503, type="server_error", code="overloaded")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def chat_completion(self, body: Any) -> dict:
        """Answer one parsed /v1/chat/completions body (raises RequestError for client errors)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                               status=404, param="model", code="model_not_found")
        params = parse_sampling(body, default_max_tokens=self.max_new_tokens, max_tokens_limit=self.max_tokens_limit,
                                default_temperature=self.temperature, default_top_p=self.top_p,
                                default_seed=self.seed)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        with self._encode_lock:
            encoded = encode_messages(self.bundle, body.get("messages"), key=rid, max_images=self.max_images,
                                      max_prompt_tokens=self.max_prompt_tokens)
        job = self.submit(encoded, params)
        if not job.done.wait(self.request_timeout_s):
            raise RequestError(f"generation did not finish within {self.request_timeout_s:g} s", status=504,
                               type="server_error", code="timeout")
        if job.error is not None:
            if isinstance(job.error, RequestError):
                raise job.error
            raise RuntimeError(f"generation failed: {type(job.error).__name__}: {job.error}")
        self._count("completed")
        choices = []
        completion_tokens = 0
        for i, (text, (n_tok, finish)) in enumerate(zip(job.texts, job.tokens)):
            completion_tokens += n_tok
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": finish})
        prompt_tokens = len(encoded)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "urt", "family": self.bundle.family}]}


# ---------------------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    judge: JudgeServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "urt-serve"
    timeout = 120  # seconds a client may take to send its request

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._send(err.status, err.body())

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def do_GET(self):  # noqa: N802 - http.server naming
        path = self._path()
        try:
            if path == "/health":
                self._send(200, {"status": "ok"})
            elif path == "/v1/models":
                self._send(200, self.judge.models())
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                entry = [m for m in self.judge.models()["data"] if m["id"] == name]
                if entry:
                    self._send(200, entry[0])
                else:
                    self._error(RequestError(f"model {name!r} is not served here", status=404,
                                             code="model_not_found"))
            elif path == "/v1/chat/completions":
                self._error(RequestError("use POST for /v1/chat/completions", status=405))
            else:
                self._error(RequestError(f"no route {path!r}", status=404, code="not_found"))
        except Exception as err:  # noqa: BLE001
            self._internal(err)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("Content-Length is required", status=411)
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(f"invalid Content-Length {length!r}") from None
        if n < 0:
            self.close_connection = True
            raise RequestError(f"invalid Content-Length {length!r}")
        if n > self.judge.max_body_bytes:
            self.close_connection = True  # the unread body would corrupt the next request on this connection
            raise RequestError(f"request body of {n} bytes exceeds the limit of {self.judge.max_body_bytes}",
                               status=413)
        return self.rfile.read(n)

    def do_POST(self):  # noqa: N802
        path = self._path()
        try:
            if path != "/v1/chat/completions":
                # Still consume the body so the connection stays usable.
                try:
                    self._read_body()
                except RequestError:
                    pass
                status = 405 if path in ("/health", "/v1/models") else 404
                self._error(RequestError(f"no POST route {path!r}", status=status, code="not_found"))
                return
            self.judge._count("requests")
            raw = self._read_body()
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise RequestError(f"invalid JSON body: {err}") from None
            self._send(200, self.judge.chat_completion(body))
        except RequestError as err:
            self.judge._count("client_errors" if err.status < 500 else "server_errors")
            self._error(err)
        except Exception as err:  # noqa: BLE001 - answer 500, keep serving
            self.judge._count("server_errors")
            self._internal(err)

    def _internal(self, err: Exception) -> None:
        log.warning("urt serve: internal error: %s: %s", type(err).__name__, err)
        try:
            self._send(500, {"error": {"message": f"internal server error: {type(err).__name__}: {err}",
                                       "type": "server_error", "param": None, "code": None}})
        except OSError:
            pass


# ---------------------------------------------------------------------------------------- CLI


def _cmd_serve(args: argparse.Namespace) -> int:
    from urt.models import load_model

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
