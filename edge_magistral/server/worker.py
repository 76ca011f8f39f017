"""The worker process: owns the engine and runs the front process's generations.

With one slot (the plan's ``n_slots``) it owns the single-sequence ``Engine`` and runs one job at
a time on its main thread. With more it owns a ``BatchEngine``: the main thread submits each job
(the engine queues beyond its slots and decodes the running ones together) and one thread per job
forwards that job's stream of events over the pipe; a cancel maps to ``engine.cancel(stream)``.

Why a process: llama.cpp aborts its process on CUDA errors and failed assertions, and a bad
grammar can segfault it; Python can catch neither. With the model in a child, such a crash
costs the requests in flight (503) and a reload, never the service. The child also keeps every
GPU context out of the HTTP process.

The protocol is tuples over a ``multiprocessing`` pipe (pickled, one message per call):

front → worker
    ``("job", job_id, JobSpec)`` · ``("cancel", job_id)`` · ``("stop",)``
worker → front
    ``("beat", progress)`` every :data:`BEAT_INTERVAL_S`, from the first moment of the process:
    ``progress`` changes whenever the engine makes progress (a token, or a prefill batch), so the
    front can tell "busy and advancing" from "hung inside a llama.cpp call".
    ``("status", text)`` for the STATUS line while loading (the model's sha256 being verified).
    ``("ready", info)`` after the admission check, the plan, the load and a one-token warm-up;
    ``info["n_slots"]`` is how many jobs the front may have in flight at once.
    ``("fatal", error_type, message, exit_code)`` when the model cannot be loaded at all (a
    missing file, a model that does not fit): retrying would not help.
    ``("event", job_id, event)`` with ``event`` one of ``("thinking", text)``,
    ``("answer", text)``, ``("watchdog", action, reason, detail)``, ``("done", dict)`` or
    ``("error", status, code, message)``; ``done`` and ``error`` end a job.

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
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_magistral import log_limit

BEAT_INTERVAL_S = 0.5
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


@dataclass(frozen=True)
class JobSpec:
    """One generation: a chat (``messages`` as (role, content) pairs) or a raw text ``prompt``."""

    kind: str  # "chat" | "raw"
    limits: dict[str, Any] = field(default_factory=dict)  # Limits(**limits)
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""


def encode_event(ev: Any) -> tuple:
    """An engine event as a plain tuple (what crosses the pipe)."""
    from edge_magistral.engine import AnswerText, Done, ThinkingText, WatchdogAction

    if isinstance(ev, ThinkingText):
        return ("thinking", ev.text)
    if isinstance(ev, AnswerText):
        return ("answer", ev.text)
    if isinstance(ev, WatchdogAction):
        return ("watchdog", ev.action, ev.reason, ev.detail)
    if isinstance(ev, Done):
        return ("done", {**asdict(ev), "usage": {**asdict(ev.usage),
                                                 "completion_tokens": ev.usage.completion_tokens}})
    raise TypeError(f"unknown engine event {ev!r}")


def worker_main(conn: Any, settings: WorkerSettings) -> None:
    """Entry point of the child process."""
    # Ctrl-C reaches the whole process group and systemd's default KillMode signals every process
    # of the unit: the front decides when the worker stops, so that in-flight requests can drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(levelname)s worker %(name)s: %(message)s")
    log_limit.install()  # llama.cpp's log included (RELIABILITY.md 30)
    _Worker(conn, settings).run()


class _Worker:
    def __init__(self, conn: Any, settings: WorkerSettings):
        self.conn, self.settings = conn, settings
        self.send_lock = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.engine: Any = None
        self.n_slots = 1
        self.current: str | None = None  # the job of the single-sequence Engine
        self.streams: dict[str, Any] = {}  # the jobs submitted to a BatchEngine, by id
        self.cancelled: set[str] = set()
        self.known: set[str] = set()  # jobs received and not ended: only their cancels are kept
        self.turn_lock = threading.Lock()  # orders cancels against the start of a job's turn
        self.events = 0

    # ------------------------------------------------------------------------ plumbing
    def send(self, msg: tuple) -> None:
        try:
            with self.send_lock:
                self.conn.send(msg)
        except (OSError, ValueError):  # the front is gone: nobody to work for
            os._exit(0)

    def _beat(self) -> None:
        while True:
            # tokens_evaluated grows with each prefill batch, so a long prompt shows progress
            # before its first token.
            progress = self.engine.tokens_evaluated if self.engine is not None else 0
            self.send(("beat", (self.events, progress)))
            self._cancel_current()  # again: a cancel can race the start of a turn, which clears it
            time.sleep(BEAT_INTERVAL_S)

    def _cancel_current(self) -> None:
        """Stop the turns in progress whose jobs were cancelled. Under the lock, so that a cancel
        meant for one job can never stop the next one's turn."""
        with self.turn_lock:
            if self.current is not None and self.current in self.cancelled:
                self.engine.cancel()
            for job_id in self.cancelled & self.streams.keys():
                self.engine.cancel(self.streams[job_id])

    def _on_job(self, job_id: str, spec: JobSpec) -> None:
        with self.turn_lock:
            self.known.add(job_id)
        self.jobs.put((job_id, spec))

    def _on_cancel(self, job_id: str) -> None:
        """Mark a job cancelled and stop its turn if it runs. A cancel that crossed its job's end
        on the pipe is dropped (kept, it would stay in the set for the life of the worker)."""
        with self.turn_lock:
            if job_id in self.known:
                self.cancelled.add(job_id)
        self._cancel_current()

    def _cancel_all(self) -> None:
        if self.engine is None:
            return
        if self.n_slots == 1:
            self.engine.cancel()
            return
        with self.turn_lock:
            for stream in self.streams.values():
                self.engine.cancel(stream)

    def _control(self) -> None:
        """Reads the pipe: jobs go to the main thread, cancels act at once (engine.cancel is
        thread-safe), and EOF means the front died."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self._cancel_all()
                os._exit(0)
            if msg[0] == "job":
                self._on_job(msg[1], msg[2])
            elif msg[0] == "cancel":
                self._on_cancel(msg[1])
            elif msg[0] == "stop":
                self._cancel_all()
                self.jobs.put(None)

    # -------------------------------------------------------------------------- life
    def run(self) -> None:
        threading.Thread(target=self._beat, name="beat", daemon=True).start()
        from edge_magistral.errors import EdgeMagistralError

        try:
            info = self._load()
        except EdgeMagistralError as e:
            self.send(("fatal", type(e).__name__, str(e), e.exit_code))
            return
        threading.Thread(target=self._control, name="control", daemon=True).start()
        self.send(("ready", info))
        run_job = self._run_job if self.n_slots == 1 else self._submit_job
        while (item := self.jobs.get()) is not None:
            run_job(*item)
        self.engine.close()

    def _load(self) -> dict[str, Any]:
        """Admit (sha256 against the manifest), plan, load and warm up (one token), as ``run``
        does; the info the front reports."""
        from dataclasses import replace

        from edge_magistral.chat import Message
        from edge_magistral.engine import Limits, LoadSettings
        from edge_magistral.errors import CorruptModelError
        from edge_magistral.hardware import load_hardware
        from edge_magistral.planner import Request, plan_for_model
        from edge_magistral.server.admission import admit, still_same

        s = self.settings
        admitted = admit(s.model_path, s.verified_file, on_hashing=self._say_hashing)
        t0 = time.monotonic()
        hardware = load_hardware(s.hardware_file) if s.hardware_file else None
        request = Request(ctx=s.ctx, n_gpu_layers=s.n_gpu_layers, parallel=s.parallel)
        plan, _ = plan_for_model(s.model_path, request, hardware, profile_name=s.profile)
        load = LoadSettings.from_plan(plan)
        if s.threads:
            load = replace(load, n_threads=s.threads, n_threads_batch=s.threads)
        if s.think_budget is not None:
            load = replace(load, think_budget=s.think_budget)
        self.engine, self.n_slots = _load_engine(load, plan.n_slots), plan.n_slots
        t1 = time.monotonic()
        for _ in self.engine.generate([Message("user", "Hi")], Limits(think_budget=0, max_tokens=1)):
            pass
        if not still_same(s.model_path, admitted.file_id):
            raise CorruptModelError(f"{s.model_path} was replaced while it was being loaded; restart the service "
                                    "to verify the new file")
        return {
            "model": s.model_name, "model_path": s.model_path, "plan": plan.to_dict(), "pid": os.getpid(),
            "n_ctx": self.engine.n_ctx, "n_slots": self.n_slots, "is_magistral": self.engine.is_magistral,
            "think_budget": load.think_budget if self.engine.is_magistral else 0,
            "n_threads": load.n_threads, "load_s": round(t1 - t0, 3), "warmup_s": round(time.monotonic() - t1, 3),
            "admission": {"file_id": admitted.file_id, "note": admitted.note, "hash_s": round(admitted.hash_s, 3)},
        }

    def _say_hashing(self, size: int) -> None:
        name = os.path.basename(self.settings.model_path)
        self.send(("status", f"verifying {name}: sha256 of {size / 1e9:.1f} GB against manifest.json"))

    # -------------------------------------------------------------------------- jobs
    def _run_job(self, job_id: str, spec: JobSpec) -> None:
        from edge_magistral.engine import Limits

        with self.turn_lock:
            self.current = job_id
        try:
            ids = self._prompt_ids(spec)
            if job_id in self.cancelled:  # the client left before the turn began: never run it
                self.send(("event", job_id, ("error", 499, "client_closed", "the client closed the request")))
                return
            limits = Limits(**spec.limits, raw=spec.kind == "raw")
            for ev in self.engine.generate_ids(ids, limits):
                self.events += 1
                self.send(("event", job_id, encode_event(ev)))
                if job_id in self.cancelled:  # a cancel that raced the start of the turn
                    self.engine.cancel()
        except Exception as e:
            self.send(("event", job_id, error_event(e)))
        finally:
            with self.turn_lock:
                self.current = None
                self._ended(job_id)

    def _submit_job(self, job_id: str, spec: JobSpec) -> None:
        """BatchEngine: submit the job (it waits inside the engine when every slot is busy) and
        forward its events from a thread of its own, so the next job can be submitted at once."""
        from edge_magistral.engine import Limits

        try:
            ids = self._prompt_ids(spec)
            limits = Limits(**spec.limits, raw=spec.kind == "raw")
            with self.turn_lock:  # a cancel either sees the stream or is seen here
                if job_id in self.cancelled:  # the client left before the job was submitted: never run it
                    self._ended(job_id)
                    self.send(("event", job_id, ("error", 499, "client_closed", "the client closed the request")))
                    return
                self.streams[job_id] = stream = self.engine.submit(ids, limits)
        except Exception as e:
            self.send(("event", job_id, error_event(e)))
            with self.turn_lock:
                self._ended(job_id)
            return
        threading.Thread(target=self._forward, args=(job_id, stream), name=f"job-{job_id[:8]}", daemon=True).start()

    def _forward(self, job_id: str, stream: Any) -> None:
        """One job's events to the front, until its Done (or its error)."""
        try:
            for ev in stream:
                self.events += 1
                self.send(("event", job_id, encode_event(ev)))
        except Exception as e:
            self.send(("event", job_id, error_event(e)))
        finally:
            with self.turn_lock:
                self.streams.pop(job_id, None)
                self._ended(job_id)

    def _ended(self, job_id: str) -> None:
        """Forget a job that ended (call with turn_lock held)."""
        self.cancelled.discard(job_id)
        self.known.discard(job_id)

    def _prompt_ids(self, spec: JobSpec) -> list[int]:
        """Chat: the model's own prompt format. Raw: BOS (when the model wants one) + the text,
        tokenized without special-token parsing, so a raw prompt can never forge control tokens."""
        from edge_magistral.chat import Message

        e = self.engine
        if spec.kind == "chat":
            system_mode = spec.limits.get("system_mode", "replace")
            ids = e.prompt_ids([Message(r, c) for r, c in spec.messages], system_mode)
        else:
            ids = e.llm.tokenize(b"", add_bos=True, special=False) + e.encode_text(spec.prompt)
        if len(ids) >= e.n_ctx:
            raise _PromptTooLong(f"the prompt is {len(ids)} tokens but the context holds {e.n_ctx}: "
                                 f"{len(ids) - e.n_ctx + 1} too many; shorten it (the server was started "
                                 "with this context; a larger --ctx needs more memory)")
        return ids


