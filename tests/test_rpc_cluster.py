"""Layers across boxes, for real: two ``rpc-worker`` processes on 127.0.0.1 (llama.cpp's CPU
backend behind its RPC server) and a head. Greedy output split across them equals a local run;
the planner's per-worker memory matches what llama.cpp allocated there; a dead, mismatched or
public worker is a one-line error, never an aborted head; a worker lost mid-request is a 503, and
the service waits for it and recovers.

Skipped, with the reason, where llama.cpp's RPC backend is not installed
(``python scripts/build_rpc_backend.py`` installs it in seconds)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import rpc_harness
import serve_harness

pytestmark = pytest.mark.skipif(rpc_harness.skip_reason() is not None, reason=rpc_harness.skip_reason() or "")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rpc")
    ws = [rpc_harness.new_worker(tmp, f"w{i}") for i in range(2)]
    for w in ws:
        w.start(wait=False)
    try:
        for w in ws:
            w.wait_idle()
        yield ws
    finally:
        for w in ws:
            w.stop()


def _split(model: Path, endpoints: list[str], layers: list[int], limits: dict) -> dict:
    """A local run, then the same model split across the workers, in a process of its own
    (``rpc_split_child.py``: llama.cpp keeps workers for the life of a process)."""
    child = Path(__file__).with_name("rpc_split_child.py")
    pins = [f"{ep}={n}" for ep, n in zip(endpoints, layers, strict=True)]
    r = subprocess.run([sys.executable, str(child), str(model), json.dumps(limits), *pins],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_split(out: dict, endpoints: list[str], tolerance: float) -> None:
    """Layers on both workers; the weights and KV cache llama.cpp put on each exactly as planned
    (to its logged hundredths of a MiB), and all its buffers there (with the compute buffer)
    within ``tolerance`` of the plan."""
    planned = {w["endpoint"]: w for w in out["cluster"]["workers"]}
    buffers = out["buffers"]
    assert set(buffers) == set(endpoints) == set(planned)
    assert out["cluster"]["output_device"] == "CPU" and out["output_on_host"]  # the head keeps the logits
    for ep in endpoints:
        mem, got = planned[ep]["memory"], buffers[ep]
        assert planned[ep]["layers"] > 0 and got["weights"] > 0, (planned[ep], got)
        for kind in ("weights", "kv_cache"):
            assert abs(mem[kind] - got[kind]) <= 0.01 * got[kind] + 10_000, (ep, kind, mem, got)
        assert abs(mem["buffers"] - got["total"]) <= tolerance * got["total"], (ep, mem, got)


def test_smollm2_split_across_two_workers_is_identical_to_a_local_run(workers, smollm2_gguf: Path) -> None:
    eps = [w.endpoint for w in workers]
    out = _split(smollm2_gguf, eps, [12, 9], {"temperature": 0.0, "max_tokens": 40})
    (want, n_local), (got, n) = out["want"], out["got"]
    assert got == want and n == n_local >= 16
    _check_split(out, eps, 0.05)


def test_tiny_magistral_split_across_two_workers_is_identical_to_a_local_run(workers, tiny_gguf_f32: Path) -> None:
    eps = [w.endpoint for w in workers]
    out = _split(tiny_gguf_f32, eps, [1, 1], {"temperature": 0.0, "max_tokens": 48, "think_budget": 0, "seed": 1})
    (want, n_local), (got, n) = out["want"], out["got"]
    assert got == want and n == n_local > 0
    # One layer per worker: the compute buffer is most of what a worker holds, and for this tiny
    # shape (n_ff = 2 x n_embd) ggml-alloc packs the last device's tighter than the live tensors
    # the plan counts (3.5 MiB against 4.5 MiB): within 20% here, exact for SmolLM2's shape.
    _check_split(out, eps, 0.20)


def test_a_process_that_used_workers_refuses_a_load_without_them(workers, smollm2_gguf: Path) -> None:
    """llama.cpp loads onto every RPC worker a process ever registered: a later load without them
    is refused in one line instead of reaching a worker that may be gone (an abort)."""
    code = ("import sys\n"
            "from edge_magistral.rpc import backend\n"
            "from edge_magistral.errors import BackendError\n"
            "from edge_magistral.engine import Engine\n"
            "from edge_magistral.generation import LoadSettings\n"
            "backend.register_workers([sys.argv[1]])\n"
            "try:\n"
            "    Engine(LoadSettings(sys.argv[2], n_ctx=256, n_threads=1))\n"
            "except BackendError as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code, workers[0].endpoint, str(smollm2_gguf)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"refused: this process placed layers on RPC worker(s) {workers[0].endpoint} before" in r.stdout


def test_plan_reads_running_workers_boxes(workers, smollm2_gguf: Path, tmp_path: Path) -> None:
    """`plan --cluster` probes the workers and plans with the boxes they publish (pinned layers
    where the file pins them); nothing is loaded."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("workers:\n" + "".join(f"  - address: {w.endpoint}\n    layers: {n}\n    link_mbit: 100\n"
                                              for w, n in zip(workers, (12, 9), strict=True)))
    r = subprocess.run([sys.executable, "-m", "edge_magistral", "plan", "--model", str(smollm2_gguf), "--ctx", "512",
                        "--cluster", str(cluster), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.loads(r.stdout)["cluster"]
    assert [(w["endpoint"], w["layers"], w["link_mbit"]) for w in c["workers"]] == [
        (workers[0].endpoint, 12, 100.0), (workers[1].endpoint, 9, 100.0)]
    assert c["output_device"] == "CPU" and c["first_load_bytes"] > 0 and c["tokens_per_s"] < c["tokens_per_s_no_link"]


def test_install_service_with_workers_writes_the_cluster_and_admits_them(workers, smollm2_gguf: Path,
                                                                          tmp_path: Path) -> None:
    """The service's unit keeps its loopback-only IPAddressAllow= and admits the workers too; the
    config names a cluster file written beside it (printed here: nothing is installed)."""
    args = ["install-service", "--model", str(smollm2_gguf), "--ctx", "512", "--print", "--exec", sys.executable,
            "--unit-dir", str(tmp_path / "units"), "--config-dir", str(tmp_path / "etc")]
    for w in workers:
        args += ["--worker", w.endpoint]
    r = subprocess.run([sys.executable, "-m", "edge_magistral", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IPAddressAllow=localhost 127.0.0.1\n" in r.stdout and "IPAddressDeny=any" in r.stdout
    assert f'cluster: "{tmp_path / "etc" / "cluster.yaml"}"' in r.stdout
    from edge_magistral.rpc.endpoints import load_cluster

    text = r.stdout.split(f"# {tmp_path / 'etc' / 'cluster.yaml'}\n", 1)[1]
    (tmp_path / "back.yaml").write_text(text)
    assert load_cluster(tmp_path / "back.yaml").endpoints == [w.endpoint for w in workers]


# ------------------------------------------------------------------ bad workers: one line, no abort

def _run_cli(model: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edge_magistral", "run", "--model", str(model), "--max-tokens", "4", *args, "Hi"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr[-2000:]


def test_an_unreachable_worker_is_a_one_line_error(smollm2_gguf: Path) -> None:
    port = rpc_harness.free_port()  # nobody listens there
    _one_line_error(_run_cli(smollm2_gguf, "--worker", f"127.0.0.1:{port}"), 8, "unreachable", str(port))


class _OldServer:
    """A server speaking another RPC protocol version (6.1.0): a head of this version must refuse it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    head = conn.recv(9)
                    if head[:1] == b"\x0e":
                        conn.recv(struct.unpack("<Q", head[1:9])[0])
                        conn.sendall(struct.pack("<Q", 28) + bytes([6, 1, 0, 0]) + bytes(24))
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_worker_of_another_protocol_version_is_a_one_line_error(smollm2_gguf: Path) -> None:
    old = _OldServer()
    try:
        _one_line_error(_run_cli(smollm2_gguf, "--worker", old.endpoint), 8, "6.1.0", "7.0.0")
    finally:
        old.close()


def test_a_public_worker_address_is_refused_unless_allowed(smollm2_gguf: Path) -> None:
    _one_line_error(_run_cli(smollm2_gguf, "--worker", "8.8.8.8:50052"), 2, "public", "--allow-public-worker")


# ------------------------------------------------------------------ the service

def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=120)


def _until(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := cond()) is not None:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_lost_mid_request_is_a_503_and_the_service_waits_for_it(tmp_path: Path,
                                                                          tiny_gguf_f32: Path) -> None:
    w = rpc_harness.new_worker(tmp_path, "lost")
    try:
        w.start()
        _lose_a_worker_mid_request(w, tmp_path, tiny_gguf_f32)
    finally:
        w.stop()


def _lose_a_worker_mid_request(w, tmp_path: Path, model: Path) -> None:
    cluster = tmp_path / "cluster.yaml"  # both layers there (the planner would keep them on this box)
    cluster.write_text(f"workers:\n  - address: {w.endpoint}\n    layers: 2\n")
    server = serve_harness.start(model, tmp_path, "--cluster", str(cluster), "--speculate", "off")
    try:
        health = httpx.get(f"{server.url}/health").json()
        [entry] = health["workers"]
        assert entry["endpoint"] == w.endpoint and entry["buffers"]["weights"] > 0  # the remote buffers
        result: dict = {}
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 900, "max_thinking_tokens": 0}
        t = threading.Thread(target=lambda: result.setdefault("r", _post(server, body)))
        t.start()
        _until(lambda: True if httpx.get(f"{server.url}/health").json().get("generating") else None, 60,
               f"the request to start ({result.get('r') and result['r'].text})")
        w.kill()
        t.join(120)
        r = result["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_crashed", r.text
        # the service stays up and says which worker it waits for
        waiting = _until(lambda: httpx.get(f"{server.url}/health").json().get("waiting_for_worker"), 60,
                         "health to name the worker")
        assert waiting["endpoint"] == w.endpoint and "unreachable" in waiting["reason"]
        assert server.proc.poll() is None
        w.start()  # the worker comes back on the same address
        server.wait_ready(180)
        ok = _post(server, {**body, "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    finally:
        code = server.stop()
    assert code == 0, server.log_text()[-3000:]
