"""The service against its host: a GPU the build cannot use or a model that does not fit stops the
start before READY; the kernel's OOM killer taking the worker is a 503, a clean
restart and a clear log line (7); repetitive log lines are rate-limited (30)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import serve_harness
from serve_harness import Listener

from edge_magistral import llama_log
from edge_magistral.hardware import RecordedReader, detect
from edge_magistral.log_limit import RateLimitFilter, install

pytestmark = pytest.mark.timeout(120)
HW = Path(__file__).parent / "data" / "hardware"


# ------------------------------------------------------------------ 5: fail before ready

def _recorded(box: str, tmp: Path, **override: int) -> Path:
    """A recorded box as `detect --json` writes it, some fields overridden."""
    d = detect(RecordedReader(str(HW / box))).to_dict()
    path = tmp / f"{box}.json"
    path.write_text(json.dumps({**d, **override}))
    return path


def _serve_failing(model: Path, tmp: Path, hardware: Path) -> tuple[int, str, list[str]]:
    """Run `serve` under a fake systemd; its exit status, its output and the sd_notify messages."""
    listener = Listener(str(tmp / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify"), "EDGE_MAGISTRAL_API_KEY": "k" * 24}
    try:
        r = subprocess.run([sys.executable, "-m", "edge_magistral", "serve", "--model", str(model), "--port", "0",
                            "--ctx", "1024", "--hardware", str(hardware)],
                           capture_output=True, text=True, env=env, timeout=60)
        time.sleep(0.1)  # the last datagrams
        return r.returncode, r.stdout + r.stderr, [m for _, m in listener.messages]
    finally:
        listener.close()


def test_a_gpu_the_build_cannot_use_stops_the_start_with_the_fix(tiny_gguf_f32, tmp_path):
    code, out, notes = _serve_failing(tiny_gguf_f32, tmp_path, _recorded("rtx3090-cpu-build", tmp_path))
    assert code == 8, out  # BackendError
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "RTX 3090 is present but the installed llama.cpp has no backend" in errors[0], out
    assert 'fix: CMAKE_ARGS="-DGGML_CUDA=on" pip install' in errors[0]
    assert "listening on" not in out  # refused before binding, let alone loading
    assert not any("READY=1" in m for m in notes)
    assert any(m.startswith("STATUS=failed: cannot load the model") for m in notes), notes


def test_a_model_that_does_not_fit_stops_the_start(tiny_gguf_f32, tmp_path):
    box = _recorded("cpu-only-32gb", tmp_path, ram_total_bytes=8 << 20, ram_available_bytes=4 << 20)
    code, out, notes = _serve_failing(tiny_gguf_f32, tmp_path, box)
    assert code == 5, out  # DoesNotFitError
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load the model" in errors[0], out
    assert "listening on" not in out
    assert not any("READY=1" in m for m in notes)


# --------------------------------------------------------------- 7: the kernel's OOM killer

class MemoryCgroup:
    """A child of this process's memory cgroup (v1 or v2) with a memory limit, for one test."""

    def __init__(self, name: str):
        self.path = self._parent() / name
        self.v1 = "/memory/" in f"{self.path}/"
        self.path.mkdir()

    @staticmethod
    def _parent() -> Path:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                return Path(f"/sys/fs/cgroup/memory{rel}")
        rel = next(rel for _, c, rel in (line.split(":", 2) for line in lines) if c == "")
        parent = Path(f"/sys/fs/cgroup{rel}")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            raise OSError("the memory controller is not enabled for child cgroups")
        return parent

    def limit(self, nbytes: int) -> None:
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(nbytes))

    def move(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        text = (self.path / ("memory.oom_control" if self.v1 else "memory.events")).read_text()
        return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill "))

    def remove(self) -> None:
        for _ in range(50):  # the dead worker leaves it as soon as it is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _cgroup() -> MemoryCgroup:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    try:
        cg = MemoryCgroup(f"edge-magistral-oom-{os.getpid()}")
        cg.limit(64 << 10)  # a generating worker touches ~0.5 MiB of new pages within a second or two
    except (OSError, StopIteration) as e:
        pytest.skip(f"no writable memory cgroup here: {e}")
    return cg


def test_an_oom_killed_worker_is_a_503_then_a_clean_restart(tiny_gguf_f32, tmp_path):
    cg = _cgroup()
    server = serve_harness.start(tiny_gguf_f32, tmp_path)
    try:
        result: dict = {}
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900, "max_thinking_tokens": 0}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", server.client().post("/v1/chat/completions", json=body)))
        t.start()
        serve_harness.until(lambda: serve_harness.health(server).get("generating"), what="generating")
        worker = server.worker_pid()
        cg.move(worker)  # 64 KiB for what it touches from now on (what it holds stays charged outside)
        t.join(30)
        r = result["r"]
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["code"] == "worker_crashed" and "out of memory" in r.json()["error"]["message"]
        assert cg.oom_kills() == 1  # the kernel did it, not a stray signal

        server.wait_ready(60)
        assert server.worker_pid() != worker
        again = server.client().post("/v1/chat/completions", json={**body, "max_tokens": 8})
        assert again.status_code == 200, again.text
        assert serve_harness.metric(server, "edge_magistral_worker_failures_total", reason="killed") == 1
        logged = [line for line in server.log_text().splitlines() if "model worker killed" in line]
        assert len(logged) == 1, logged
        assert "SIGKILL: out of memory: the kernel's OOM killer, memory cgroup" in logged[0]
    finally:
        assert server.stop() == 0, server.log_text()
        cg.remove()


