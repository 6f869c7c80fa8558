"""API keys and per-key concurrency for `urt serve`.

Clients authenticate as with vLLM and the OpenAI API: `Authorization: Bearer <key>`. Keys come from
`--api-key` (repeatable), `--api-key-file` (one key per line, blank lines and `#` comments ignored) and
the `URT_API_KEY` environment variable (comma-separated); a file or the variable keeps keys out of shell
history and process listings. A presented key is compared with every configured key in constant time
(`hmac.compare_digest` over SHA-256 digests, so neither the position of the first differing byte nor the
key's length shows in the timing). Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import threading
from pathlib import Path
from typing import Iterable, Mapping

from urt.errors import UrtError
from urt.serve.errors import RequestError

ENV_VAR = "URT_API_KEY"


def _check_key(key: str, where: str) -> str:
    if not key or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise UrtError(f"{where}: an API key must be non-empty printable text without spaces")
    return key


def read_key_file(path: str | Path) -> list[str]:
    """The keys in `path`: one per line, blank lines and `#` comments ignored; UrtError if the file is
    missing, unreadable or holds no key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UrtError(f"API key file {str(p)!r} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UrtError(f"cannot read API key file {str(p)!r}: {err}") from None
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_check_key(line, f"API key file {str(p)!r} line {n}"))
    if not keys:
        raise UrtError(f"API key file {str(p)!r} holds no key (one key per line; blank lines and # comments "
                       f"are ignored)")
    return keys


def collect_keys(keys: Iterable[str] = (), files: Iterable[str | Path] = (),
                 environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys from the command line, key files and `URT_API_KEY` in `environ` (comma-separated), in that
    order, duplicates dropped."""
    out: list[str] = [_check_key(k.strip(), "--api-key") for k in keys]
    for f in files:
        out += read_key_file(f)
    env = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    out += [_check_key(k.strip(), ENV_VAR) for k in env.split(",") if k.strip()]
    return list(dict.fromkeys(out))


class KeyRing:
    """The configured keys; `identify()` maps an Authorization header to the index of its key."""

    def __init__(self, keys: Iterable[str] = ()):
        keys = [_check_key(k, "api key") for k in keys]
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in dict.fromkeys(keys)]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None) -> int:
        """Index of the configured key the `Authorization: Bearer <key>` header carries; RequestError (401)
        for a missing header, another scheme or an unknown key. Every key is compared, whatever matches."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise RequestError("missing API key: send 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
        found = -1
        for i, d in enumerate(self._digests):
            if hmac.compare_digest(digest, d) and found < 0:
                found = i
        if found < 0:
            raise RequestError("incorrect API key", status=401, code="invalid_api_key",
                               headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return found


class ConcurrencyLimiter:
    """At most `limit` requests in flight per client identity (a key index, or an address without keys):
    one client flooding the server gets 429s while the others' requests still reach the queue."""

    def __init__(self, limit: int, retry_after_s: int = 1):
        self.limit = int(limit)
        self.retry_after_s = int(retry_after_s)
        self._lock = threading.Lock()
        self._in_flight: dict[object, int] = {}

    def acquire(self, ident: object, label: str) -> None:
        with self._lock:
            n = self._in_flight.get(ident, 0)
            if n >= self.limit:
                raise RequestError(
                    f"{label} already has {n} requests in flight, this server's limit max_concurrent_per_key="
                    f"{self.limit} (--max-concurrent-per-key); retry after a response arrives", status=429,
                    type="rate_limit_error", code="concurrency_limit_exceeded",
                    headers={"Retry-After": str(self.retry_after_s)})
            self._in_flight[ident] = n + 1

    def release(self, ident: object) -> None:
        with self._lock:
            n = self._in_flight.get(ident, 0) - 1
            if n > 0:
                self._in_flight[ident] = n
            else:
                self._in_flight.pop(ident, None)

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._in_flight.values())


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only ever means this machine; "" and 0.0.0.0 / :: are every
    interface, hence not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def exposure_problem(host: str, has_keys: bool) -> str | None:
    """What is wrong with serving on `host` with / without keys (None: nothing)."""
    if has_keys or is_loopback(host):
        return None
    return (f"--host {host or '(all interfaces)'} is reachable from other machines and no API key is set: anyone "
            f"who reaches the port can use the model. Set a key with --api-key-file FILE or ${ENV_VAR} "
            f"(see docs/serve.md)")
