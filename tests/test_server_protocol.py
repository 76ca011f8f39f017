"""The worker and the supervisor without a model, through their public interfaces: the worker
driven by protocol messages over a fake engine, the supervisor fed worker messages from a fake
link on an injected monotonic clock. Covers cancels (a job cancelled before it is submitted
never runs; a cancel reaches only its own job's stream; a late cancel is not kept), slots and
the queue in front of them, worker crashes (503 for every job in flight, restarts that back
off, giving up after too many) and deadlines measured on the monotonic clock only. Nothing
here waits on a timer: every wait is for a signal the fake sends, with a bound only to fail."""

from __future__ import annotations

import asyncio
import pickle
import queue
import subprocess
import sys
import threading
import time

import pytest

from edge_magistral.generation import AnswerText, Done, Limits, ThinkingText, Timings, Usage, WatchdogAction
from edge_magistral.server.errors import ApiError
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
)
from edge_magistral.server.supervisor import Job, State, Supervisor, SupervisorConfig
from edge_magistral.server.worker import Worker, WorkerSettings
from edge_magistral.tools import conversation_from_request

DONE = Done("stop", "eos", Usage(3, 0, 1), Timings(0.0, 0.0, None, 0.0, 0.0, 0.0, 0), False)
SPEC = JobSpec("chat", conversation=conversation_from_request({"messages": [{"role": "user", "content": "hi"}]}))
BOUND_S = 10  # only ever reached when the behaviour under test is broken


# ------------------------------------------------------------------------------- the protocol

def test_every_message_pickles_and_the_front_never_imports_llama_cpp():
    messages = [RunJob("a", JobSpec("raw", Limits(max_tokens=3, raw=True), prompt="x")), Cancel("a"), Stop(),
                Heartbeat(1, 2), Status("s"), Ready({"n_slots": 2}), Fatal("BadInputError", "m", 2),
                JobEvent("a", ThinkingText("t")), JobEvent("a", AnswerText("t")),
                JobEvent("a", WatchdogAction("stop", "loop", "d")), JobEvent("a", DONE),
                JobError("a", 400, "context_length_exceeded", "m")]
    for m in messages:
        assert pickle.loads(pickle.dumps(m)) == m
    code = ("import sys, edge_magistral.server.app, edge_magistral.server.api, edge_magistral.server.supervisor; "
            "sys.exit('llama_cpp' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------- the worker

class _Stream:
    """A fake engine stream: what the test puts, then Done when released (None) or cancelled."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self):
        while (ev := self.q.get()) is not None:
            yield ev
        yield DONE


class _Engine:
    """The engine interface the worker uses, recording what it is asked to do. ``gate``: when
    set, tokenizing waits for it (and says so on ``tokenizing``)."""

    n_ctx, n_slots, is_magistral, tokens_evaluated = 100, 2, True, 0

    def __init__(self) -> None:
        self.submitted: list[_Stream] = []
        self.cancelled: list[_Stream] = []
        self.closed = False
        self.gate: threading.Event | None = None
        self.tokenizing = threading.Event()
        self._cv = threading.Condition()

    def prompt_ids(self, messages, system_mode, tools=()) -> list[int]:
        if self.gate is not None:
            self.tokenizing.set()
            assert self.gate.wait(BOUND_S)
        return [1, 2, 3]

    def raw_prompt_ids(self, text: str) -> list[int]:
        return [1, 4]

    def submit(self, ids, limits) -> _Stream:
        with self._cv:
            self.submitted.append(s := _Stream())
            self._cv.notify_all()
        return s

    def cancel(self, stream: _Stream) -> None:
        self.cancelled.append(stream)
        stream.q.put(None)

    def close(self) -> None:
        self.closed = True

    def wait_submitted(self, n: int) -> list[_Stream]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.submitted) >= n, BOUND_S)
            return list(self.submitted)


class _Pipe:
    """The worker's end of the pipe: what it sent, and a wait for a message."""

    def __init__(self) -> None:
        self.sent: list = []
        self._cv = threading.Condition()

    def send(self, msg) -> None:
        with self._cv:
            self.sent.append(msg)
            self._cv.notify_all()

    def wait_for(self, msg) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: msg in self.sent, BOUND_S), self.sent


