"""The service under a (simulated) systemd: a real unix datagram socket as $NOTIFY_SOCKET receives
READY=1 after load and warm-up, then WATCHDOG=1 while the engine is healthy; a frozen engine stops
the pings and is restarted; SIGTERM sends STOPPING=1 and drains the request in flight, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import serve_harness
from serve_harness import Listener

pytestmark = pytest.mark.timeout(120)


def test_notify_liveness_stall_and_graceful_stop(tiny_gguf_f32, tmp_path):
    listener = Listener(str(tmp_path / "notify"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}  # WatchdogSec=2: a ping each 0.5 s
    server = serve_harness.start(tiny_gguf_f32, tmp_path, "--stall-timeout", "6", "--drain-timeout", "20",
                                 env=env, wait=False)
    try:
        # READY=1 only once the model is loaded and warmed up: /health agrees at that moment
        t_ready = listener.wait_for("READY=1", 60)
        assert httpx.get(f"{server.url}/health").status_code == 200
        time.sleep(2.5)
        assert len(listener.pings(t_ready)) >= 2

        # a frozen engine: the pings stop, then the worker is killed and a new one loaded
        worker = server.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        t_frozen = time.monotonic()
        t_status = listener.wait_for("STATUS=model worker hung (no progress for 6 s)", 15)
        last_ping = max(listener.pings(t_frozen - 2, t_status))
        assert t_status - last_ping >= 2.0  # silent for half the stall timeout: unhealthy, no pings
        server.wait_ready(60)
        assert server.worker_pid() != worker
        t_back = time.monotonic()
        time.sleep(2.5)
        assert len(listener.pings(t_back)) >= 2  # healthy again: the pings resume
        assert sum("READY=1" in m.splitlines() for _, m in listener.messages) == 1  # ready once, not per worker

        # SIGTERM mid-stream: STOPPING=1, no new requests, the stream in flight finishes, exit 0
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "max_thinking_tokens": 0,
                "stream": True}
        queued: list[httpx.Response] = []
        with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
            # the model worker holds still until the request is queued and the stop has begun, so
            # the stream cannot end first however fast or slow the machine (SIGCONT well inside
            # the 6 s stall timeout)
            worker = server.worker_pid()
            os.kill(worker, signal.SIGSTOP)
            try:
                waiter = threading.Thread(target=lambda: queued.append(server.client().post(
                    "/v1/chat/completions", json={**body, "stream": False})))
                waiter.start()
                _until(lambda: httpx.get(f"{server.url}/health").json()["queue"] == 1)
                server.proc.send_signal(signal.SIGTERM)
                listener.wait_for("STOPPING=1", 5)
            finally:
                os.kill(worker, signal.SIGCONT)
            with pytest.raises(httpx.HTTPError):  # the listener is closed
                httpx.get(f"{server.url}/health", timeout=2).raise_for_status()
            rest = list(lines)
            waiter.join(10)
        assert "data: [DONE]" in rest and '"finish_reason": "length"' in "".join(rest)  # finished, not cut
        assert queued[0].status_code == 503 and queued[0].json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(30) == 0, server.log_text()
        assert not psutil.pid_exists(worker)  # the model (and its memory) went with it
    finally:
        server.stop()
        listener.close()


def _until(condition, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met"
        time.sleep(0.02)


def test_a_model_that_cannot_load_never_reports_ready(tiny_gguf_f32, tmp_path):
    """A truncated GGUF fails the start with its reason, exit status of the error
    (found by the planning before the service listens)."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf_f32.read_bytes()[:200_000])
    listener = Listener(str(tmp_path / "notify"))
    try:
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "EDGE_MAGISTRAL_API_KEY": "k" * 24}
        r = subprocess.run([sys.executable, "-m", "edge_magistral", "serve", "--model", str(cut), "--port", "0"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 4, r.stderr  # CorruptModelError's exit code
        assert "cannot load the model" in r.stderr and "listening on" not in r.stderr
        time.sleep(0.1)  # the last datagrams
        assert not any("READY=1" in m for _, m in listener.messages)
        assert any(m.startswith("STATUS=failed: cannot load the model") for _, m in listener.messages)
    finally:
        listener.close()
