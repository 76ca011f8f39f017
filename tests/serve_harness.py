"""Running ``edge-magistral serve`` as a real process for the service tests (signals, crashes and
exit codes are part of what is tested, so the server is never run in-process here)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
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
          wait: bool = True, verbose: int = 0) -> Server:
    """Start a server on a free port (``--port 0``) and wait until /health says ready; its stdout
    and stderr both go to ``server.log``; ``verbose``: the number of ``-v``."""
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    full_env = {**os.environ, **(env or {})}
    full_env.pop("EDGE_MAGISTRAL_API_KEY", None)
    if key:
        full_env["EDGE_MAGISTRAL_API_KEY"] = key
    cmd = [sys.executable, "-m", "edge_magistral", *(["-" + "v" * verbose] if verbose else []), "serve",
           "--model", str(model), "--port", "0", "--ctx", "1024", "--threads", "1", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
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


def wait_idle(server: Server, timeout: float = 10) -> None:
    """Wait until the engine is free (a previous test's cancelled request has ended)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = httpx.get(f"{server.url}/health", timeout=5).json()
        if h.get("status") == "ok" and not h["generating"] and h["queue"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine stayed busy: {h}")


def ttft(server: Server, body: dict) -> float:
    """Seconds to the first answer text of a streamed chat request."""
    t0 = time.monotonic()
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                return time.monotonic() - t0
    raise AssertionError("no content")


def metric(server: Server, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent), e.g. metric(s, "x_total", reason="y")."""
    text = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    sample = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Listener:
    """Collects sd_notify datagrams with the time they arrived."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, timeout: float, after: float = 0.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, m in list(self.messages):
                if t >= after and any(line.startswith(text) for line in m.splitlines()):
                    return t
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout} s: {self.messages}")

    def pings(self, since: float, until: float | None = None) -> list[float]:
        until = until or time.monotonic()
        return [t for t, m in list(self.messages) if "WATCHDOG=1" in m.splitlines() and since <= t <= until]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def until(condition, timeout: float = 10, interval: float = 0.02, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        time.sleep(interval)


def health(server: Server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=5).json()


def raw_request(server: Server, body: dict, path: str = "/v1/chat/completions", rcvbuf: int | None = None
                ) -> socket.socket:
    """Send a whole POST on a plain socket and return the socket, unread (a client that may
    then vanish, or never read)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so that the advertised window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def error_lines(log_text: str) -> list[str]:
    """Lines of a server log that report an error (ours, uvicorn's, or a traceback)."""
    return [line for line in log_text.splitlines() if line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line]