def _worker() -> tuple[Worker, _Engine, _Pipe]:
    pipe, engine = _Pipe(), _Engine()
    return Worker(pipe, WorkerSettings("m.gguf"), engine=engine), engine, pipe


def _serve(w: Worker) -> threading.Thread:
    t = threading.Thread(target=w.serve, daemon=True)
    t.start()
    return t


def test_a_job_cancelled_before_its_turn_never_runs():
    """A cancel that arrives while the job waits in the worker (or is being tokenized) drops the
    job, and a cancel only ever reaches the turn of its own job."""
    w, engine, pipe = _worker()
    w.handle(RunJob("gone", SPEC))
    w.handle(Cancel("gone"))
    w.handle(RunJob("next", SPEC))
    serving = _serve(w)
    (stream,) = engine.wait_submitted(1)  # "next" only
    assert pipe.sent[0] == JobError("gone", 499, "client_closed", "the client closed the request")
    assert "gone" not in w.jobs

    w.handle(Cancel("old"))  # a late cancel for a job that has finished
    assert engine.cancelled == []
    w.handle(Cancel("next"))
    pipe.wait_for(JobEvent("next", DONE))  # its stream was cancelled (Done is what the fake sends then)
    assert engine.cancelled == [stream]
    w.handle(Stop())
    serving.join(BOUND_S)
    assert len(engine.submitted) == 1 and not w.jobs and engine.closed


def test_a_cancel_after_its_job_ended_is_not_kept():
    """A cancel that crosses its job's end on the pipe must not stay in the worker for good."""
    w, engine, pipe = _worker()
    serving = _serve(w)
    w.handle(RunJob("a", SPEC))
    engine.wait_submitted(1)[0].q.put(None)
    pipe.wait_for(JobEvent("a", DONE))
    assert len(engine.submitted) == 1 and not w.jobs
    w.handle(Cancel("a"))  # too late: the job has ended
    assert not w.jobs and not engine.cancelled

    engine.gate = threading.Event()  # b waits in tokenization ...
    w.handle(RunJob("b", SPEC))
    assert engine.tokenizing.wait(BOUND_S)
    w.handle(Cancel("b"))  # ... when its cancel comes: b never runs
    engine.gate.set()
    pipe.wait_for(JobError("b", 499, "client_closed", "the client closed the request"))
    assert len(engine.submitted) == 1 and not w.jobs
    w.handle(Stop())
    serving.join(BOUND_S)


def test_worker_cancels_map_to_the_jobs_own_stream():
    w, engine, pipe = _worker()
    serving = _serve(w)
    w.handle(RunJob("a", SPEC))
    w.handle(RunJob("b", SPEC))
    sa, sb = engine.wait_submitted(2)
    assert set(w.jobs) == {"a", "b"}
    w.handle(Cancel("b"))
    pipe.wait_for(JobEvent("b", DONE))
    assert engine.cancelled == [sb] and JobEvent("a", DONE) not in pipe.sent  # only b's stream; a keeps running
    sa.q.put(AnswerText("x"))
    sa.q.put(None)
    pipe.wait_for(JobEvent("a", DONE))
    assert pipe.sent.index(JobEvent("a", AnswerText("x"))) < pipe.sent.index(JobEvent("a", DONE))
    w.handle(Cancel("a"))
    assert engine.cancelled == [sb] and not w.jobs
    w.handle(Stop())
    serving.join(BOUND_S)


def test_worker_stop_cancels_every_running_stream():
    w, engine, _ = _worker()
    serving = _serve(w)
    for job_id in ("a", "b"):
        w.handle(RunJob(job_id, SPEC))
    engine.wait_submitted(2)
    w.handle(Stop())
    serving.join(BOUND_S)
    assert not serving.is_alive() and engine.closed  # the engine closes once every job has ended
    assert {id(s) for s in engine.cancelled} == {id(s) for s in engine.submitted} and not w.jobs


