"""The front side of the worker: spawn, feed, watch and restart it; queue the requests.

The worker runs up to ``n_slots`` generations at once (what its plan chose and its ready message
says; 1 unless ``--parallel`` or the profile asks for more): requests beyond that wait in a
bounded FIFO (429 with Retry-After when it is full) and the next one is sent the moment a slot
frees, so at most ``n_slots + queue_size`` are admitted. The worker is watched by its heartbeat:
a crash (pipe closed), a frozen process (no beats) or a hung engine (busy with no progress for
``hang_timeout_s``) kills it; every request in flight gets a 503 with Retry-After, queued ones
wait for the new worker, restarts back off, and after ``max_restarts`` crashes
within ``restart_window_s`` the service gives up (exit status 1) so that systemd takes over.

Everything here runs on the event loop thread except two small threads per worker that do the
blocking pipe reads and writes (a frozen worker must never block the loop, so /health and the
systemd watchdog keep working). Every timeout is measured on one monotonic clock (injectable
for tests): a wall-clock jump moves none of them (RELIABILITY.md 31).

A request cancelled because its client left (or fell too far behind) is counted by the stage it
had reached: ``queued`` (removed from the queue, never run), ``prompt`` (stopped during the
prompt's evaluation) or ``generating``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from edge_magistral.server.errors import ApiError, retry_after, unavailable
from edge_magistral.server.worker import JobSpec, WorkerSettings, worker_main

log = logging.getLogger(__name__)


class State(str, Enum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SupervisorConfig:
    queue_size: int = 8  # requests waiting, not counting those generating
    hang_timeout_s: float = 120.0  # busy with no progress (or no beats) this long: restart
    beat_timeout_s: float = 5.0  # no heartbeat this long: unhealthy (no systemd watchdog pings)
    load_timeout_s: float = 900.0
    max_restarts: int = 5
    restart_window_s: float = 600.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    max_buffered_events: int = 4096  # a reader this far behind is cancelled (slow client)


@dataclass(eq=False)
class Job:
    """One request's generation; its events arrive on ``events`` and end with done or error."""

    spec: JobSpec
    deadline: float | None  # monotonic
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = 0.0  # monotonic
    started: float | None = None
    produced: bool = False  # text has come out (the prompt has been evaluated)
    finished: bool = False
    cancelled: bool = False


class _Link:
    """One worker process and the two threads that talk to it."""

    def __init__(self, settings: WorkerSettings, on_message: Callable[[int, tuple | None], None], gen: int,
                 now: float):
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

    def _read(self, on_message: Callable[[int, tuple | None], None]) -> None:
        try:
            while True:
                msg = self.conn.recv()
                if msg[0] == "beat":
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

    def send(self, msg: tuple) -> None:
        self.outbox.put(msg)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()

    def close(self) -> None:
        self.outbox.put(None)
        self.conn.close()


