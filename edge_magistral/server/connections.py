"""The connection layer under uvicorn: timeouts for clients that are slow or silent, and a
connection limit that idle clients cannot exhaust.

On its own, uvicorn (whose h11 protocol is subclassed here) closes a kept-alive connection that
stays idle after a response, but it
- keeps a connection that never completes its request headers open for ever (slowloris);
- lets a client that stops reading a streamed response hold it for ever: ``send`` waits for the
  socket to drain while the generation's events pile up behind it;
- answers every new request 503 once ``limit_concurrency`` connections are open, ``/health``
  included, even when all of them are idle.

This protocol adds, with one ``client_timeout_s``:
- a header timeout: a request's headers must be complete within the timeout of the connection
  opening (or of the first byte of the next request on a kept-alive one), else the connection is
  closed. The body has its own deadline in the guard (408).
- a bounded send buffer and a send timeout: a small kernel send buffer and write high-water mark
  keep what waits for one client to a few tens of KiB; once they are full the response pauses,
  and a client that takes nothing more for the timeout is cut off. uvicorn reports that as a
  disconnect, which cancels the generation as for any client that leaves.
- idle eviction: a new connection that brings the count to the limit closes the oldest idle one
  (no request in progress, nothing left to send), so only real requests count against the limit.

Each closure is reported by reason to ``on_close`` (the metrics); none is logged as an error.
The h11 protocol is used even where httptools is installed: one implementation to reason about,
and the traffic (a few tokens a second per client) does not need a faster parser.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# Token streaming needs a few KiB/s; 32 KiB in flight still allows ~300 KiB/s at a 100 ms round trip.
SEND_BUFFER_BYTES = 32 * 1024  # the kernel's send buffer per connection (Linux doubles it for overhead)
WRITE_HIGH_WATER = 32 * 1024  # asyncio's buffer above the kernel's: above it the response pauses


@dataclass(frozen=True)
class ConnectionLimits:
    client_timeout_s: float = 30.0
    on_close: Callable[[str], None] | None = None  # called with the reason of each closure


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    """The ``http=`` protocol class for uvicorn, bound to these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the timeouts and the eviction of the module docstring."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened_at = self.loop.time()
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        _bound_send_buffer(transport)
        self._evict_idle()
        self._header_timer = self.loop.call_later(self.limits.client_timeout_s, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    @property
    def idle(self) -> bool:
        """No request in progress: between requests, or still waiting for a request's headers."""
        return self.cycle is None or self.cycle.response_complete

    # ---------------------------------------------------------------------- reading
    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.idle:  # the first bytes of the next request
            self._header_timer = self.loop.call_later(self.limits.client_timeout_s, self._on_header_timeout)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and not self.idle:  # the headers are in: the guard times the body
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.idle and not self.transport.is_closing():
            log.debug("closing a connection from %s: no complete request within %g s", self.client,
                      self.limits.client_timeout_s)
            self._close("header_timeout")

    # ---------------------------------------------------------------------- writing
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.client_timeout_s, self._on_send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _on_send_stalled(self) -> None:
        self._send_timer = None
        log.info("closing the connection of %s: it took no response data for %g s", self.client,
                 self.limits.client_timeout_s)
        self._close("send_timeout", abort=True)  # close() would wait for the buffer to drain: never

    # ---------------------------------------------------------------------- the limit
    def _evict_idle(self) -> None:
        """At the connection limit, close the oldest quiet connection to make room for this one."""
        limit = self.limit_concurrency
        while limit is not None and len(self.connections) >= limit:
            quiet = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol) and c.quiet]
            if not quiet:
                return  # every connection has a request in progress: uvicorn answers 503
            oldest = min(quiet, key=lambda c: c.opened_at)
            self.connections.discard(oldest)
            log.debug("closing an idle connection from %s: at the limit of %d connections", oldest.client, limit)
            oldest._close("idle_evicted")

    @property
    def quiet(self) -> bool:
        """Idle, with nothing left to send: closing it loses nothing."""
        t = self.transport
        return self.idle and not t.is_closing() and t.get_write_buffer_size() == 0

    # ---------------------------------------------------------------------- helpers
    def _close(self, reason: str, abort: bool = False) -> None:
        if self.limits.on_close is not None:
            self.limits.on_close(reason)
        self._stop_timers()
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def _stop_timers(self) -> None:
        for timer in (self._header_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._send_timer = None


def _bound_send_buffer(transport: asyncio.Transport) -> None:
    """Keep what waits for one client small: the kernel's buffer and asyncio's above it."""
    transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:  # not a TCP socket (a unix socket in a test): the asyncio limit still holds
            pass