# ------------------------------------------------------------------------ 30: log floods

class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def captured():
    """A logger whose handler rate-limits (burst 3 per 10 s, fake clock) and keeps what passes."""
    clock = _Clock()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(f"{record.name}: {record.getMessage()}")
    logger = logging.getLogger("test.flood")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    limiter = install(["test.flood"], RateLimitFilter(burst=3, interval_s=10, clock=clock))
    yield logger, lines, clock, limiter
    logger.removeHandler(handler)


def test_a_flood_is_cut_to_the_burst_then_summarized(captured):
    logger, lines, clock, _ = captured
    for i in range(100):
        logger.warning("request %d failed after %d ms", i, i * 7)  # similar: only the numbers differ
    assert lines == [f"test.flood: request {i} failed after {i * 7} ms" for i in range(3)]
    logger.warning("something else")  # another kind of line has its own allowance
    clock.t += 10
    logger.warning("request 100 failed after 1 ms")
    assert lines[4:] == ["test.flood: suppressed 97 similar messages in 10 s, the last: request 99 failed after "
                         "693 ms", "test.flood: request 100 failed after 1 ms"]


def test_the_summary_comes_with_any_later_line(captured):
    logger, lines, clock, _ = captured
    for _ in range(5):
        logger.error("disk full")
    clock.t += 11
    logger.info("a different line")
    assert lines == ["test.flood: disk full"] * 3 + [
        "test.flood: suppressed 2 similar messages in 10 s, the last: disk full", "test.flood: a different line"]


def test_the_kinds_of_line_tracked_are_bounded():
    limiter = RateLimitFilter(burst=1, interval_s=10, max_keys=4, clock=_Clock())
    for i in range(100):
        limiter.filter(logging.LogRecord("x", logging.INFO, "", 0, f"line {chr(65 + i % 26)}{i}", None, None))
    assert len(limiter._windows) == 4


def test_llama_cpp_log_floods_are_limited(monkeypatch):
    """llama.cpp's lines (one template, "%s") are told apart by their text and limited too."""
    clock = _Clock()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    handler.addFilter(RateLimitFilter(burst=2, interval_s=10, clock=clock))
    monkeypatch.setattr(llama_log.log, "handlers", [handler])
    monkeypatch.setattr(llama_log.log, "propagate", False)
    monkeypatch.setattr(llama_log.log, "level", logging.DEBUG)
    for _ in range(50):
        llama_log._on_log(2, b"ggml_cuda_compute_forward: slow op 12\n", None)
    llama_log._on_log(2, b"llama_context: n_ctx = 1024\n", None)
    clock.t += 10
    llama_log._on_log(2, b"ggml_cuda_compute_forward: slow op 13\n", None)
    assert lines == ["ggml_cuda_compute_forward: slow op 12"] * 2 + ["llama_context: n_ctx = 1024",
                     "suppressed 48 similar messages in 10 s, the last: ggml_cuda_compute_forward: slow op 12",
                     "ggml_cuda_compute_forward: slow op 13"]
