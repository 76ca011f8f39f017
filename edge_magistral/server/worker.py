"""The worker process: owns the engine and runs the front's jobs (messages: :mod:`.protocol`).

Why a process: llama.cpp aborts its process on CUDA errors and failed assertions, and a bad
grammar can segfault it; Python can catch neither. With the model in a child, such a crash
costs the requests in flight (503) and a reload, never the service. The child also keeps every
GPU context out of the HTTP process.

One path for every engine: the main thread submits each job (``engine.submit``: the engine
queues what its slots cannot take yet; the single-sequence engine runs one turn after the
other), and one thread per job forwards that job's events over the pipe until its ``Done``. The
control thread reads the pipe, so a cancel acts at once, as ``engine.cancel(stream)``.

This module is imported by the front too, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_magistral import log_limit
from edge_magistral.generation import Done
from edge_magistral.progress import Advance
from edge_magistral.server.protocol import (
    BEAT_INTERVAL_S,
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
    ToWorker,
    WaitingForWorker,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker needs to plan and load the model (all of it picklable)."""

    model_path: str
    ctx: int | None = None
    n_gpu_layers: int | None = None
    profile: str | None = None
    threads: int | None = None
    think_budget: int | None = None  # the default per request (None: the plan's)
    model_name: str = "model"
    log_level: int = logging.WARNING
    verified_file: tuple | None = None  # the model file's identity an earlier worker verified (admission)
    hardware_file: str | None = None  # plan for this recorded box (detect --json) instead of detecting
    parallel: int | None = None  # decoding slots (None: the plan's)
    speculate: str | None = None  # ngram | draft | off (None: the plan's, else ngram)
    draft_model: str | None = None  # the draft GGUF of speculate=draft
    cluster: Any = None  # edge_magistral.rpc.endpoints.Cluster: the RPC workers layers go to (None: none)


def worker_main(conn: Any, settings: WorkerSettings) -> None:
    """Entry point of the child process."""
    # Ctrl-C reaches the whole process group and systemd's default KillMode signals every process
    # of the unit: the front decides when the worker stops, so that in-flight requests can drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(levelname)s worker %(name)s: %(message)s")
    log_limit.install()  # llama.cpp's log included: a flood of one line must not fill the journal
    Worker(conn, settings).run()


@dataclass
class _Running:
    """A job received and not ended: cancelled before it was submitted, or its stream."""

    cancelled: bool = False
    stream: Any = None


@dataclass(frozen=True)
class _StatusLine:
    """Admission's progress as the STATUS line: the hash's description, said once as it starts
    (the heartbeat shows the worker alive meanwhile)."""

    send: Callable[[ToFront], None]

    def task(self, description: str, total: int) -> Advance:
        self.send(Status(description))
        return lambda n: None


