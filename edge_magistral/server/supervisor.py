"""The front side of the worker: spawn, feed, watch and restart it; queue the requests.

The worker runs up to ``n_slots`` generations at once (what its plan chose and its ready message
says; 1 unless ``--parallel`` or the profile asks for more): requests beyond that wait in a
bounded FIFO (429 with Retry-After when it is full) and the next one is sent the moment a slot
frees, so at most ``n_slots + queue_size`` are admitted. The worker is watched by its heartbeat:
a crash (pipe closed), a frozen process (no beats) or a stalled engine (busy with no progress
for ``stall_timeout_s``) kills it; every request in flight gets a 503 with Retry-After, queued
ones wait for the new worker, restarts back off, and after ``max_restarts`` crashes within
``restart_window_s`` the service gives up (exit status 1) so that systemd takes over.

Everything here runs on the event loop thread except the two threads of each worker's link
(:mod:`.link`), which do the blocking pipe reads and writes. Every timeout, the restart backoff
included, is measured on one monotonic clock (injectable for tests) by :meth:`Supervisor.check`,
which the monitor task runs four times a second: a wall-clock jump moves none of them.

A request cancelled because its client left (or fell too far behind) is counted by the stage it
had reached: ``queued`` (removed from the queue, never run), ``prompt`` (stopped during the
prompt's evaluation) or ``generating``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from edge_magistral.generation import AnswerText, Done, Event, ThinkingText
from edge_magistral.server.errors import ApiError, retry_after, unavailable
from edge_magistral.server.link import OnMessage, WorkerLink
from edge_magistral.server.protocol import (
    Cancel,
    Fatal,
    Heartbeat,
    JobError,
    JobEvent,
    JobSpec,
    Ready,
    RunJob,
    Status,
    Stop,
    ToFront,
    WaitingForWorker,
)
from edge_magistral.server.settings import SupervisorConfig
from edge_magistral.server.worker import WorkerSettings

log = logging.getLogger(__name__)
DEFAULT_CONFIG = SupervisorConfig()


class State(str, Enum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(eq=False)
class Job:
    """One request's generation; its engine events arrive on ``events``, the last one a ``Done``
    or an :class:`ApiError`."""

    spec: JobSpec
    deadline: float | None  # monotonic
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: asyncio.Queue[Event | ApiError] = field(default_factory=asyncio.Queue)
    created: float = 0.0  # monotonic
    started: float | None = None
    produced: bool = False  # text has come out (the prompt has been evaluated)
    finished: bool = False
    cancelled: bool = False


class Supervisor:
    """Owns the worker and the queue. ``notifier`` (systemd), ``metrics`` and ``on_fatal`` are
    optional; ``clock`` (monotonic) and ``spawn`` (how a worker is started: a
    :class:`~.link.WorkerLink`) are what tests replace."""

    def __init__(self, settings: WorkerSettings, config: SupervisorConfig = DEFAULT_CONFIG,
                 notifier: Any = None, metrics: Any = None, on_fatal: Callable[[int, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 spawn: Callable[[WorkerSettings, OnMessage, int, float], WorkerLink] = WorkerLink):
        self.settings, self.config, self.clock, self.spawn = settings, config, clock, spawn
        self.notifier, self.metrics, self.on_fatal = notifier, metrics, on_fatal
        self.state = State.LOADING
        self.info: dict[str, Any] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.running: dict[str, Job] = {}  # sent to the worker, not finished: at most n_slots
        self.n_slots = 1  # the loaded worker's, from its ready message
        self.link: WorkerLink | None = None
        self.restart_at: float | None = None  # when the next worker starts (after a crash's backoff)
        self.crashes: collections.deque[float] = collections.deque()
        self.last_progress = clock()
        self.progress_marker: Any = None
        self.verified_file: tuple | None = None  # the model file identity the last worker admitted
        self.avg_job_s = 5.0
        self.fatal: tuple[int, str] | None = None
        self.waiting: dict[str, str] | None = None  # the RPC worker loading waits for, and why
        self._gen = 0
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ever_ready = False
        self._last_ping = 0.0
        self._ping_interval: float | None = None

    # ------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ping_interval = self._liveness_interval()
        self._status(f"loading {self.settings.model_name}")
        self._spawn()
        self._tasks.append(asyncio.create_task(self._monitor(), name="supervisor-monitor"))

    def _spawn(self) -> None:
        self._gen += 1
        self.state, self.restart_at = State.LOADING, None
        self.progress_marker = None
        settings = replace(self.settings, verified_file=self.verified_file)
        self.link = self.spawn(settings, self._from_thread, self._gen, self.clock())
        log.info("worker %d started (pid %s)", self._gen, self.link.pid)

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
            link.send(Stop())
            await asyncio.to_thread(link.join, timeout_s)
        link.kill()
        await asyncio.to_thread(link.join, 5)
        link.close()

    def kill_now(self) -> None:
        """Last resort on an abnormal exit: never leave a worker (and its GPU memory) behind."""
        link, self.link = self.link, None
        if link is not None:
            link.kill()
            link.join(5)
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
                self.link.send(Cancel(job.id))
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
            limits = job.spec.limits
            if job.deadline is not None:
                left = job.deadline - now
                if left < 0.5:
                    self._fail(job, unavailable("the request timed out in the queue", self.expected_wait_s(),
                                                "queue_timeout"))
                    continue
                limits = replace(limits, deadline_s=min(limits.deadline_s or left, left))
            if not self.running:  # busy from now: progress is measured from here
                self.last_progress = now
            job.started = now
            self.running[job.id] = job
            self.link.send(RunJob(job.id, replace(job.spec, limits=limits)))

    def _fail(self, job: Job, err: ApiError) -> None:
        job.finished = True
        job.events.put_nowait(err)

    def _fail_running(self, err: ApiError) -> None:
        """Every job in flight gets ``err`` (the worker died, or the service stops)."""
        running, self.running = list(self.running.values()), {}
        for job in running:
            self._fail(job, err)

    # ----------------------------------------------------------------- worker messages
    def _from_thread(self, gen: int, msg: ToFront | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.on_worker_message, gen, msg)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def on_worker_message(self, gen: int, msg: ToFront | None) -> None:
        """A message of the worker of generation ``gen`` (on the loop); None: that worker is gone."""
        link = self.link
        if link is None or gen != link.gen:
            return  # a message from a worker already replaced
        match msg:
            case None:
                self._on_worker_exit(link)
            case Heartbeat(events=events, progress=progress):
                link.last_beat = self.clock()
                if (events, progress) != self.progress_marker:
                    self.progress_marker, self.last_progress = (events, progress), link.last_beat
            case JobEvent(job_id=job_id, event=Done() as done):
                self._on_job_end(job_id, done)
            case JobEvent(job_id=job_id, event=event):
                self._on_job_event(job_id, event)
            case JobError(job_id=job_id, status=status, code=code, message=message):
                headers = retry_after(5) if status == 503 else {}
                self._on_job_end(job_id, ApiError(status, message, code=code, headers=headers))
            case Ready(info=info):
                self._on_ready(info)
            case Status(text=text):
                self._status(text)
            case WaitingForWorker(endpoint=endpoint, reason=reason):
                self._on_waiting(link, endpoint, reason)
            case Fatal(message=message, exit_code=exit_code):
                self._give_up(exit_code, f"cannot load the model: {message}")

    def _on_waiting(self, link: WorkerLink, endpoint: str, reason: str) -> None:
        """Loading waits for an RPC worker: not a hung load, so the load timeout restarts from now
        (the worker process still beats; a frozen one is still caught)."""
        link.started = self.clock()
        if self.waiting != {"endpoint": endpoint, "reason": reason}:
            log.warning("waiting for RPC worker %s: %s", endpoint, reason)
        self.waiting = {"endpoint": endpoint, "reason": reason}
        self._status(f"waiting for RPC worker {endpoint}: {reason}")

    def _on_ready(self, info: dict[str, Any]) -> None:
        self.link.ready = True
        self.waiting = None
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

    def _on_job_event(self, job_id: str, ev: Event) -> None:
        job = self.running.get(job_id)
        if job is None:
            return
        self.last_progress = self.clock()
        job.produced = job.produced or isinstance(ev, (ThinkingText, AnswerText))
        job.events.put_nowait(ev)
        if job.events.qsize() > self.config.max_buffered_events and not job.cancelled:
            log.info("request %s: the client reads too slowly; cancelled", job_id)
            self.cancel(job)

    def _on_job_end(self, job_id: str, last: Done | ApiError) -> None:
        """A job's Done or error: its slot frees for the next queued job."""
        job = self.running.pop(job_id, None)
        if job is None:
            return
        now = self.last_progress = self.clock()
        job.finished = True
        job.events.put_nowait(last)
        self.avg_job_s = 0.8 * self.avg_job_s + 0.2 * (now - (job.started or now))
        self._pump()

    # ------------------------------------------------------------------ failures
    def _on_worker_exit(self, link: WorkerLink) -> None:
        """The worker died (crash, abort, kill): 503 for the jobs in flight, then a restart after
        a backoff (started by :meth:`check`)."""
        why, desc = link.reap()
        self.link = None
        if self.state in (State.DRAINING, State.STOPPED, State.FAILED):
            self._fail_running(unavailable("the server is shutting down", 5, "shutting_down"))
            return
        log.error("model worker %s (%s)", why, desc)
        if self.metrics is not None:
            self.metrics.worker_down(why)
        backoff = self._note_crash()
        self._fail_running(unavailable(f"the model worker failed ({desc}) during this request; it is "
                                       "being restarted, retry shortly", backoff + 5, "worker_crashed"))
        if self.state is State.FAILED:
            return
        self.state, self.restart_at = State.RESTARTING, self.clock() + backoff
        self._status(f"model worker {why} ({desc}); restarting in {backoff:.1f} s")

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
        """Worker alive and beating, and idle or advancing: what the liveness pings to systemd
        (WATCHDOG=1) mean."""
        if self.link is None or self.state not in (State.LOADING, State.READY, State.DRAINING):
            return False
        now = self.clock()
        if now - self.link.last_beat > self.config.beat_timeout_s:
            return False
        return not self.running or now - self.last_progress < self.config.stall_timeout_s

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                self.check()
            except Exception:  # the monitor must outlive any bug in one check
                log.exception("supervisor check failed")

    def check(self) -> None:
        """One look at the clock: kill a worker that is stuck loading or stalled, start the next
        one when a crash's backoff has passed, ping systemd while healthy."""
        now, link = self.clock(), self.link
        if link is not None and self.state in (State.LOADING, State.READY):
            if self.state is State.LOADING and now - link.started > self.config.load_timeout_s:
                self._kill_hung(f"still loading after {self.config.load_timeout_s:.0f} s")
            elif self.stalled_s(now) > self.config.stall_timeout_s:
                self._kill_hung(f"hung (no progress for {self.stalled_s(now):.0f} s)")
        if self.state is State.RESTARTING and self.restart_at is not None and now >= self.restart_at:
            self._spawn()
        interval = self._ping_interval
        if interval and self.healthy() and now - self._last_ping >= interval:
            self._last_ping = now
            self.notifier.ping_liveness()
        if self.metrics is not None:
            self.metrics.observe_supervisor(self)

    def _liveness_interval(self) -> float | None:
        """Seconds between liveness pings: half the notifier's interval (which is itself half of
        WatchdogSec, systemd's advice), so a quarter of WatchdogSec, at most 5 s; a ping that a
        busy loop delays still arrives in time. None: systemd wants no pings."""
        if self.notifier is None:
            return None
        sec = self.notifier.liveness_interval_s()
        return None if not sec else min(5.0, sec / 2)

    def _status(self, text: str) -> None:
        if self.notifier is not None:
            self.notifier.status(text)

    def _update_queue_metric(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.queue))

    @property
    def worker_pid(self) -> int | None:
        return self.link.pid if self.link is not None else None

    def expected_wait_s(self) -> float:
        """Until a new request would start: the queue ahead, at the recent pace, n_slots at a time."""
        return self.avg_job_s * (len(self.queue) + 1) / self.n_slots
