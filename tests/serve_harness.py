"""Running ``edge-magistral serve`` as a real process for the service tests (signals, crashes and
exit codes are part of what is tested, so the server is never run in-process here)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

API_KEY = "test-key-0123456789abcdef"
_URL = re.compile(r"listening on (http://\S+)")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    key: str | None = API_KEY
    env: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def worker_pid(self, timeout: float = 30) -> int:
        """The model worker (the spawned child; multiprocessing's resource tracker is the other one)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for c in psutil.Process(self.proc.pid).children():
                try:
                    if "spawn_main" in " ".join(c.cmdline()):
                        return c.pid
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"no worker process\n{self.log_text()}")

    def wait_ready(self, timeout: float = 90) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode})\n{self.log_text()}"
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not become ready\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start(model: Path, tmp: Path, *args: str, key: str | None = API_KEY, env: dict | None = None,
          wait: bool = True) -> Server:
    """Start a server on a free port (``--port 0``) and wait until /health says ready."""
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    full_env = {**os.environ, **(env or {})}
    full_env.pop("EDGE_MAGISTRAL_API_KEY", None)
    if key:
        full_env["EDGE_MAGISTRAL_API_KEY"] = key
    cmd = [sys.executable, "-m", "edge_magistral", "serve", "--model", str(model), "--port", "0",
           "--ctx", "1024", "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=full_env)
    end = time.monotonic() + 30
    url = None
    while url is None:
        assert time.monotonic() < end and proc.poll() is None, f"no URL from the server\n{log.read_text()}"
        m = _URL.search(log.read_text(errors="replace"))
        url = m.group(1) if m else None
        time.sleep(0.05)
    server = Server(proc, url, log, key, env or {})
    if wait:
        server.wait_ready()
    return server


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data payloads of a streamed response (``[DONE]`` as the string)."""
    out: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
