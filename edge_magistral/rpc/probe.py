"""A pure-Python client for the few llama.cpp RPC messages a head needs before llama.cpp sees a
worker: HELLO (the protocol version), DEVICE_COUNT and GET_DEVICE_MEMORY.

llama.cpp's own RPC client aborts its whole process on a failed connect, a version mismatch or a
dropped connection. Probing first turns each of those into a one-line :class:`WorkerError` that
says what to do, and lets a service wait for a worker that is not up yet.

The wire format (ggml-rpc, little-endian): a request is ``| cmd u8 | size u64 | payload |``, a
reply ``| size u64 | payload |``. The first command on a connection must be HELLO, or the server
closes it. A server serves one client at a time; a second one waits in the listen backlog, so a
busy worker accepts the connection and then says nothing.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from edge_magistral.errors import BackendError
from edge_magistral.rpc.endpoints import Endpoint, parse_endpoint

# The protocol the installed llama.cpp speaks (RPC_PROTO_*_VERSION in ggml-rpc.h). It must change
# with llama-cpp-python's pin in pyproject.toml: a head and its workers must speak the same one.
PROTO_VERSION = (7, 0, 0)
LLAMA_CPP_PYTHON = "0.3.36"  # the pin that speaks PROTO_VERSION

CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24  # HELLO's payload: transport capabilities, all zero for plain TCP
HELLO_REPLY_SIZE = 4 + CONN_CAPS_SIZE  # major, minor, patch, padding, conn_caps
MAX_REPLY = 4096  # no reply the probe asks for is near this; more is not an RPC worker


@dataclass(frozen=True)
class RemoteDevice:
    """One device a worker serves (llama.cpp reports every remote device as a GPU)."""

    index: int
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerProbe:
    """What a worker said: its protocol version, its devices and (from ``rpc-worker``) its info."""

    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[RemoteDevice, ...]
    info: dict | None = None


class WorkerError(BackendError):
    """A worker that cannot be used now; ``endpoint`` names it (a service shows which one)."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint

    def __reduce__(self):  # pickles across the service's worker pipe
        return (type(self), (self.endpoint, str(self)))


class WorkerVersionError(WorkerError):
    """The worker speaks another RPC protocol version: waiting will not fix it."""


def version_ok(version: tuple[int, int, int]) -> bool:
    """llama.cpp's own rule: the same major version, a minor version no newer than ours."""
    return version[0] == PROTO_VERSION[0] and version[1] <= PROTO_VERSION[1]


def unreachable_error(endpoint: str, why: str) -> WorkerError:
    return WorkerError(endpoint, f"worker {endpoint} is unreachable ({why}): start `edge-magistral rpc-worker` "
                                 "there, or check the address")


def silent_error(endpoint: str, timeout_s: float) -> WorkerError:
    return WorkerError(endpoint, f"worker {endpoint} accepted the connection but did not answer within "
                                 f"{timeout_s:g} s: it is serving another head (one at a time) or is not an "
                                 "llama.cpp RPC worker")


# ------------------------------------------------------------------------------ the wire


class _Conn:
    """One connection to a worker; every failure becomes a WorkerError naming it."""

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.sock = _connect(parse_endpoint(endpoint), endpoint, timeout_s)

    def close(self) -> None:
        self.sock.close()

    def silent(self) -> WorkerError:
        return silent_error(self.endpoint, self.timeout_s)

    def closed(self, what: str) -> WorkerError:
        return WorkerError(self.endpoint, f"worker {self.endpoint} {what}: busy with another head, "
                                          "or not an RPC worker")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise self.silent() from None
            except OSError as e:
                raise self.closed(f"closed the connection ({e.strerror or e})") from None
            if not chunk:
                raise self.closed("closed the connection")
            buf += chunk
        return bytes(buf)

    def call(self, cmd: int, payload: bytes) -> bytes:
        """Send one command and return its reply's payload (its size checked against MAX_REPLY)."""
        try:
            self.sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
        except TimeoutError:
            raise self.silent() from None
        except OSError as e:
            raise self.closed(f"closed the connection ({e.strerror or e})") from None
        (size,) = struct.unpack("<Q", self._recv(8))
        if size > MAX_REPLY:
            raise self.closed(f"sent a malformed reply ({size} bytes to command {cmd})")
        return self._recv(size)

    def call_sized(self, cmd: int, payload: bytes, size: int) -> bytes:
        reply = self.call(cmd, payload)
        if len(reply) != size:
            raise self.closed(f"sent a malformed reply ({len(reply)} bytes to command {cmd}, not {size})")
        return reply


