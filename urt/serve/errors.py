"""The one exception the server answers clients with."""

from __future__ import annotations

from urt.errors import UrtError


class RequestError(UrtError):
    """A client error: answered with `status` and an OpenAI-style error body; `headers` are sent with it
    (e.g. `Retry-After` on a 429)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
