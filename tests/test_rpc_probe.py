"""The pure-Python RPC probe against a fake worker speaking llama.cpp's protocol in a thread, and
against a real llama.cpp RPC server when the RPC library is installed."""

from __future__ import annotations

import json
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from edge_magistral.rpc.probe import (
    PROTO_VERSION,
    RemoteDevice,
    WorkerError,
    WorkerProbe,
    WorkerVersionError,
    fetch_info,
    probe,
    probe_with_info,
    wait_for_workers,
)

HELLO = b"\x0e" + struct.pack("<Q", 24) + bytes(24)


class FakeWorker:
    """A one-client-at-a-time RPC server, like llama.cpp's. ``mode``: "serve" (the protocol),
    "silent" (accept, never answer), "close" (accept, hang up at once), "http" (answer GET with
    ``http_body``). ``received`` holds each connection's bytes."""

    def __init__(self, version=(7, 0, 0), devices=((3 << 30, 8 << 30),), mode="serve", hello=None,
                 http_body=b'{"state": "idle"}'):
        self.version, self.devices, self.mode, self.hello = version, devices, mode, hello
        self.http_body = http_body
        self.received: list[bytearray] = []
        self.stopped = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)  # how often the accept loop looks at ``stopped``
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                self.received.append(bytearray())
                try:
                    self._serve(conn, self.received[-1])
                except ConnectionError:
                    pass  # the client hung up mid-reply (e.g. on a malformed one)

    def _recv(self, conn, n: int, log: bytearray) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        log += buf
        return buf

    def _serve(self, conn, log: bytearray) -> None:
        if self.mode == "close":
            return
        if self.mode == "silent":
            self.stopped.wait()
            return
        first = self._recv(conn, 1, log)
        if first == b"G" and self.mode == "http":
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(self.http_body), self.http_body))
            return
        if first != b"\x0e":  # llama.cpp: "Expected HELLO command, update client", and hangs up
            return
        while first is not None:
            head = self._recv(conn, 8, log)
            payload = self._recv(conn, struct.unpack("<Q", head)[0], log) if head else None
            if payload is None:
                return
            reply = self._reply(first[0], payload)
            conn.sendall(struct.pack("<Q", len(reply)) + reply)
            first = self._recv(conn, 1, log)

    def _reply(self, cmd: int, payload: bytes) -> bytes:
        if cmd == 14:
            return self.hello if self.hello is not None else bytes([*self.version, 0]) + bytes(24)
        if cmd == 15:
            return struct.pack("<I", len(self.devices))
        if cmd == 11:
            return struct.pack("<QQ", *self.devices[struct.unpack("<I", payload)[0]])
        raise AssertionError(f"unexpected command {cmd}")


@pytest.fixture
def fake():
    made: list[FakeWorker] = []

    def make(**kw) -> FakeWorker:
        made.append(FakeWorker(**kw))
        return made[-1]

    yield make
    for w in made:
        w.stop()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------------------ the protocol


def test_probe_reads_devices_and_sends_exactly_the_protocol(fake):
    w = fake(devices=((1, 2), (3 << 30, 24 << 30)))
    p = probe(w.endpoint)
    assert p == WorkerProbe(w.endpoint, (7, 0, 0), (RemoteDevice(0, 1, 2), RemoteDevice(1, 3 << 30, 24 << 30)))
    assert bytes(w.received[0]) == (
        HELLO
        + b"\x0f" + struct.pack("<Q", 0)
        + b"\x0b" + struct.pack("<Q", 4) + struct.pack("<I", 0)
        + b"\x0b" + struct.pack("<Q", 4) + struct.pack("<I", 1))


def test_newer_patch_accepted(fake):
    assert probe(fake(version=(7, 0, 9)).endpoint).version == (7, 0, 9)


@pytest.mark.parametrize("version", [(8, 0, 0), (6, 9, 0), (7, 1, 0)])
def test_version_mismatch(fake, version):
    w = fake(version=version)
    with pytest.raises(WorkerVersionError) as e:
        probe(w.endpoint)
    v = ".".join(map(str, version))
    assert str(e.value) == (f"worker {w.endpoint} speaks RPC protocol {v}, this head 7.0.0: install the same "
                            "llama-cpp-python (0.3.36) and RPC library on both")
    assert e.value.endpoint == w.endpoint
    assert bytes(w.received[0]) == HELLO  # nothing after the HELLO


def test_unreachable(fake):
    ep = f"127.0.0.1:{_free_port()}"
    with pytest.raises(WorkerError) as e:
        probe(ep)
    assert str(e.value) == (f"worker {ep} is unreachable (connection refused): start `edge-magistral rpc-worker` "
                            "there, or check the address")
    assert e.value.endpoint == ep
    with pytest.raises(WorkerError, match="unreachable"):
        fetch_info(ep)


def test_never_answers(fake):
    w = fake(mode="silent")
    with pytest.raises(WorkerError) as e:
        probe(w.endpoint, timeout_s=0.3)
    assert str(e.value) == (f"worker {w.endpoint} accepted the connection but did not answer within 0.3 s: it is "
                            "serving another head (one at a time) or is not an llama.cpp RPC worker")


def test_closes_at_once(fake):
    w = fake(mode="close")
    with pytest.raises(WorkerError) as e:
        probe(w.endpoint)
    assert str(e.value).startswith(f"worker {w.endpoint} closed the connection")
    assert str(e.value).endswith(": busy with another head, or not an RPC worker")