def test_engine_errors_become_job_errors_and_the_worker_keeps_serving():
    """Refused at submit or raised by the stream: a too-long prompt is 400 context_length_exceeded,
    other bad input 400, a backend failure 503; the next job runs as usual."""
    from edge_magistral.errors import BackendError, BadInputError, PromptTooLongError

    w, engine, pipe = _worker()
    submit = engine.submit
    failures = iter([PromptTooLongError("the prompt is 9 tokens; 1 too many"), BadInputError("bad")])

    def refusing_submit(ids, limits):
        raise next(failures)

    def failing_stream():
        yield AnswerText("x")
        raise BackendError("decode failed")

    engine.submit = refusing_submit
    serving = _serve(w)
    for job_id in ("long", "bad"):
        w.handle(RunJob(job_id, SPEC))
    pipe.wait_for(JobError("bad", 400, None, "bad"))
    engine.submit = lambda ids, limits: failing_stream()
    w.handle(RunJob("backend", SPEC))
    pipe.wait_for(JobError("backend", 503, "backend_error", "decode failed"))
    engine.submit = submit
    w.handle(RunJob("ok", SPEC))
    engine.wait_submitted(1)[0].q.put(None)
    pipe.wait_for(JobEvent("ok", DONE))
    w.handle(Stop())
    serving.join(BOUND_S)
    assert pipe.sent == [JobError("long", 400, "context_length_exceeded", "the prompt is 9 tokens; 1 too many"),
                         JobError("bad", 400, None, "bad"), JobEvent("backend", AnswerText("x")),
                         JobError("backend", 503, "backend_error", "decode failed"), JobEvent("ok", DONE)]


# ----------------------------------------------------------------------------- the supervisor

