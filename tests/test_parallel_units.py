"""Parallel slots without a model: the supervisor keeps n_slots jobs in flight (and the queue in
front of them), a worker crash fails every one of them, and the worker maps cancels to the
BatchEngine's streams (a job cancelled before it is submitted never runs)."""

from __future__ import annotations

import queue
import time

import pytest

from edge_magistral.server.errors import ApiError
from edge_magistral.server.supervisor import Job, State, Supervisor, SupervisorConfig
from edge_magistral.server.worker import JobSpec, WorkerSettings, _Worker


class _Link:
    def __init__(self) -> None:
        self.started = self.last_beat = 0.0
        self.kill_reason: str | None = None
        self.ready, self.gen = True, 1
        self.sent: list[tuple] = []

    def send(self, msg: tuple) -> None:
        self.sent.append(msg)

    def kill(self) -> None:
        pass


def _ready_supervisor(n_slots: int, queue_size: int = 2) -> tuple[Supervisor, _Link]:
    sup = Supervisor(WorkerSettings("m.gguf"), SupervisorConfig(queue_size=queue_size), clock=lambda: 0.0)
    link = sup.link = _Link()
    sup._on_ready({"n_slots": n_slots, "plan": {}})
    return sup, link


def _events(job: Job) -> list[tuple]:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


def test_n_slots_jobs_run_at_once_and_the_queue_is_in_front_of_them():
    sup, link = _ready_supervisor(3, queue_size=2)
    jobs = [sup.submit(JobSpec("chat"), None) for _ in range(5)]  # 3 running + 2 queued: all admitted
    assert [m[1] for m in link.sent if m[0] == "job"] == [j.id for j in jobs[:3]]
    assert len(sup.running) == 3 and list(sup.queue) == jobs[3:]
    with pytest.raises(ApiError) as refused:  # a sixth is refused at once
        sup.submit(JobSpec("chat"), None)
    assert refused.value.status == 429
    sup._on_job_event(jobs[1].id, ("done", {}))  # a slot frees: the oldest queued job takes it
    assert jobs[1].finished and [m[1] for m in link.sent if m[0] == "job"][-1] == jobs[3].id
    assert set(sup.running) == {jobs[0].id, jobs[2].id, jobs[3].id}
    assert sup.expected_wait_s() == sup.avg_job_s * 2 / 3


def test_cancel_of_a_running_job_goes_to_the_worker_and_a_queued_one_never_runs():
    sup, link = _ready_supervisor(2, queue_size=2)
    a, b, c = (sup.submit(JobSpec("chat"), None) for _ in range(3))
    sup.cancel(b)
    assert ("cancel", b.id) in link.sent and b.id in sup.running  # running until the worker ends it
    sup.cancel(c)
    assert c not in sup.queue and _events(c)[0][1] == 499
    sup._on_job_event(b.id, ("error", 499, "client_closed", "gone"))
    assert set(sup.running) == {a.id}


def test_a_worker_crash_fails_every_job_in_flight_and_queued_ones_wait():
    sup, link = _ready_supervisor(2, queue_size=2)
    sup._loop = _Loop()
    link.proc = _Proc()
    link.close = lambda: None
    link.oom_killed = lambda: False
    running = [sup.submit(JobSpec("chat"), None) for _ in range(2)]
    waiting = sup.submit(JobSpec("chat"), None)
    sup._on_worker_exit(link, "crashed")
    for job in running:
        (ev,) = _events(job)
        assert ev[:3] == ("error", 503, "worker_crashed") and int(ev[4]["Retry-After"]) >= 1
    assert not sup.running and list(sup.queue) == [waiting] and sup.state is State.RESTARTING


class _Loop:
    def call_later(self, delay, fn):
        pass


class _Proc:
    exitcode = -9
    pid = 1

    def join(self, timeout=None):
        pass


# ------------------------------------------------------------------------------------ the worker

class _Stream:
    def __init__(self) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self):
        while (ev := self.q.get()) is not None:
            yield ev


class _BatchEngine:
    n_ctx = 100

    def __init__(self) -> None:
        self.submitted: list[_Stream] = []
        self.cancelled: list[_Stream] = []

    def prompt_ids(self, messages, system_mode) -> list[int]:
        return [1, 2, 3]

    def submit(self, ids, limits) -> _Stream:
        s = _Stream()
        self.submitted.append(s)
        return s

    def cancel(self, stream) -> None:
        self.cancelled.append(stream)
        stream.q.put(None)


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, msg: tuple) -> None:
        self.sent.append(msg)


def _batch_worker() -> tuple[_Worker, _BatchEngine, _Pipe]:
    pipe, engine = _Pipe(), _BatchEngine()
    w = _Worker(pipe, WorkerSettings("m.gguf"))
    w.engine, w.n_slots = engine, 2
    return w, engine, pipe


def test_worker_cancels_map_to_the_jobs_own_stream():
    w, engine, _ = _batch_worker()
    w._submit_job("a", JobSpec("chat", messages=(("user", "hi"),)))
    w._submit_job("b", JobSpec("chat", messages=(("user", "hi"),)))
    sa, sb = engine.submitted
    assert set(w.streams) == {"a", "b"}
    w.cancelled.add("b")
    w._cancel_current()
    assert engine.cancelled == [sb]  # only b's stream; a keeps running
    sa.q.put(None)
    _until(lambda: not w.streams)
    w._cancel_current()
    assert engine.cancelled == [sb] and not w.cancelled


def test_worker_job_cancelled_before_submit_never_runs():
    w, engine, pipe = _batch_worker()
    w.cancelled.add("gone")
    w._submit_job("gone", JobSpec("chat", messages=(("user", "hi"),)))
    assert not engine.submitted and not w.streams and not w.cancelled
    assert pipe.sent == [("event", "gone", ("error", 499, "client_closed", "the client closed the request"))]


def test_worker_stop_cancels_every_running_stream():
    w, engine, _ = _batch_worker()
    for job_id in ("a", "b"):
        w._submit_job(job_id, JobSpec("chat", messages=(("user", "hi"),)))
    w._cancel_all()
    assert engine.cancelled == engine.submitted
    _until(lambda: not w.streams)


def _until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "not within the timeout"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- the service config

def test_service_config_pins_the_planned_slots(tmp_path):
    from edge_magistral.cli.serve_cmds import _from_file
    from edge_magistral.errors import BadInputError
    from edge_magistral.systemd import ServiceConfig, read_service_config

    path = tmp_path / "config.yaml"
    path.write_text(ServiceConfig(model="/m.gguf", ctx=8192, parallel=3).to_yaml())
    assert read_service_config(path).parallel == 3 and _from_file(str(path))["parallel"] == 3
    path.write_text("model: /m.gguf\nparallel: 0\n")
    with pytest.raises(BadInputError, match="`parallel` is 0, outside 1..64"):
        read_service_config(path)
    path.write_text("model: /m.gguf\n")
    assert read_service_config(path).parallel is None  # the planner chooses at each start