class _PromptTooLong(Exception):
    pass


def _load_engine(load: Any, n_slots: int) -> Any:
    """The single-sequence Engine for one slot (as before slots existed), else a BatchEngine."""
    if n_slots == 1:
        from edge_magistral.engine import Engine

        return Engine(load)
    from edge_magistral.batch import BatchEngine

    return BatchEngine(load, n_slots)


def error_event(e: Exception) -> tuple:
    """A job's failure as its last event: 400 for bad input, 503 for a backend failure, 500 (and
    a scrubbed traceback) for a bug; the worker keeps serving either way."""
    from edge_magistral.errors import BackendError, BadInputError

    if isinstance(e, _PromptTooLong):
        return ("error", 400, "context_length_exceeded", str(e))
    if isinstance(e, BadInputError):
        return ("error", 400, None, str(e))
    if isinstance(e, BackendError):
        return ("error", 503, "backend_error", str(e))
    print(scrubbed_traceback(e), file=sys.stderr, flush=True)
    return ("error", 500, "internal_error", f"internal error: {type(e).__name__}")


def scrubbed_traceback(e: BaseException) -> str:
    """A traceback with the exception's type but not its message: a message can quote the
    prompt or the answer, and those are never logged (RELIABILITY.md 30)."""
    frames = "".join(traceback.format_tb(e.__traceback__))
    return f"Traceback (most recent call last):\n{frames}{type(e).__module__}.{type(e).__qualname__} (message withheld)"