class _Link:
    """A worker link that records what the supervisor sends; the test plays the worker."""

    def __init__(self, settings, on_message, gen: int, now: float):
        self.gen, self.started, self.last_beat = gen, now, now
        self.kill_reason: str | None = None
        self.killed, self.ready = False, False
        self.sent: list = []
        self.pid = 1000 + gen

    def send(self, msg) -> None:
        self.sent.append(msg)

    def kill(self) -> None:
        self.killed = True

    def join(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass

    def reap(self) -> tuple[str, str]:
        return (self.kill_reason or "killed", "SIGKILL: out of memory?")

    def job_ids(self) -> list[str]:
        return [m.job_id for m in self.sent if isinstance(m, RunJob)]


def _supervisor(now: list[float], on_fatal=None, **config) -> tuple[Supervisor, list[_Link]]:
    links: list[_Link] = []

    def spawn(*args) -> _Link:
        links.append(_Link(*args))
        return links[-1]

    sup = Supervisor(WorkerSettings("m.gguf"), SupervisorConfig(**config), on_fatal=on_fatal,
                     clock=lambda: now[0], spawn=spawn)
    return sup, links


async def _ready(sup: Supervisor, n_slots: int) -> _Link:
    """Start the supervisor; its (fake) worker loads and beats once."""
    await sup.start()
    link = sup.link
    sup.on_worker_message(link.gen, Ready({"n_slots": n_slots, "plan": {}, "n_ctx": 100}))
    sup.on_worker_message(link.gen, Heartbeat(0, 0))
    return link


def _events(job: Job) -> list:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


def test_repeated_worker_failures_stop_the_service():
    """Restarts back off, and too many failures in the window end the service (exit 1) so that
    systemd's restart policy and start limit take over."""
    now, fatal = [0.0], []
    sup, links = _supervisor(now, lambda code, message: fatal.append((code, message)), max_restarts=3,
                             restart_window_s=60)

    async def go():
        await sup.start()
        backoffs = []
        for _ in range(3):
            crashed_at = now[0]
            sup.on_worker_message(sup.link.gen, None)  # the worker died
            assert sup.state is State.RESTARTING and sup.link is None
            now[0] = sup.restart_at - 0.01
            sup.check()
            assert sup.state is State.RESTARTING  # not before the backoff
            now[0] = sup.restart_at
            sup.check()
            assert sup.state is State.LOADING and sup.link is links[-1]
            backoffs.append(now[0] - crashed_at)
        assert backoffs == [0.5, 1.0, 2.0] and not fatal and len(links) == 4
        sup.on_worker_message(sup.link.gen, None)
        assert sup.state is State.FAILED and fatal == [(1, "the model worker failed 4 times in 60 s")]
    asyncio.run(go())


def test_deadlines_follow_the_monotonic_clock_not_the_wall_clock(monkeypatch):
    """The stall timeout and the queue deadline are measured on the injected monotonic clock;
    the wall clock jumping decades either way changes nothing."""
    now = [1000.0]
    sup, _ = _supervisor(now, stall_timeout_s=10, beat_timeout_s=5)

    async def go():
        link = await _ready(sup, 1)
        busy = sup.submit(JobSpec("chat"), None)
        queued = sup.submit(JobSpec("chat"), deadline_s=5)
        for wall in (4e9, 0.0):  # 2096, then 1970 (and it stays there)
            monkeypatch.setattr(time, "time", lambda wall=wall: wall)
            sup.check()
            assert not link.killed and sup.healthy()
        now[0] += 9.9
        sup.on_worker_message(link.gen, Heartbeat(0, 0))  # alive, but the busy job made no progress
        sup.check()
        assert not link.killed
        now[0] += 0.2
        sup.check()
        assert link.killed and link.kill_reason.startswith("hung")

        sup.on_worker_message(link.gen, JobEvent(busy.id, DONE))  # the queued job's 5 s have (nearly) passed
        assert busy.finished and queued.events.get_nowait().code == "queue_timeout"
        assert link.job_ids() == [busy.id]  # the queued one was never sent
    asyncio.run(go())


def test_n_slots_jobs_run_at_once_and_the_queue_is_in_front_of_them():
    sup, _ = _supervisor([0.0], queue_size=2)

    async def go():
        link = await _ready(sup, 3)
        jobs = [sup.submit(JobSpec("chat"), None) for _ in range(5)]  # 3 running + 2 queued: all admitted
        assert link.job_ids() == [j.id for j in jobs[:3]]
        assert len(sup.running) == 3 and list(sup.queue) == jobs[3:]
        with pytest.raises(ApiError) as refused:  # a sixth is refused at once
            sup.submit(JobSpec("chat"), None)
        assert refused.value.status == 429
        sup.on_worker_message(link.gen, JobEvent(jobs[1].id, DONE))  # a slot frees: the oldest queued job takes it
        assert jobs[1].finished and link.job_ids()[-1] == jobs[3].id
        assert set(sup.running) == {jobs[0].id, jobs[2].id, jobs[3].id}
        assert sup.expected_wait_s() == sup.avg_job_s * 2 / 3
    asyncio.run(go())


def test_cancel_of_a_running_job_goes_to_the_worker_and_a_queued_one_never_runs():
    sup, _ = _supervisor([0.0], queue_size=2)

    async def go():
        link = await _ready(sup, 2)
        a, b, c = (sup.submit(JobSpec("chat"), None) for _ in range(3))
        sup.cancel(b)
        assert Cancel(b.id) in link.sent and b.id in sup.running  # running until the worker ends it
        sup.cancel(c)
        assert c not in sup.queue and _events(c)[0].status == 499
        sup.on_worker_message(link.gen, JobError(b.id, 499, "client_closed", "gone"))
        assert set(sup.running) == {a.id}
    asyncio.run(go())


def test_a_worker_crash_fails_every_job_in_flight_and_queued_ones_wait():
    sup, _ = _supervisor([0.0], queue_size=2)

    async def go():
        link = await _ready(sup, 2)
        running = [sup.submit(JobSpec("chat"), None) for _ in range(2)]
        waiting = sup.submit(JobSpec("chat"), None)
        sup.on_worker_message(link.gen, None)
        for job in running:
            (err,) = _events(job)
            assert (err.status, err.code) == (503, "worker_crashed") and int(err.headers["Retry-After"]) >= 1
        assert not sup.running and list(sup.queue) == [waiting] and sup.state is State.RESTARTING
    asyncio.run(go())


def test_job_events_reach_the_request_and_a_worker_error_keeps_its_status():
    sup, _ = _supervisor([0.0])

    async def go():
        link = await _ready(sup, 1)
        ok, bad = sup.submit(JobSpec("chat"), None), sup.submit(JobSpec("chat"), None)
        for ev in (ThinkingText("t"), AnswerText("a"), DONE):
            sup.on_worker_message(link.gen, JobEvent(ok.id, ev))
        assert _events(ok) == [ThinkingText("t"), AnswerText("a"), DONE] and ok.produced and ok.finished
        sup.on_worker_message(link.gen, JobError(bad.id, 400, "context_length_exceeded", "too many"))
        (err,) = _events(bad)
        assert (err.status, err.code, err.message) == (400, "context_length_exceeded", "too many")
        sup.on_worker_message(link.gen + 1, JobEvent(ok.id, DONE))  # from no worker of ours: ignored
        assert not sup.running
    asyncio.run(go())