class Worker:
    """Runs jobs on an engine and talks to the front through ``conn`` (anything with ``send``).

    ``engine``: an engine already loaded (tests); without one, :meth:`run` loads the model."""

    def __init__(self, conn: Any, settings: WorkerSettings, engine: Any = None):
        self.conn, self.settings, self.engine = conn, settings, engine
        self.jobs: dict[str, _Running] = {}  # received and not ended, by id: only their cancels are kept
        self.events = 0  # engine events sent (the heartbeat's sign of progress)
        self._lock = threading.Lock()  # orders a cancel against its job's submit and end
        self._send_lock = threading.Lock()
        self._todo: queue.SimpleQueue[RunJob | None] = queue.SimpleQueue()
        self._forwarders: dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------------ the pipe
    def send(self, msg: ToFront) -> None:
        try:
            with self._send_lock:
                self.conn.send(msg)
        except (OSError, ValueError):  # the front is gone: nobody to work for
            os._exit(0)

    def handle(self, msg: ToWorker) -> None:
        """One message from the front (on the control thread): jobs queue for the main thread,
        cancels act at once (``engine.cancel`` is thread-safe)."""
        match msg:
            case RunJob(job_id=job_id):
                with self._lock:
                    self.jobs[job_id] = _Running()
                self._todo.put(msg)
            case Cancel(job_id=job_id):
                self._cancel(job_id)
            case Stop():
                self._cancel_all()
                self._todo.put(None)

    def _control(self) -> None:
        """Reads the pipe until EOF, which means the front died."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self._cancel_all()
                os._exit(0)
            self.handle(msg)

    def _beat(self) -> None:
        while True:
            # tokens_evaluated grows with each prefill batch, so a long prompt shows progress
            # before its first token.
            progress = self.engine.tokens_evaluated if self.engine is not None else 0
            self.send(Heartbeat(self.events, progress))
            time.sleep(BEAT_INTERVAL_S)

    def _cancel(self, job_id: str) -> None:
        """Mark a job cancelled and stop its stream if it has one. A cancel that crossed its
        job's end on the pipe is dropped (kept, it would stay for the life of the worker)."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return
            job.cancelled = True
            stream = job.stream
        if stream is not None:
            self.engine.cancel(stream)

    def _cancel_all(self) -> None:
        """Cancel every job: those not yet submitted never run."""
        with self._lock:
            for job in self.jobs.values():
                job.cancelled = True
            streams = [job.stream for job in self.jobs.values() if job.stream is not None]
        for stream in streams:
            self.engine.cancel(stream)

    # -------------------------------------------------------------------------- life
    def run(self) -> None:
        """Load, say ready, serve until :class:`Stop`."""
        threading.Thread(target=self._beat, name="beat", daemon=True).start()
        from edge_magistral.errors import EdgeMagistralError

        try:
            info = self._load()
        except EdgeMagistralError as e:
            self.send(Fatal(type(e).__name__, str(e), e.exit_code))
            return
        threading.Thread(target=self._control, name="control", daemon=True).start()
        self.send(Ready(info))
        self.serve()

    def serve(self) -> None:
        """Start each job as it comes; after :class:`Stop`, let the (cancelled) jobs end and
        close the engine."""
        while (msg := self._todo.get()) is not None:
            self._start(msg.job_id, msg.spec)
        with self._lock:
            forwarders = list(self._forwarders.values())
        for t in forwarders:
            t.join()
        self.engine.close()

    def _load(self) -> dict[str, Any]:
        """Admit (sha256 against the manifest), open (plan and load) and warm up (one token); the
        info the front reports."""
        from edge_magistral.chat import Message
        from edge_magistral.errors import CorruptModelError
        from edge_magistral.generation import Limits
        from edge_magistral.loader import ModelRequest, open_model
        from edge_magistral.server.admission import admit, still_same

        s = self.settings
        admitted = admit(s.model_path, s.verified_file, progress=_StatusLine(self.send))
        if s.cluster is not None and s.cluster.workers:
            self._wait_for_workers(s.cluster.endpoints)
        t0 = time.monotonic()
        opened = open_model(ModelRequest(model=s.model_path, ctx=s.ctx, n_gpu_layers=s.n_gpu_layers,
                                         parallel=s.parallel, profile=s.profile, hardware_file=s.hardware_file,
                                         threads=s.threads, think_budget=s.think_budget, speculate=s.speculate,
                                         draft_model=s.draft_model, cluster=s.cluster))
        self.engine = e = opened.engine
        t1 = time.monotonic()
        for _ in e.submit(e.prompt_ids([Message("user", "Hi")], "replace"), Limits(think_budget=0, max_tokens=1)):
            pass
        if not still_same(s.model_path, admitted.file_id):
            raise CorruptModelError(f"{s.model_path} was replaced while it was being loaded; restart the service "
                                    "to verify the new file")
        load = opened.settings
        # how tokens are decoded is part of what answered (/health, the audit record's plan)
        plan = {**opened.plan.to_dict(), "speculate": load.speculate, "draft_model": load.draft_model}
        return {
            "model": s.model_name, "model_path": s.model_path, "plan": plan, "pid": os.getpid(),
            "n_ctx": e.n_ctx, "n_slots": e.n_slots, "is_magistral": e.is_magistral,
            "think_budget": load.think_budget if e.is_magistral else 0,
            "n_threads": load.n_threads, "load_s": round(t1 - t0, 3), "warmup_s": round(time.monotonic() - t1, 3),
            "admission": {"file_id": admitted.file_id, "note": admitted.note, "hash_s": round(admitted.hash_s, 3),
                          "sha256": admitted.sha256},
            "workers": _workers_info(s.cluster, e.remote_buffers, plan),
        }

    def _wait_for_workers(self, endpoints: list[str]) -> None:
        """Wait, as long as it takes, until every RPC worker answers a probe: llama.cpp would abort
        this process on one that does not. The front shows which worker and why (/health); a worker
        of another protocol version is fatal at once (waiting would not fix it)."""
        from edge_magistral.rpc.probe import wait_for_workers

        wait_for_workers(endpoints, None, lambda err: self.send(WaitingForWorker(err.endpoint, str(err))))

    # -------------------------------------------------------------------------- jobs
    def _start(self, job_id: str, spec: JobSpec) -> None:
        """Submit a job and forward its events from a thread of its own, so that the next job
        can be submitted at once. A job cancelled before its submit never runs."""
        try:
            ids = self._prompt_ids(spec)
            with self._lock:
                cancelled = self.jobs[job_id].cancelled
            if cancelled:  # the client left before the job was submitted
                self._end(job_id, JobError(job_id, 499, "client_closed", "the client closed the request"))
                return
            stream = self.engine.submit(ids, spec.limits)  # outside the lock: it may wait for a slot
        except Exception as e:
            self._end(job_id, job_error(job_id, e))
            return
        with self._lock:
            job = self.jobs[job_id]
            job.stream, cancelled = stream, job.cancelled
            thread = self._forwarders[job_id] = threading.Thread(
                target=self._forward, args=(job_id, stream), name=f"job-{job_id[:8]}", daemon=True)
        if cancelled:  # the cancel came while it was being submitted
            self.engine.cancel(stream)
        thread.start()

    def _forward(self, job_id: str, stream: Any) -> None:
        """One job's events to the front; its Done (or its error) last, once the job is forgotten."""
        last: ToFront = JobError(job_id, 500, "internal_error", "internal error: the turn ended without a result")
        try:
            for ev in stream:
                self.events += 1
                if isinstance(ev, Done):
                    last = JobEvent(job_id, ev)
                else:
                    self.send(JobEvent(job_id, ev))
        except Exception as e:
            last = job_error(job_id, e)
        finally:
            with self._lock:
                self._forwarders.pop(job_id, None)
            self._end(job_id, last)

    def _end(self, job_id: str, last: ToFront) -> None:
        """Forget a job, then send its last message: a cancel that comes after it is dropped."""
        with self._lock:
            self.jobs.pop(job_id, None)
        self.send(last)

    def _prompt_ids(self, spec: JobSpec) -> list[int]:
        """Chat: the model's own prompt format (with the tools, for a Magistral model; another
        model refuses tools as bad input). Raw: BOS (when the model wants one) + the text,
        tokenized without special-token parsing, so a raw prompt can never forge control tokens.
        The engine refuses a prompt that does not fit (PromptTooLongError)."""
        if spec.kind == "chat":
            conv = spec.conversation
            return self.engine.prompt_ids(list(conv.messages), conv.system_mode, conv.tools)
        return self.engine.raw_prompt_ids(spec.prompt)


