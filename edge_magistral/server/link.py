"""One worker process and the two threads that talk to it, for the supervisor.

The pipe's blocking reads and writes happen on these threads, never on the event loop: a frozen
worker must not block the loop (so /health and systemd's liveness pings keep working). The link
also keeps the evidence of how the worker ended: its exit status and, for a SIGKILL nobody here
sent, whether the kernel's OOM killer counted a kill in its memory cgroup.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable

from edge_magistral.server.protocol import Heartbeat, ToFront, ToWorker
from edge_magistral.server.worker import WorkerSettings, worker_main

OnMessage = Callable[[int, ToFront | None], None]
"""Called from the reader thread with the link's generation and each message; None: the worker is gone."""


class WorkerLink:
    """A spawned worker process; ``gen`` tells its messages from those of the workers before it."""

    def __init__(self, settings: WorkerSettings, on_message: OnMessage, gen: int, now: float):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, args=(child, settings), name="edge-magistral-worker")
        self.proc.start()
        child.close()
        self.gen, self.outbox = gen, queue.SimpleQueue()
        self.started = self.last_beat = now
        self.kill_reason: str | None = None  # why the supervisor killed it, if it did
        self.ready = False  # loaded: it reads the pipe from then on
        self.memory_cgroup: str | None = None  # its memory cgroup as last seen, and the OOM kills
        self.oom_kills_before: int | None = None  # counted there when it was first seen in it
        threading.Thread(target=self._read, args=(on_message,), name=f"worker-read-{gen}", daemon=True).start()
        threading.Thread(target=self._write, name=f"worker-write-{gen}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def _read(self, on_message: OnMessage) -> None:
        try:
            while True:
                msg = self.conn.recv()
                if isinstance(msg, Heartbeat):
                    self._watch_cgroup()
                on_message(self.gen, msg)
        except (EOFError, OSError):
            pass
        on_message(self.gen, None)  # the worker is gone

    def _watch_cgroup(self) -> None:
        """Follow the worker's memory cgroup while it lives (a dead one shows none), so that a
        SIGKILL can be matched with the kernel's OOM kill count there."""
        path = memory_cgroup(self.proc.pid)
        if path is not None and path != self.memory_cgroup:
            self.memory_cgroup, self.oom_kills_before = path, oom_kill_count(path)

    def oom_killed(self) -> bool:
        """Whether the kernel counted an OOM kill in its cgroup since it was seen there."""
        now = oom_kill_count(self.memory_cgroup) if self.memory_cgroup else None
        return now is not None and now > (self.oom_kills_before or 0)

    def _write(self) -> None:
        while (msg := self.outbox.get()) is not None:
            try:
                self.conn.send(msg)
            except (OSError, ValueError):
                return

    def send(self, msg: ToWorker) -> None:
        self.outbox.put(msg)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()

    def join(self, timeout: float) -> None:
        self.proc.join(timeout)

    def close(self) -> None:
        self.outbox.put(None)
        self.conn.close()

    def reap(self) -> tuple[str, str]:
        """After the pipe closed: (why, how) the worker ended, e.g. ("crashed", "signal 6").
        Closes the link."""
        self.proc.join(timeout=2)  # the pipe closes as the process ends: this is near-instant
        code = self.proc.exitcode
        self.close()
        why = self.kill_reason or "crashed"
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        if code == -signal.SIGKILL and self.kill_reason is None:
            why, how = "killed", "SIGKILL: out of memory?"  # nobody here sent it: most likely the OOM killer
            if self.oom_killed():
                how = f"SIGKILL: out of memory: the kernel's OOM killer, memory cgroup {self.memory_cgroup}"
        return why, how


# ------------------------------------------------------------------- OOM evidence

def memory_cgroup(pid: int) -> str | None:
    """The directory of ``pid``'s memory cgroup (v1 memory controller, else v2), if readable."""
    try:
        lines = open(f"/proc/{pid}/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return f"/sys/fs/cgroup/memory{path}"
    v2 = [path for _, controllers, path in (line.split(":", 2) for line in lines) if controllers == ""]
    return f"/sys/fs/cgroup{v2[0]}" if v2 else None


def oom_kill_count(cgroup_dir: str) -> int | None:
    """The kernel's count of OOM kills in that memory cgroup (v2 memory.events, v1
    memory.oom_control), or None when it cannot be read."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            text = open(f"{cgroup_dir}/{name}").read()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None
