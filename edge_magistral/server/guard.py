"""The door: what every HTTP request passes before any route sees it.

In this order: the Host header (a loopback-bound server refuses other host names, the DNS
rebinding defence), API keys in the query string (refused: they end up in logs), the Bearer key
(constant-time compare; ``/health`` is the only open route), and the body: the declared length
and then the bytes actually read are capped (413 before any parsing), and a body not complete
within ``read_timeout_s`` (``--client-timeout``) is cut (408, connection closed). The body is
buffered here and replayed, so the application never reads an unbounded stream. The status of
every response is counted. Slow request headers and slow readers are handled a layer below, in
:mod:`.connections`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from edge_magistral.errors import BadInputError
from edge_magistral.hosts import is_loopback
from edge_magistral.server.errors import ApiError

log = logging.getLogger(__name__)

KEY_ENV = "EDGE_MAGISTRAL_API_KEY"
CREDENTIAL_NAME = "api-key"  # systemd: LoadCredential=api-key:/etc/edge-magistral/api-key
MIN_KEY_LENGTH = 16
OPEN_PATHS = frozenset({"/health"})
QUERY_KEY_NAMES = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token", "auth"})
ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                       "/openapi.json"})


# ------------------------------------------------------------------------------------- keys

def _read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read API keys ({e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users: chmod 600 it", path)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_api_keys(key_file: str | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """Keys from a file (one per line, ``#`` comments), ``$EDGE_MAGISTRAL_API_KEY`` and the systemd
    credential ``$CREDENTIALS_DIRECTORY/api-key``; never from the command line (``ps`` shows it)."""
    env = os.environ if env is None else env
    keys: list[str] = []
    if key_file:
        keys += _read_key_file(Path(key_file))
    if env.get(KEY_ENV, "").strip():
        keys.append(env[KEY_ENV].strip())
    cred = env.get("CREDENTIALS_DIRECTORY")
    if cred and (Path(cred) / CREDENTIAL_NAME).is_file():
        keys += _read_key_file(Path(cred) / CREDENTIAL_NAME)
    for k in keys:
        if len(k) < MIN_KEY_LENGTH or not k.isascii() or not k.isprintable() or " " in k:
            raise BadInputError(f"an API key must be at least {MIN_KEY_LENGTH} printable ASCII characters without "
                                "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


class KeyChecker:
    """Compares a presented key with every configured key in constant time (hashes first, so
    lengths leak nothing either)."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: bytes) -> bool:
        d = hashlib.sha256(presented).digest()
        ok = False
        for k in self._digests:
            ok |= hmac.compare_digest(d, k)
        return ok


# ----------------------------------------------------------------------------------- hosts

def host_name(header: str) -> str:
    """The host of a Host header, without the port (``[::1]:8080`` → ``::1``)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


# ----------------------------------------------------------------------------------- guard

@dataclass
class GuardConfig:
    keys: KeyChecker = field(default_factory=lambda: KeyChecker([]))
    loopback_only_hosts: bool = True  # the server is bound to a loopback address
    allowed_hosts: frozenset[str] = frozenset()
    max_body_bytes: int = 2 * 1024 * 1024
    read_timeout_s: float = 30.0


class Guard:
    """ASGI middleware in front of the application (see the module docstring)."""

    def __init__(self, app: Any, config: GuardConfig, metrics: Any = None):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._counting(scope, send)
        try:
            self._check_headers(scope)
            receive = await self._buffered_body(scope, receive)
        except ApiError as e:
            await send_error(send, e)
            return
        await self.app(scope, receive, send)

    def _counting(self, scope: dict, send: Any) -> Any:
        if self.metrics is None:
            return send
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)
        return counted

    def _check_headers(self, scope: dict) -> None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        host = host_name(headers.get("host", b"").decode("latin-1"))
        if host and self.config.loopback_only_hosts and not (is_loopback(host) or host in self.config.allowed_hosts):
            raise ApiError(403, f"Host {host!r} is not allowed: this server is bound to a loopback address "
                                "(DNS rebinding guard); add --allowed-host to serve other names",
                           code="host_not_allowed")
        query = scope.get("query_string", b"").decode("latin-1")
        if any(name.lower() in QUERY_KEY_NAMES for name, _ in parse_qsl(query, keep_blank_values=True)):
            raise ApiError(401, "API keys in the query string are refused (URLs end up in logs); send the "
                                "header 'Authorization: Bearer KEY'", code="key_in_query")
        if self.config.keys.enabled and scope.get("path") not in OPEN_PATHS:
            auth = headers.get("authorization", b"")
            scheme, _, key = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not self.config.keys.check(key.strip()):
                raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid Content-Length header", code="bad_content_length")
            if int(declared) > self.config.max_body_bytes:
                raise _too_large(self.config.max_body_bytes)

    async def _buffered_body(self, scope: dict, receive: Any) -> Any:
        """Read the whole body within the limits, then hand the app a receive that replays it."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return receive
        chunks, size, end = [], 0, time.monotonic() + self.config.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, end - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.config.read_timeout_s:g} s",
                               code="body_timeout") from None
            if message["type"] == "http.disconnect":
                return _replay(b"", receive, disconnected=True)
            body = message.get("body", b"")
            size += len(body)
            if size > self.config.max_body_bytes:
                raise _too_large(self.config.max_body_bytes)
            chunks.append(body)
            if not message.get("more_body", False):
                return _replay(b"".join(chunks), receive)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the limit of {limit} bytes (--max-body-bytes)",
                    code="body_too_large")


def _replay(body: bytes, receive: Any, disconnected: bool = False) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            if disconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def send_error(send: Any, err: ApiError) -> None:
    body = err.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if err.status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