@pytest.mark.parametrize("hello, words", [
    (bytes([7, 0, 0, 0]) + bytes(23), "malformed reply (27 bytes to HELLO, not 28)"),
    (bytes([7, 0]), "malformed reply (2 bytes to HELLO)"),
])
def test_malformed_hello(fake, hello, words):
    w = fake(hello=hello)
    with pytest.raises(WorkerError) as e:
        probe(w.endpoint)
    assert f"worker {w.endpoint} sent a {words}: busy with another head, or not an RPC worker" == str(e.value)


def test_huge_reply_size_refused(fake):
    w = fake(hello=bytes(5000))
    with pytest.raises(WorkerError, match=r"malformed reply \(5000 bytes to command 14\)"):
        probe(w.endpoint)


def test_zero_devices(fake):
    w = fake(devices=())
    with pytest.raises(WorkerError) as e:
        probe(w.endpoint)
    assert str(e.value) == (f"worker {w.endpoint} serves no device: start `edge-magistral rpc-worker` there with "
                            "at least one device")


def test_error_pickles():
    e = pickle.loads(pickle.dumps(WorkerVersionError("10.0.0.2:50052", "worker 10.0.0.2:50052 speaks ...")))
    assert type(e) is WorkerVersionError and e.endpoint == "10.0.0.2:50052"
    assert str(e) == "worker 10.0.0.2:50052 speaks ..."


# ------------------------------------------------------------------------------ /info


def test_fetch_info_from_rpc_worker(fake):
    w = fake(mode="http", http_body=json.dumps({"state": "idle", "detect": {}}).encode())
    assert fetch_info(w.endpoint) == {"state": "idle", "detect": {}}


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b"\xff"])
def test_fetch_info_not_an_object(fake, body):
    assert fetch_info(fake(mode="http", http_body=body).endpoint) is None


def test_fetch_info_bare_server(fake):
    w = fake()
    assert fetch_info(w.endpoint) is None
    assert bytes(w.received[0]) == b"G"  # it hung up on the first byte, as llama.cpp's server does


def test_probe_with_info(fake):
    w = fake()
    p = probe_with_info(w.endpoint)
    assert p.info is None and p.devices == (RemoteDevice(0, 3 << 30, 8 << 30),)
    assert len(w.received) == 2 and bytes(w.received[0]).startswith(HELLO)


# ------------------------------------------------------------------------------ waiting


class FakeTime:
    def __init__(self, on_sleep=None):
        self.now = 100.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s
        if self.on_sleep:
            self.on_sleep()


def test_wait_until_workers_answer(fake):
    up, late = fake(), fake(mode="close")
    t = FakeTime(on_sleep=lambda: setattr(late, "mode", "serve") if len(t.sleeps) == 2 else None)
    waited: list[WorkerError] = []
    got = wait_for_workers([late.endpoint, up.endpoint], None, waited.append, 0.5, t.clock, t.sleep)
    assert [p.endpoint for p in got] == [late.endpoint, up.endpoint]
    assert t.sleeps == [0.5, 0.5]
    assert [e.endpoint for e in waited] == [late.endpoint] * 2
    assert "closed the connection" in str(waited[0])
    assert len(up.received) == 1  # a worker that answered is not probed again


def test_wait_times_out_with_last_error(fake):
    w = fake(mode="close")
    t = FakeTime()
    waited: list[WorkerError] = []
    with pytest.raises(WorkerError, match="closed the connection") as e:
        wait_for_workers([w.endpoint], 3.0, waited.append, 1.0, t.clock, t.sleep)
    assert e.value is waited[-1]
    assert t.sleeps == [1.0, 1.0, 1.0] and len(waited) == 4


def test_wait_raises_version_mismatch_at_once(fake):
    w = fake(version=(8, 0, 0))
    t = FakeTime()
    waited: list[WorkerError] = []
    with pytest.raises(WorkerVersionError):
        wait_for_workers([w.endpoint], None, waited.append, 1.0, t.clock, t.sleep)
    assert t.sleeps == [] and waited == []


def test_wait_returns_at_once_when_all_answer(fake):
    t = FakeTime()
    a, b = fake(), fake(devices=((5, 6), (7, 8)))
    got = wait_for_workers([a.endpoint, b.endpoint], 0.0, pytest.fail, 1.0, t.clock, t.sleep)
    assert [len(p.devices) for p in got] == [1, 2] and t.sleeps == []


# ------------------------------------------------------------------------------ a real worker


def test_real_llama_cpp_worker():
    from edge_magistral.rpc import backend

    why = backend.why_unavailable()
    if why:
        pytest.skip(why)
    endpoint = f"127.0.0.1:{_free_port()}"
    code = ("from edge_magistral.rpc import backend; "
            f"backend.serve_forever({endpoint!r}, None, 1, backend.serve_devices(True))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            try:
                p = probe(endpoint, timeout_s=10)
                break
            except WorkerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # polling for the server to listen, not racing it
        assert p.version == PROTO_VERSION
        assert len(p.devices) == 1 and p.devices[0].total_bytes > 0
        assert fetch_info(endpoint, timeout_s=10) is None
        assert probe(endpoint, timeout_s=10).version == PROTO_VERSION  # still serving after the HTTP try
    finally:
        proc.kill()
        proc.communicate()
