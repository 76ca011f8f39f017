"""``rpc-worker``: the allow-list policy, the unit file, and the command for real (llama.cpp's RPC
server in a supervised child behind the relay), down to a head's model loading through it."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_magistral.errors import BadInputError
from edge_magistral.rpc import backend
from edge_magistral.rpc.relay import route
from edge_magistral.rpc.worker import check_bind, next_backoff, peer_allowed
from edge_magistral.systemd import install as sd_install
from edge_magistral.systemd.rpc_unit import RPC_UNIT_NAME, RpcUnitConfig, install_rpc_unit, render_rpc_unit
from edge_magistral.systemd.unit import UnitConfig, render_unit

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache" / "test-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONSOLE_SCRIPT = Path(sys.executable).parent / "edge-magistral"
HELLO = struct.pack("<BQ", 14, 24) + bytes(24)
DEVICE_COUNT = struct.pack("<BQ", 15, 0)


def _cli():
    from edge_magistral.cli import cli, rpc_cmds  # noqa: F401  (registers the commands)

    return cli


# ================================================================================ policy


def test_a_loopback_bind_needs_no_allow_list() -> None:
    assert str(check_bind("127.0.0.1:50052", [])) == "127.0.0.1:50052"
    assert check_bind("localhost", []).port == 50052


@pytest.mark.parametrize("bind", ["0.0.0.0:50052", "10.0.0.2:50052", "[::]:50052"])
def test_a_network_bind_without_heads_is_refused_with_why_and_how(bind: str) -> None:
    with pytest.raises(BadInputError) as e:
        check_bind(bind, [])
    msg = str(e.value)
    assert "\n" not in msg and "--allow HEAD_IP" in msg and "run code" in msg and "WireGuard" in msg
    assert check_bind(bind, ["10.0.0.1"]).host in (bind.rpartition(":")[0], "::")


@pytest.mark.parametrize("allow", ["head.lan", "10.0.0.300", "0.0.0.0/0", "::/0"])
def test_an_allow_entry_must_be_an_address_or_a_network_of_some(allow: str) -> None:
    with pytest.raises(BadInputError):
        check_bind("10.0.0.2:50052", [allow])


@pytest.mark.parametrize(("peer", "allow", "bind", "ok"), [
    ("127.0.0.1", [], "127.0.0.1", True),
    ("127.0.0.5", ["10.0.0.1"], "0.0.0.0", True),  # loopback: always
    ("::1", ["10.0.0.1"], "::", True),
    ("10.0.0.1", ["10.0.0.1"], "0.0.0.0", True),
    ("10.0.0.7", ["10.0.0.0/24"], "10.0.0.2", True),
    ("::ffff:10.0.0.1", ["10.0.0.1"], "::", True),  # an IPv4 head on a dual-stack socket
    ("10.0.0.9", ["10.0.0.1"], "0.0.0.0", False),
    ("192.168.1.5", ["10.0.0.0/24"], "10.0.0.2", False),
    ("fe80::1", ["10.0.0.1"], "::", False),
    ("not an ip", ["10.0.0.1"], "0.0.0.0", False),
])
def test_peer_allowed(peer: str, allow: list[str], bind: str, ok: bool) -> None:
    assert peer_allowed(peer, allow, bind) is ok


def test_backoff_doubles_to_30_s_and_resets_after_a_stable_minute() -> None:
    delay, waits = 1.0, []
    for _ in range(7):
        wait, delay = next_backoff(delay, ran_s=2)
        waits.append(wait)
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert next_backoff(delay, ran_s=61)[0] == 1


def test_http_answers_info_only() -> None:
    info = {"state": "idle"}
    ok = route("GET /info HTTP/1.1", lambda: info)
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"application/json" in ok
    assert json.loads(ok.split(b"\r\n\r\n", 1)[1]) == info
    assert route("GET /info?x=1 HTTP/1.0", lambda: info).startswith(b"HTTP/1.1 200")
    assert route("GET / HTTP/1.1", lambda: info).startswith(b"HTTP/1.1 404")
    assert route("POST /info HTTP/1.1", lambda: info).startswith(b"HTTP/1.1 405")


# ================================================================================ the unit


def _unit(**kw) -> str:
    return render_rpc_unit(RpcUnitConfig(bind="10.0.0.2:50052", allow=("10.0.0.1", "10.0.1.0/24"), **kw))


def test_the_unit_admits_exactly_the_heads() -> None:
    text = _unit()
    assert [ln for ln in text.splitlines() if ln.startswith("IPAddress")] == [
        "IPAddressAllow=localhost 10.0.0.1 10.0.1.0/24", "IPAddressDeny=any"]
    (start,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    assert start.split()[1:] == ["rpc-worker", "--bind", "10.0.0.2:50052", "--allow", "10.0.0.1", "--allow",
                                 "10.0.1.0/24", "--cache-dir", "%S/edge-magistral-rpc-worker/rpc-cache"]


def test_the_unit_has_the_main_units_hardening_and_its_own_directories() -> None:
    ours = _unit().splitlines()
    main = render_unit(UnitConfig()).splitlines()
    start = main.index("DynamicUser=yes")
    skipped = ("StateDirectory", "CacheDirectory", "LogsDirectory", "ConfigurationDirectory", "IPAddress")
    for line in main[start:]:
        if line and not line.startswith("#") and not line.startswith(skipped):
            assert line in ours, line
    for line in ("StateDirectory=edge-magistral-rpc-worker", "CacheDirectory=edge-magistral-rpc-worker",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure", "DevicePolicy=closed"):
        assert line in ours, line
    assert "StateDirectory=edge-magistral" not in ours and "CacheDirectory=edge-magistral" not in ours
    assert not any(ln.startswith(("LogsDirectory", "ConfigurationDirectory")) for ln in ours)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing: `apt-get install -y systemd` (Debian) to check the unit")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    spaced = tmp_path / "opt dir%"
    spaced.mkdir()
    (spaced / "edge-magistral").symlink_to(CONSOLE_SCRIPT)
    path = tmp_path / RPC_UNIT_NAME
    path.write_text(_unit(exec_path=str(spaced / "edge-magistral"), use_cpu=True, threads=4))
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert RPC_UNIT_NAME not in r.stderr, r.stderr


def test_install_writes_the_unit_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sd_install, "gpu_boot_notes", lambda: [])
    c = RpcUnitConfig(bind="10.0.0.2:50052", allow=("10.0.0.1",), exec_path="/opt/em/bin/edge-magistral")
    first = install_rpc_unit(c, tmp_path)
    assert first.written == [tmp_path / RPC_UNIT_NAME] and first.daemon_reload.startswith("skipped")
    assert (tmp_path / RPC_UNIT_NAME).read_text() == render_rpc_unit(c)
    again = install_rpc_unit(c, tmp_path)
    assert again.written == [] and again.unchanged == [tmp_path / RPC_UNIT_NAME]
    assert [p.name for p in tmp_path.iterdir()] == [RPC_UNIT_NAME]  # no staging file left


def test_install_cli_dry_run_and_refusals(tmp_path: Path) -> None:
    args = ["install-rpc-worker", "--bind", "10.0.0.2:50052", "--exec", "/opt/em/bin/edge-magistral",
            "--unit-dir", str(tmp_path)]
    r = CliRunner().invoke(_cli(), [*args, "--allow", "10.0.0.1", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "IPAddressAllow=localhost 10.0.0.1\n" in r.output and not list(tmp_path.iterdir())
    r = CliRunner().invoke(_cli(), args)
    assert r.exit_code == 2 and "--allow HEAD_IP" in r.output


def test_a_network_bind_without_allow_exits_2_with_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "edge_magistral", "rpc-worker", "--bind", "0.0.0.0:50052"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--allow HEAD_IP" in r.stderr, r.stderr


# ================================================================================ for real

needs_rpc = pytest.mark.skipif(backend.why_unavailable() is not None, reason=str(backend.why_unavailable()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """One ``rpc-worker`` command on a free loopback port."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = tmp / f"worker-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_magistral", "rpc-worker", "--bind",
                                          self.endpoint, "--cache-dir", str(tmp / "cache"), "--threads", "1"],
                                         stdout=out, stderr=subprocess.STDOUT)

    def info(self) -> dict | None:
        from edge_magistral.rpc.probe import fetch_info

        try:
            return fetch_info(self.endpoint, 10.0)
        except Exception:
            return None

    def wait_for(self, pred, what: str, timeout: float = 90.0, seen: list | None = None) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"rpc-worker exited\n{self.log.read_text()}"
            info = self.info()
            if info is not None:
                if seen is not None:
                    seen.append(info["state"])
                if pred(info):
                    return info
            time.sleep(0.05)
        raise AssertionError(f"rpc-worker never {what}: {self.info()}\n{self.log.read_text()}")

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return s

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def _closed(s: socket.socket) -> bool:
    """The peer hung up (an orderly close, or a reset since it left our bytes unread)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _call(s: socket.socket, request: bytes) -> bytes:
    s.sendall(request)
    (size,) = struct.unpack("<Q", _recv(s, 8))
    return _recv(s, size)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    if reason := backend.why_unavailable():
        pytest.skip(reason)
    w = Worker(tmp_path_factory.mktemp("rpcw"))
    try:
        w.wait_for(lambda i: i["state"] == "idle", "became idle")
        yield w
    finally:
        w.stop()


@needs_rpc
def test_info_describes_the_box_and_the_childs_devices(worker: Worker) -> None:
    info = worker.info()
    assert info is not None
    assert info["service"] == "edge-magistral rpc-worker" and info["protocol"] == "7.0.0"
    assert info["bind"] == worker.endpoint and info["client"] is None and info["restarts"] == 0
    assert info["devices"] and {"name", "description", "kind", "free_bytes", "total_bytes"} <= set(info["devices"][0])
    assert info["devices"][0]["total_bytes"] > 0
    assert info["detect"]["ram_total_bytes"] > 0 and "cpu" in info["detect"]
    assert isinstance(info["child_pid"], int) and info["child_pid"] != worker.proc.pid


@needs_rpc
def test_rpc_through_the_relay_one_head_at_a_time(worker: Worker) -> None:
    before = worker.info()
    assert before is not None
    with worker.connect() as s:
        reply = _call(s, HELLO)
        assert len(reply) == 28 and reply[0] == 7
        (count,) = struct.unpack("<I", _call(s, DEVICE_COUNT))
        assert count == len(before["devices"])
        with worker.connect() as second:
            second.sendall(HELLO)
            assert _closed(second)  # another head holds the server
        info = worker.info()
        assert info is not None and info["state"] == "serving"
        assert info["client"] == f"127.0.0.1:{s.getsockname()[1]}"
    after = worker.wait_for(lambda i: i["state"] == "idle", "became idle again")
    assert after["bytes_to_worker"] - before["bytes_to_worker"] == len(HELLO) + len(DEVICE_COUNT)
    assert after["bytes_from_worker"] - before["bytes_from_worker"] == 8 + 28 + 8 + 4


@needs_rpc
def test_anything_else_is_closed(worker: Worker) -> None:
    with worker.connect() as s:
        s.sendall(b"\x00junk")
        assert _closed(s)


_HEAD = """
import sys
from edge_magistral.rpc import backend
workers = sys.argv[2:]
if workers:
    backend.register_workers(workers)
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_gpu_layers=30 if workers else 0, n_ctx=256, seed=1, verbose=False)
out = llm("The capital of France is", max_tokens=8, temperature=0.0, top_k=1)
print(repr(out["choices"][0]["text"]))
"""


def _complete(*workers: str) -> str:
    r = subprocess.run([sys.executable, "-c", _HEAD, str(MODEL), *workers], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


@needs_rpc
@pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing: the test model is fetched by the test setup")
def test_a_head_loads_and_generates_through_the_relay(worker: Worker) -> None:
    before = worker.info()
    assert before is not None
    remote = _complete(worker.endpoint)
    after = worker.wait_for(lambda i: i["state"] == "idle", "became idle after the head")
    assert after["bytes_to_worker"] - before["bytes_to_worker"] > 30 << 20  # the weights went through it
    assert remote == _complete()
    assert len(remote) > 5


@needs_rpc
def test_a_dead_child_is_restarted_and_sigterm_stops_everything(tmp_path: Path) -> None:
    import psutil

    w = Worker(tmp_path)
    try:
        first = w.wait_for(lambda i: i["state"] == "idle", "became idle")
        psutil.Process(first["child_pid"]).kill()
        seen: list[str] = []
        again = w.wait_for(lambda i: i["state"] == "idle" and i["restarts"] == 1, "restarted", seen=seen)
        assert "restarting" in seen
        assert again["child_pid"] not in (None, first["child_pid"])
        with w.connect() as s:
            assert _call(s, HELLO)[0] == 7
    finally:
        code = w.stop()
    assert code == 0, w.log.read_text()
    assert not psutil.pid_exists(again["child_pid"]) or psutil.Process(again["child_pid"]).status() == "zombie"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", w.port), timeout=5).close()
