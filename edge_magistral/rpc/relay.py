"""The sockets of ``rpc-worker``: the public port, in front of llama.cpp's RPC server.

llama.cpp's server has no allow-list, serves one client at a time (a second one waits silently in
the listen backlog) and closes a connection whose first byte is not HELLO. The relay answers for
it: a peer outside the allow-list is closed at once; a first byte of HELLO is spliced to the
server when no other head holds it (else closed, so a head's probe says "busy" instead of
waiting); a plain HTTP request gets ``GET /info``; anything else is closed.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

CMD_HELLO = 14
PEEK_TIMEOUT_S = 10.0  # a peer that sends nothing this long is dropped
MAX_HEADER_BYTES = 8192  # an HTTP request line and headers; more is not a client of ours
MAX_HANDLERS = 64  # connections being sorted or served at once; more are closed
CHUNK = 1 << 20
SOCKET_BUFFER = 4 << 20  # weights arrive in large SET_TENSOR messages
HTTP_FIRST = frozenset(b"GHPDO")  # GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS


class Host(Protocol):
    """What the relay asks of its supervisor."""

    def peer_allowed(self, ip: str) -> bool: ...

    def claim(self, peer: str) -> str | None:
        """The server's internal host:port when this peer may use it now (and it is then held),
        else None."""

    def release(self) -> None: ...

    def info(self) -> dict: ...

    def count(self, to_worker: int, from_worker: int) -> None: ...


@dataclass
class Relay:
    """The accept loop on the public address; each connection is sorted in its own thread."""

    listener: socket.socket
    host: Host
    stop: threading.Event

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_HANDLERS)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def serve(self) -> None:
        """Accept until ``stop`` is set (checked twice a second), then close every connection."""
        while not self.stop.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.5)
            if not ready:
                continue
            try:
                conn, addr = self.listener.accept()
            except OSError:
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn, addr), daemon=True, name="rpc-relay-conn").start()
        self.listener.close()
        with self._lock:
            for s in list(self._open):
                _shutdown(s)

    def _track(self, s: socket.socket, on: bool) -> None:
        with self._lock:
            (self._open.add if on else self._open.discard)(s)

    def _handle(self, conn: socket.socket, addr: tuple) -> None:
        self._track(conn, True)
        try:
            peer = _peer_text(addr)
            if not self.host.peer_allowed(str(addr[0])):
                log.warning("refused %s: not in the allow-list", peer)
                return
            first = _peek(conn)
            if first == CMD_HELLO:
                self._rpc(conn, peer)
            elif first is not None and first in HTTP_FIRST:
                answer_http(conn, self.host.info)
        except OSError as e:
            log.debug("connection from %s: %s", addr, e)
        finally:
            self._track(conn, False)
            conn.close()
            self._slots.release()

    def _rpc(self, client: socket.socket, peer: str) -> None:
        internal = self.host.claim(peer)
        if internal is None:
            log.info("closed %s: the server is busy with another head, or not up", peer)
            return
        try:
            host, _, port = internal.rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except OSError as e:
                log.warning("cannot reach llama.cpp's server at %s for %s: %s", internal, peer, e)
                return
            self._track(upstream, True)
            try:
                log.info("head %s connected", peer)
                splice(client, upstream, self.host.count)
                log.info("head %s disconnected", peer)
            finally:
                self._track(upstream, False)
                upstream.close()
        finally:
            self.host.release()


def _peer_text(addr: tuple) -> str:
    ip = str(addr[0])
    return f"[{ip}]:{addr[1]}" if ":" in ip else f"{ip}:{addr[1]}"


def _peek(conn: socket.socket) -> int | None:
    """The first byte, left in the socket for whoever reads next; None on silence or hang-up."""
    conn.settimeout(PEEK_TIMEOUT_S)
    try:
        b = conn.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return None
    return b[0] if b else None


# ------------------------------------------------------------------------------ splicing


def _tune(s: socket.socket) -> None:
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def _keepalive(s: socket.socket) -> None:
    """A head that lost power would hold the one client slot forever: find out within ~1.5 min."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _pump(src: socket.socket, dst: socket.socket, counted: Callable[[int], None]) -> None:
    """Copy until either side closes or fails, then shut both down (which ends the other pump)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if n == 0:
                break
            dst.sendall(view[:n])
            counted(n)
    except OSError:
        pass
    finally:
        _shutdown(src)
        _shutdown(dst)


def splice(client: socket.socket, upstream: socket.socket, count: Callable[[int, int], None]) -> None:
    """Bytes both ways until either side closes; ``count(to_worker, from_worker)`` per chunk."""
    _tune(client)
    _tune(upstream)
    _keepalive(client)
    t = threading.Thread(target=_pump, args=(client, upstream, lambda n: count(n, 0)), daemon=True,
                         name="rpc-relay-up")
    t.start()
    _pump(upstream, client, lambda n: count(0, n))
    t.join()


# ------------------------------------------------------------------------------ HTTP


def _read_head(conn: socket.socket) -> bytes | None:
    """The request line and headers, or None when they do not come (or are too long)."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_HEADER_BYTES:
            return None
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def http_reply(status: str, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\n{extra}Connection: close\r\n\r\n")
    return head.encode() + body


def route(request_line: str, info: Callable[[], dict]) -> bytes:
    """The reply to one request line: ``GET /info`` and nothing else."""
    parts = request_line.split()
    method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
    if method != "GET":
        return http_reply("405 Method Not Allowed", b'{"error": "only GET /info"}\n', extra="Allow: GET\r\n")
    if path.split("?", 1)[0] != "/info":
        return http_reply("404 Not Found", b'{"error": "only GET /info"}\n')
    return http_reply("200 OK", json.dumps(info(), indent=1).encode() + b"\n")


def answer_http(conn: socket.socket, info: Callable[[], dict]) -> None:
    head = _read_head(conn)
    if head is None:
        return
    line = head.split(b"\n", 1)[0].decode("latin-1").strip()
    conn.sendall(route(line, info))
    _shutdown(conn)
