"""OpenAI-style errors: every refusal the service makes is one :class:`ApiError`, rendered as
``{"error": {"message", "type", "param", "code"}}`` with the right status and headers, so that
clients built for OpenAI (the ``openai`` package included) read it as they read OpenAI's."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# OpenAI's error types by status (what their SDKs switch on).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


@dataclass
class ApiError(Exception):
    """A request the service refuses or cannot serve, with what the caller should do."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def error_type(self) -> str:
        return self.type or _TYPES.get(self.status, "server_error" if self.status >= 500 else
                                       "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode("utf-8")


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header of whole seconds (at least 1)."""
    return {"Retry-After": str(max(1, int(seconds + 0.999)))}


def unavailable(message: str, seconds: float, code: str = "unavailable") -> ApiError:
    return ApiError(503, message, code=code, headers=retry_after(seconds))