def _workers_info(cluster: Any, buffers: Any, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Per RPC worker: what the plan put there and what llama.cpp really allocated there."""
    if cluster is None or not cluster.workers:
        return []
    planned = {w.get("endpoint"): w for w in (plan.get("cluster") or {}).get("workers", [])}
    got = buffers.to_dict()
    return [{"endpoint": ep, "buffers": got.get(ep, {}), "planned": planned.get(ep)} for ep in cluster.endpoints]


def job_error(job_id: str, e: Exception) -> JobError:
    """A job's failure as its last message: 400 for bad input, 503 for a backend failure, 500 (and
    a scrubbed traceback) for a bug; the worker keeps serving either way."""
    from edge_magistral.errors import BackendError, BadInputError, PromptTooLongError

    if isinstance(e, PromptTooLongError):
        return JobError(job_id, 400, "context_length_exceeded", str(e))
    if isinstance(e, BadInputError):
        return JobError(job_id, 400, None, str(e))
    if isinstance(e, BackendError):
        return JobError(job_id, 503, "backend_error", str(e))
    print(scrubbed_traceback(e), file=sys.stderr, flush=True)
    return JobError(job_id, 500, "internal_error", f"internal error: {type(e).__name__}")


def scrubbed_traceback(e: BaseException) -> str:
    """A traceback with the exception's type but not its message: a message can quote the
    prompt or the answer, and those are never logged."""
    frames = "".join(traceback.format_tb(e.__traceback__))
    return f"Traceback (most recent call last):\n{frames}{type(e).__module__}.{type(e).__qualname__} (message withheld)"