def _connect(ep: Endpoint, endpoint: str, timeout_s: float) -> socket.socket:
    """Connect as llama.cpp's client does: IPv4, the first address the name resolves to (an IPv6
    literal is tried as such, though llama.cpp itself cannot use it)."""
    family = socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET
    try:
        addr = socket.getaddrinfo(ep.host, ep.port, family, socket.SOCK_STREAM)[0][4]
    except (socket.gaierror, UnicodeError) as e:
        raise WorkerError(endpoint, f"worker {endpoint} is unreachable (cannot resolve {ep.host!r}: {e}): "
                                    "check the address") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(addr)
    except OSError as e:
        sock.close()
        why = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else _reason(e)
        raise unreachable_error(endpoint, why) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reason(e: OSError) -> str:
    return (e.strerror or str(e) or type(e).__name__).lower()


# ------------------------------------------------------------------------------ the probe


def _hello(conn: _Conn) -> tuple[int, int, int]:
    reply = conn.call(CMD_HELLO, bytes(CONN_CAPS_SIZE))
    if len(reply) < 3:
        raise conn.closed(f"sent a malformed reply ({len(reply)} bytes to HELLO)")
    version = (reply[0], reply[1], reply[2])
    if not version_ok(version):
        ours = ".".join(map(str, PROTO_VERSION))
        raise WorkerVersionError(conn.endpoint, f"worker {conn.endpoint} speaks RPC protocol "
                                                f"{'.'.join(map(str, version))}, this head {ours}: install the "
                                                f"same llama-cpp-python ({LLAMA_CPP_PYTHON}) and RPC library on both")
    if len(reply) != HELLO_REPLY_SIZE:
        raise conn.closed(f"sent a malformed reply ({len(reply)} bytes to HELLO, not {HELLO_REPLY_SIZE})")
    return version


def probe(endpoint: str, timeout_s: float = 5.0) -> WorkerProbe:
    """Ask a worker its protocol version and its devices' memory, then hang up (the worker is
    free again for the head's llama.cpp). Raises WorkerError, one line with what to do."""
    conn = _Conn(endpoint, timeout_s)
    try:
        version = _hello(conn)
        (count,) = struct.unpack("<I", conn.call_sized(CMD_DEVICE_COUNT, b"", 4))
        if count == 0:
            raise WorkerError(endpoint, f"worker {endpoint} serves no device: start `edge-magistral rpc-worker` "
                                        "there with at least one device")
        devices = []
        for i in range(count):
            free, total = struct.unpack("<QQ", conn.call_sized(CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
            devices.append(RemoteDevice(i, free, total))
    finally:
        conn.close()
    return WorkerProbe(endpoint, version, tuple(devices))


def fetch_info(endpoint: str, timeout_s: float = 5.0) -> dict | None:
    """``GET /info`` from an ``edge-magistral rpc-worker``, which answers plain HTTP on its RPC
    port. None from a bare llama.cpp rpc-server (it closes the connection on a first byte that is
    not HELLO) or for any reply that is not a JSON object. Raises WorkerError when unreachable."""
    ep = parse_endpoint(endpoint)
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout_s)
    try:
        try:
            conn.connect()
        except OSError as e:
            why = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else _reason(e)
            raise unreachable_error(endpoint, why) from None
        try:
            conn.request("GET", "/info", headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(1 << 20) if resp.status == 200 else b""
        except TimeoutError:
            raise silent_error(endpoint, timeout_s) from None
        except (http.client.HTTPException, OSError):
            return None  # a bare rpc-server hangs up on a first byte that is not HELLO
    finally:
        conn.close()
    try:
        info = json.loads(body)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def probe_with_info(endpoint: str, timeout_s: float = 5.0) -> WorkerProbe:
    """``probe`` plus what an ``rpc-worker`` publishes about its box (None from a bare server)."""
    p = probe(endpoint, timeout_s)
    return replace(p, info=fetch_info(endpoint, timeout_s))


def wait_for_workers(endpoints: Sequence[str], timeout_s: float | None, on_wait: Callable[[WorkerError], None],
                     interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep, probe_timeout_s: float = 5.0) -> list[WorkerProbe]:
    """Probe every worker until all answer, in the order given. Each failed probe goes to
    ``on_wait`` (a service shows "waiting for worker X: why"); a version mismatch is raised at once
    (waiting will not fix it); past ``timeout_s`` (None: never) the last failure is raised."""
    deadline = None if timeout_s is None else clock() + timeout_s
    got: dict[str, WorkerProbe] = {}
    while True:
        last: WorkerError | None = None
        for ep in endpoints:
            if ep in got:
                continue
            try:
                got[ep] = probe(ep, probe_timeout_s)
            except WorkerVersionError:
                raise
            except WorkerError as e:
                last = e
                on_wait(e)
        if last is None:
            return [got[ep] for ep in endpoints]
        if deadline is not None and clock() >= deadline:
            raise last
        sleep(interval_s)