class Supervisor:
    """Owns the worker and the queue. ``on_event`` hooks (metrics, systemd) are optional."""

    def __init__(self, settings: WorkerSettings, config: SupervisorConfig = SupervisorConfig(),
                 notifier: Any = None, metrics: Any = None, on_fatal: Callable[[int, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings, self.config, self.clock = settings, config, clock
        self.notifier, self.metrics, self.on_fatal = notifier, metrics, on_fatal
        self.state = State.LOADING
        self.info: dict[str, Any] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.running: dict[str, Job] = {}  # sent to the worker, not finished: at most n_slots
        self.n_slots = 1  # the loaded worker's, from its ready message
        self.link: _Link | None = None
        self.crashes: collections.deque[float] = collections.deque()
        self.last_progress = clock()
        self.progress_marker: Any = None
        self.verified_file: tuple | None = None  # the model file identity the last worker admitted
        self.avg_job_s = 5.0
        self.fatal: tuple[int, str] | None = None
        self._gen = 0
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ever_ready = False
        self._last_ping = 0.0

    @property
    def current(self) -> Job | None:
        """The running job (the oldest one when several slots are busy)."""
        return next(iter(self.running.values()), None)

    @current.setter
    def current(self, job: Job | None) -> None:
        self.running = {} if job is None else {job.id: job}

    # ------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._status(f"loading {self.settings.model_name}")
        self._spawn()
        self._tasks.append(asyncio.create_task(self._monitor(), name="supervisor-monitor"))

    def _spawn(self) -> None:
        self._gen += 1
        self.state = State.LOADING
        self.progress_marker = None
        settings = replace(self.settings, verified_file=self.verified_file)
        self.link = _Link(settings, self._from_thread, self._gen, self.clock())
        log.info("worker %d started (pid %s)", self._gen, self.link.proc.pid)

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests, answer the queued ones 503, let the running one finish.
        After a failure the STATUS line keeps saying why (for ``systemctl status``)."""
        if self.state in (State.DRAINING, State.STOPPED, State.FAILED):
            return
        self.state = State.DRAINING
        self._status("stopping: finishing the requests in flight" if self.running else "stopping")
        while self.queue:
            self._fail(self.queue.popleft(), unavailable("the server is shutting down", 5, "shutting_down"))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel what still runs, ask the worker to exit, kill it if it does not."""
        self.begin_drain()
        for t in self._tasks:
            t.cancel()
        link, self.link = self.link, None
        self.state = State.STOPPED
        self._fail_running(unavailable("the server is shutting down", 5, "shutting_down"))
        if link is None:
            return
        if link.ready:  # a loading worker reads no messages: it is simply killed
            link.send(("stop",))
            await asyncio.to_thread(link.proc.join, timeout_s)
        link.kill()
        await asyncio.to_thread(link.proc.join, 5)
        link.close()

    def kill_now(self) -> None:
        """Last resort on an abnormal exit: never leave a worker (and its GPU memory) behind."""
        link, self.link = self.link, None
        if link is not None:
            link.kill()
            link.proc.join(5)
            link.close()

    # ---------------------------------------------------------------------- requests
    def submit(self, spec: JobSpec, deadline_s: float | None) -> Job:
        """Queue a generation or refuse at once: 503 while not ready, 429 when the queue is full."""
        if self.state is State.LOADING and not self._ever_ready:
            raise unavailable("the model is loading; retry shortly", 5, "model_loading")
        if self.state in (State.DRAINING, State.STOPPED, State.FAILED):
            raise unavailable("the server is shutting down", 5, "shutting_down")
        if len(self.queue) >= self.config.queue_size:
            raise ApiError(429, f"the server is busy: {len(self.queue)} requests are waiting "
                                f"(queue size {self.config.queue_size}); retry later",
                           code="queue_full", headers=retry_after(min(60.0, self.expected_wait_s())))
        now = self.clock()
        job = Job(spec, now + deadline_s if deadline_s else None, created=now)
        self.queue.append(job)
        self._update_queue_metric()
        self._pump()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits (it never runs), stop it if it runs."""
        if job.finished or job.cancelled:
            return
        job.cancelled = True
        if self.running.get(job.id) is job:
            stage = "generating" if job.produced else "prompt"
            if self.link is not None:
                self.link.send(("cancel", job.id))
        elif job in self.queue:
            stage = "queued"
            self.queue.remove(job)
            self._fail(job, ApiError(499, "the client closed the request", code="client_closed"))
            self._update_queue_metric()
        else:
            return
        if self.metrics is not None:
            self.metrics.cancelled.labels(stage).inc()

    def _pump(self) -> None:
        """Start queued jobs while the worker has free slots."""
        while self.state is State.READY and len(self.running) < self.n_slots and self.queue:
            job = self.queue.popleft()
            self._update_queue_metric()
            now = self.clock()
            limits = dict(job.spec.limits)
            if job.deadline is not None:
                left = job.deadline - now
                if left < 0.5:
                    self._fail(job, unavailable("the request timed out in the queue", self.expected_wait_s(),
                                                "queue_timeout"))
                    continue
                limits["deadline_s"] = min(limits.get("deadline_s") or left, left)
            if not self.running:  # busy from now: progress is measured from here
                self.last_progress = now
            job.started = now
            self.running[job.id] = job
            self.link.send(("job", job.id, replace(job.spec, limits=limits)))

    def _fail(self, job: Job, err: ApiError) -> None:
        job.finished = True
        job.events.put_nowait(("error", err.status, err.code, err.message, err.headers))

    def _fail_running(self, err: ApiError) -> None:
        """Every job in flight gets ``err`` (the worker died, or the service stops)."""
        running, self.running = list(self.running.values()), {}
        for job in running:
            self._fail(job, err)

    # ----------------------------------------------------------------- worker messages
    def _from_thread(self, gen: int, msg: tuple | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._on_message, gen, msg)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _on_message(self, gen: int, msg: tuple | None) -> None:
        link = self.link
        if link is None or gen != link.gen:
            return  # a message from a worker already replaced
        if msg is None:
            self._on_worker_exit(link, link.kill_reason or "crashed")
            return
        kind = msg[0]
        if kind == "beat":
            link.last_beat = self.clock()
            if msg[1] != self.progress_marker:
                self.progress_marker, self.last_progress = msg[1], link.last_beat
        elif kind == "event":
            self._on_job_event(msg[1], msg[2])
        elif kind == "ready":
            self._on_ready(msg[1])
        elif kind == "status":
            self._status(msg[1])
        elif kind == "fatal":
            self._give_up(msg[3], f"cannot load the model: {msg[2]}")

    def _on_ready(self, info: dict[str, Any]) -> None:
        self.link.ready = True
        if self.state is not State.LOADING:  # shutting down meanwhile
            return
        self.info, self.state, first = info, State.READY, not self._ever_ready
        self.n_slots = max(1, int(info.get("n_slots", 1)))
        self._ever_ready = True
        admission = info.get("admission", {})
        self.verified_file = admission.get("file_id")
        if self.metrics is not None:
            self.metrics.worker_ready(info)
        plan = info.get("plan", {})
        self._status(f"ready: {info.get('model')} ({plan.get('quant')}, {plan.get('n_gpu_layers')} layers on GPU, "
                     f"context {info.get('n_ctx')}, {self.n_slots} slot{'s' if self.n_slots > 1 else ''}; "
                     f"{admission.get('note', 'not verified')})")
        log.info("model worker ready: %d slot%s, context %s per slot", self.n_slots,
                 "s" if self.n_slots > 1 else "", info.get("n_ctx"))
        if first and self.notifier is not None:
            self.notifier.ready()
        self._pump()

    def _on_job_event(self, job_id: str, ev: tuple) -> None:
        job = self.running.get(job_id)
        if job is None:
            return
        now = self.clock()
        self.last_progress = now
        job.produced = job.produced or ev[0] in ("thinking", "answer")
        job.events.put_nowait(ev)
        if ev[0] in ("done", "error"):
            job.finished = True
            del self.running[job_id]
            self.avg_job_s = 0.8 * self.avg_job_s + 0.2 * (now - (job.started or now))
            self._pump()
        elif job.events.qsize() > self.config.max_buffered_events and not job.cancelled:
            log.info("request %s: the client reads too slowly; cancelled", job_id)
            self.cancel(job)

    # ------------------------------------------------------------------ failures
    def _on_worker_exit(self, link: _Link, why: str) -> None:
        """The worker died (crash, abort, kill): 503 for the job in flight, then restart."""
        link.proc.join(timeout=2)  # the pipe closes as the process ends: this is near-instant
        code = link.proc.exitcode
        link.close()
        self.link = None
        if self.state in (State.DRAINING, State.STOPPED, State.FAILED):
            self._fail_running(unavailable("the server is shutting down", 5, "shutting_down"))
            return
        desc = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        if code == -signal.SIGKILL and link.kill_reason is None:
            why, desc = "killed", "SIGKILL: out of memory?"  # nobody here sent it: most likely the OOM killer
            if link.oom_killed():
                desc = f"SIGKILL: out of memory: the kernel's OOM killer, memory cgroup {link.memory_cgroup}"
        log.error("model worker %s (%s)", why, desc)
        if self.metrics is not None:
            self.metrics.worker_down(why)
        backoff = self._note_crash()
        self._fail_running(unavailable(f"the model worker failed ({desc}) during this request; it is "
                                       "being restarted, retry shortly", backoff + 5, "worker_crashed"))
        if self.state is State.FAILED:
            return
        self.state = State.RESTARTING
        self._status(f"model worker {why} ({desc}); restarting in {backoff:.1f} s")
        self._loop.call_later(backoff, self._restart)

    def _restart(self) -> None:
        if self.state is State.RESTARTING:
            self._spawn()

    def _note_crash(self) -> float:
        """Record a crash; give up after too many; the backoff before the next start."""
        now = self.clock()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.config.restart_window_s:
            self.crashes.popleft()
        if len(self.crashes) > self.config.max_restarts:
            self._give_up(1, f"the model worker failed {len(self.crashes)} times in "
                             f"{self.config.restart_window_s:.0f} s")
        return min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (len(self.crashes) - 1))

    def _give_up(self, exit_code: int, message: str) -> None:
        """Fail everything and stop. The runner prints the message as the service's one last
        line (with the exit status); without a runner it is logged."""
        if self.on_fatal is None:
            log.error("%s; stopping the service", message)
        self.state, self.fatal = State.FAILED, (exit_code, message)
        self._status(f"failed: {message}")
        err = unavailable(f"the service is stopping: {message}", 30, "service_failed")
        for job in self.queue:
            self._fail(job, err)
        self.queue.clear()
        self._fail_running(err)
        if self.link is not None:
            self.link.kill()
        if self.on_fatal is not None:
            self.on_fatal(exit_code, message)

    def _kill_hung(self, why: str) -> None:
        link = self.link
        if link is None or link.kill_reason is not None:
            return
        log.error("the model worker is %s; killing it", why)
        link.kill_reason = why
        link.kill()  # the reader thread sees the pipe close and reports the exit

    # ------------------------------------------------------------------- watching
    def stalled_s(self, now: float | None = None) -> float:
        """How long the worker has shown no sign of life (or, when busy, of progress)."""
        now = self.clock() if now is None else now
        if self.link is None:
            return float("inf")
        silent = now - self.link.last_beat
        return max(silent, now - self.last_progress) if self.running else silent

    def healthy(self) -> bool:
        """Worker alive and beating, and idle or advancing: what systemd's watchdog pings mean."""
        if self.link is None or self.state not in (State.LOADING, State.READY, State.DRAINING):
            return False
        now = self.clock()
        if now - self.link.last_beat > self.config.beat_timeout_s:
            return False
        return not self.running or now - self.last_progress < self.config.hang_timeout_s

    async def _monitor(self) -> None:
        interval = self._watchdog_interval()
        while True:
            await asyncio.sleep(0.25)
            try:
                self._check(interval)
            except Exception:  # the monitor must outlive any bug in one check
                log.exception("supervisor check failed")

    def _check(self, ping_interval: float | None) -> None:
        now, link = self.clock(), self.link
        if link is not None and self.state in (State.LOADING, State.READY):
            if self.state is State.LOADING and now - link.started > self.config.load_timeout_s:
                self._kill_hung(f"still loading after {self.config.load_timeout_s:.0f} s")
            elif self.stalled_s(now) > self.config.hang_timeout_s:
                self._kill_hung(f"hung (no progress for {self.stalled_s(now):.0f} s)")
        if ping_interval and self.healthy() and now - self._last_ping >= ping_interval:
            self._last_ping = now
            self.notifier.watchdog()
        if self.metrics is not None:
            self.metrics.observe_supervisor(self)

    def _watchdog_interval(self) -> float | None:
        """Ping at half of systemd's WatchdogSec (its own advice), at most every 5 s."""
        if self.notifier is None:
            return None
        sec = self.notifier.watchdog_interval_s()
        return None if not sec else min(5.0, sec / 2)

    def _status(self, text: str) -> None:
        if self.notifier is not None:
            self.notifier.status(text)

    def _update_queue_metric(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.queue))

    @property
    def worker_pid(self) -> int | None:
        return self.link.proc.pid if self.link is not None else None

    def expected_wait_s(self) -> float:
        """Until a new request would start: the queue ahead, at the recent pace, n_slots at a time."""
        return self.avg_job_s * (len(self.queue) + 1) / self.n_slots


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
