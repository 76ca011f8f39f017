"""Running ``edge-magistral rpc-worker`` as real processes for the cluster tests (llama.cpp's RPC
server blocks forever and the head aborts on a lost worker, so nothing here runs in-process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edge_magistral.rpc import backend
from edge_magistral.rpc.worker import free_port


@dataclass
class RpcWorker:
    """One ``rpc-worker`` command on loopback; ``endpoint`` is its host:port."""

    endpoint: str
    log: Path
    cache: Path
    proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> RpcWorker:
        cmd = [sys.executable, "-m", "edge_magistral", "rpc-worker", "--bind", self.endpoint,
               "--cache-dir", str(self.cache), "--threads", "1"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_idle()
        return self

    def wait_idle(self, timeout: float = 120) -> dict:
        """Until /info says the llama.cpp server behind it is up and free (no fixed sleeps)."""
        from edge_magistral.rpc.probe import fetch_info

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None and self.proc.poll() is None, f"rpc-worker exited\n{self.log_text()}"
            try:
                info = fetch_info(self.endpoint, 2.0)
            except Exception:
                info = None
            if info and info.get("state") == "idle":
                return info
            time.sleep(0.1)
        raise AssertionError(f"rpc-worker {self.endpoint} never became idle\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL the command and its llama.cpp child: a box that lost power."""
        import psutil

        if self.proc is None:
            return
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for p in [*kids]:
            p.kill()
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def new_worker(tmp: Path, name: str) -> RpcWorker:
    return RpcWorker(f"127.0.0.1:{free_port()}", tmp / f"{name}.log", tmp / f"{name}-cache")


def skip_reason() -> str | None:
    return backend.why_unavailable()
