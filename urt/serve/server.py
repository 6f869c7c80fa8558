"""The HTTP side of `urt serve`: `JudgeServer` (endpoints, request validation, lifecycle) and its handler.

* `POST /v1/chat/completions`: fields `model`, `messages`, `max_tokens` / `max_completion_tokens`,
  `temperature`, `top_p`, `n`, `seed`; the response follows the OpenAI schema (`choices[i].message.
  content`, `finish_reason` "stop" | "length", `usage`). `stream=true` is refused (400).
* `POST /v1/rewards`: a group (a caption and N images / videos, or a question, its image / video and N
  answers) -> per-candidate win rates, ranking, GRPO advantages and the pair verdicts (`urt.serve.rewards`);
  concurrent groups are batched by their own worker, which shares the model with the chat worker under
  one lock.
* `GET /v1/models` (the served model id), `GET /health` -> `{"status": "ok"}` (nothing else: it is the one
  endpoint open without a key, for load balancers and probes).

With API keys (`urt.serve.auth`) every endpoint but `/health` needs `Authorization: Bearer <key>` (401
otherwise, before the body is read); each key (each client address when no key is set) has at most
`max_concurrent_per_key` chat requests in flight (429 with `Retry-After` beyond). Per-request limits are
`urt.serve.limits.Limits`; media paths are read only under `media_roots` (`urt.serve.media`).

Requests are turned into model inputs on the HTTP thread (`urt.serve.request`: a bad request fails fast
with a 4xx and never reaches the model), then queued for the batching worker (`urt.serve.batching`).
Errors are JSON `{"error": {"message", "type", "param", "code"}}`; a failing generation is a 500 for its
request only, and the server keeps serving. Completions are returned as `generate()` gives them: the
assistant prefix prepended, i.e. exactly the text urt's parser reads; `usage.completion_tokens` counts
the sampled ids (stop token included).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable

from urt.errors import UrtError
from urt.serve.auth import ConcurrencyLimiter, KeyRing, exposure_problem
from urt.serve.batching import Batcher
from urt.serve.errors import RequestError
from urt.serve.limits import Limits
from urt.serve.media import MediaReader
from urt.serve.request import encode_messages, parse_sampling

log = logging.getLogger(__name__)

POST_ROUTES = ("/v1/chat/completions", "/v1/rewards")


def _locked(generate_fn: Callable | None, lock: threading.Lock) -> Callable:
    """`generate_fn` (default `urt.generation.generate`) run under `lock`."""

    def locked(*args, **kwargs):
        fn = generate_fn
        if fn is None:
            from urt.generation import generate as fn
        with lock:
            return fn(*args, **kwargs)

    return locked


POLL_S = 0.05  # how often a waiting request checks its client and its time


class ClientGone(Exception):
    """The client closed its connection before its answer was ready: nothing to send."""


class JudgeServer:
    """OpenAI-compatible chat server around a loaded `ModelBundle` (see the module docstring).

    `start()` runs it on background threads and returns the base URL (`http://host:port`); `shutdown()`
    stops it; also a context manager. `stats()` reports requests served and the batch sizes the worker
    ran. `max_new_tokens`, `temperature`, `top_p`, `seed` are the defaults for requests that leave them
    out; `limits` bounds what one request may ask for (its `max_prompt_tokens` defaults to the model's
    context). `api_keys` turn authentication on; `require_key` makes `start()` refuse a non-loopback
    `host` without keys (otherwise it logs a warning). `media_roots` are the directories path inputs may
    be read from (none: data URLs only). `generate_fn` replaces `urt.generation.generate` (same
    signature, returning `Completion`s)."""

    def __init__(self, bundle, *, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                 max_batch_size: int = 8, batch_wait_ms: float = 10, max_new_tokens: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 limits: Limits | None = None, api_keys: Iterable[str] = (), require_key: bool = False,
                 media_roots: Iterable[str | Path] = (), max_queue: int = 1024, request_timeout_s: float | None = None,
                 generate_fn: Callable | None = None):
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
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        limits = limits or Limits()
        if limits.max_prompt_tokens is None:
            limits = replace(limits, max_prompt_tokens=self._context_length(bundle))
        if self.max_new_tokens > limits.max_tokens:
            raise UrtError(f"max_new_tokens {self.max_new_tokens} (the request default) is over the max_tokens "
                           f"limit {limits.max_tokens} (--max-tokens-limit)")
        self.limits = limits
        self.media = MediaReader(limits, media_roots)
        self.keys = KeyRing(api_keys)
        self.require_key = bool(require_key)
        self.concurrency = ConcurrencyLimiter(limits.max_concurrent_per_key)
        # each request's time bound (queue + generation): limits.max_request_seconds unless given here
        self.request_timeout_s = float(request_timeout_s if request_timeout_s is not None
                                       else limits.max_request_seconds)
        # one model, two workers (chat, rewards): generation runs under this lock
        self.model_lock = threading.Lock()
        self.batcher = Batcher(bundle, max_batch_size=max_batch_size, batch_wait_s=float(batch_wait_ms) / 1000.0,
                               max_queue=max_queue, seed=seed, generate_fn=_locked(generate_fn, self.model_lock))
        self._encode_lock = threading.Lock()  # processor / tokenizer calls from HTTP threads
        from urt.serve.rewards import RewardBatcher

        self.rewards_batcher = RewardBatcher(bundle, model_lock=self.model_lock, encode_lock=self._encode_lock,
                                             max_groups=max_batch_size, batch_wait_s=float(batch_wait_ms) / 1000.0,
                                             max_queue=max_queue, max_prompt_tokens=limits.max_prompt_tokens,
                                             batch_size=max_batch_size)
        self._httpd: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._counts = {"requests": 0, "completed": 0, "client_errors": 0, "server_errors": 0, "unauthorized": 0,
                        "rate_limited": 0, "cancelled": 0, "timed_out": 0}
        self.created = int(time.time())

    @property
    def max_batch_size(self) -> int:
        return self.batcher.max_batch

    @staticmethod
    def _context_length(bundle) -> int | None:
        """The text model's max_position_embeddings (None when the config has none)."""
        config = getattr(bundle.model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(text, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

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
        problem = exposure_problem(self.host, bool(self.keys))
        if problem and self.require_key:
            raise UrtError(f"{problem}; --require-key forbids serving it without one")
        if problem:
            log.warning("urt serve: %s", problem)
        handler = type("_BoundHandler", (_Handler,), {"judge": self})
        try:
            self._httpd = _HTTPServer((self.host, self.port), handler)
        except OSError as err:
            raise UrtError(f"cannot listen on {self.host}:{self.port}: {err}") from None
        self._httpd.daemon_threads = True
        self.batcher.start()
        self.rewards_batcher.start()
        self._http_thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                             name="urt-serve-http", daemon=True)
        self._http_thread.start()
        return self.url

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._httpd is None:
            return
        self.batcher.stop(timeout)
        self.rewards_batcher.stop(timeout)
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout)
        self._httpd = None
        self._http_thread = None

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
            out = dict(self._counts)
        out.update(self.batcher.stats())
        out["in_flight"] = self.concurrency.in_flight()
        out["reward_batches"] = self.rewards_batcher.stats()["batch_sizes"]
        out["reward_groups_queued"] = self.rewards_batcher.queued()
        return out

    def authenticate(self, authorization: str | None, address: str) -> tuple[tuple, str]:
        """(identity, label) of the client sending `authorization` from `address`: its key's index when keys
        are set (RequestError 401 for a missing or wrong key), else its address."""
        if not self.keys:
            return ("address", address), f"client {address}"
        try:
            return ("key", self.keys.identify(authorization)), "this API key"
        except RequestError:
            self._count("unauthorized")
            raise

    def _count(self, name: str, k: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += k

    # ------------------------------------------------------------------------------ requests

    def chat_completion(self, body, client_gone: Callable[[], bool] | None = None) -> dict:
        """Answer one parsed /v1/chat/completions body (raises RequestError for client errors). While it
        waits, `client_gone()` is polled: a client that has disconnected has its job cancelled (ClientGone);
        past `request_timeout_s` the job is stopped and the request answered 504."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                               status=404, param="model", code="model_not_found")
        params = parse_sampling(body, default_max_tokens=self.max_new_tokens, default_temperature=self.temperature,
                                default_top_p=self.top_p, default_seed=self.seed, limits=self.limits)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        with self._encode_lock:
            encoded = encode_messages(self.bundle, body.get("messages"), key=rid, limits=self.limits,
                                      media=self.media)
        job = self.batcher.submit(encoded, params, timeout_s=self.request_timeout_s)
        while not job.done.wait(POLL_S):
            if client_gone is not None and client_gone():
                job.cancel("the client disconnected")
                self._count("cancelled")
                raise ClientGone()
            if time.monotonic() > job.deadline + 1.0:
                # The worker ends an expired job at its next token (and skips it while queued); this answers a
                # job stuck behind something that cannot be stopped between tokens (a long prefill).
                self._count("timed_out")
                raise job.stopped_error()
        if isinstance(job.error, RequestError) and job.error.code == "timeout":
            self._count("timed_out")
        if job.error is not None:
            if isinstance(job.error, RequestError):
                raise job.error
            raise RuntimeError(f"generation failed: {type(job.error).__name__}: {job.error}")
        self._count("completed")
        choices = [{"index": i, "message": {"role": "assistant", "content": str(c)}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(job.completions)]
        completion_tokens = sum(len(c.ids) for c in job.completions)
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

    def rewards(self, body) -> dict:
        """Answer one parsed /v1/rewards body (urt.serve.rewards; raises RequestError for client errors)."""
        from urt.serve.rewards import parse_group, response

        if isinstance(body, dict) and body.get("model") is not None and body["model"] != self.model_name:
            raise RequestError(f"model {body['model']!r} is not served here; this server serves {self.model_name!r}",
                               status=404, param="model", code="model_not_found")
        rid = f"rwd-{uuid.uuid4().hex}"
        fields, opts, return_text = parse_group(
            body, limits=self.limits, media=self.media, default_max_tokens=self.max_new_tokens,
            default_temperature=self.temperature, default_top_p=self.top_p, default_seed=self.seed, key=rid)
        job = self.rewards_batcher.submit(self.rewards_batcher.group(fields), opts)
        if not job.done.wait(self.request_timeout_s):
            raise RequestError(f"judging did not finish within {self.request_timeout_s:g} s", status=504,
                               type="server_error", code="timeout")
        if job.error is not None:
            if isinstance(job.error, RequestError):
                raise job.error
            raise RuntimeError(f"judging failed: {type(job.error).__name__}: {job.error}")
        self._count("completed")
        return response(job.result, model=self.model_name, rid=rid, return_text=return_text)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "urt", "family": self.bundle.family}]}


# ---------------------------------------------------------------------------------------- HTTP


class _HTTPServer(ThreadingHTTPServer):
    # socketserver's listen backlog of 5 resets connections when a burst of clients connects at once (a trainer
    # sending a step's 32 reward groups together); the kernel caps it at net.core.somaxconn
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    judge: JudgeServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "urt-serve"
    sys_version = ""  # the Server header names no Python version
    timeout = 120  # seconds a client may take to send its request

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s - %s", self.address_string(), format % args)  # the request line only: never a header

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._send(err.status, err.body(), err.headers)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _authenticate(self, path: str) -> tuple[tuple, str]:
        """Everything but /health needs the key. A refused request's body is never read, so its connection
        is closed rather than reused."""
        if path == "/health":
            return ("health",), "health"
        try:
            return self.judge.authenticate(self.headers.get("Authorization"), self.client_address[0])
        except RequestError:
            self.close_connection = True
            raise

    def do_GET(self):  # noqa: N802 - http.server naming
        path = self._path()
        try:
            self._authenticate(path)
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
            elif path in POST_ROUTES:
                self._error(RequestError(f"use POST for {path}", status=405))
            else:
                self._error(RequestError(f"no route {path!r}", status=404, code="not_found"))
        except RequestError as err:
            self._error(err)
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
        limits = self.judge.limits
        if n > limits.max_body_bytes:
            self.close_connection = True  # the unread body would corrupt the next request on this connection
            raise limits.refuse("max_body_bytes", f"the request body is {n} bytes", status=413)
        return self.rfile.read(n)

    def do_POST(self):  # noqa: N802
        path = self._path()
        try:
            ident, label = self._authenticate(path)
            if path not in POST_ROUTES:
                # Still consume the body so the connection stays usable.
                try:
                    self._read_body()
                except RequestError:
                    pass
                status = 405 if path in ("/health", "/v1/models") else 404
                self._error(RequestError(f"no POST route {path!r}", status=status, code="not_found"))
                return
            self.judge._count("requests")
            try:
                self.judge.concurrency.acquire(ident, label)
            except RequestError:
                self.judge._count("rate_limited")
                self.close_connection = True  # the body is left unread
                raise
            try:
                raw = self._read_body()
                try:
                    body = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise RequestError(f"invalid JSON body: {err}") from None
                self._send(200, self.judge.rewards(body) if path == "/v1/rewards"
                           else self.judge.chat_completion(body, client_gone=self._client_gone))
            finally:
                self.judge.concurrency.release(ident)
        except ClientGone:
            self.close_connection = True
        except RequestError as err:
            self.judge._count("client_errors" if err.status < 500 else "server_errors")
            self._error(err)
        except Exception as err:  # noqa: BLE001 - answer 500, keep serving
            self.judge._count("server_errors")
            self._internal(err)

    def _client_gone(self) -> bool:
        """Whether the client has closed its connection (readable with nothing to read: end of stream). A
        client that already sent its next request on this connection is still there."""
        import select
        import socket

        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset by the peer, or already closed
            return True

    def _internal(self, err: Exception) -> None:
        log.warning("urt serve: internal error: %s: %s", type(err).__name__, err)
        try:
            self._send(500, {"error": {"message": f"internal server error: {type(err).__name__}: {err}",
                                       "type": "server_error", "param": None, "code": None}})
        except OSError:
            pass
