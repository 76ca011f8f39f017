"""The messages between the front (the HTTP process's supervisor) and the model worker process.

Each message is one frozen dataclass, pickled over a ``multiprocessing`` pipe (one message per
``send``); both sides route them with ``match``. Nothing here imports llama.cpp: the front never
loads it, and the engine's events (:mod:`edge_magistral.generation`) cross the pipe as they are.

front → worker
    :class:`RunJob` a generation to run (its id and :class:`JobSpec`); the front sends at most
    ``n_slots`` (from :class:`Ready`) that have not ended. :class:`Cancel` stops one (a cancel
    for a job that has already ended is dropped). :class:`Stop` cancels everything and ends the
    worker.

worker → front
    :class:`Heartbeat` every ``BEAT_INTERVAL_S`` from the first moment of the process, loading
    included: ``events`` and ``progress`` grow whenever the engine advances (an event sent, a
    prefill batch evaluated), so the front can tell "busy and advancing" from "hung inside a
    llama.cpp call". :class:`Status` a STATUS line while loading (the sha256 being verified).
    :class:`WaitingForWorker` while an RPC worker of the model does not answer (loading waits).
    :class:`Ready` once the model is admitted, loaded and warmed up (``info`` is what the front
    reports; ``info["n_slots"]`` is how many jobs it may have in flight). :class:`Fatal` when the
    model cannot be loaded at all (retrying would not help). :class:`JobEvent` one engine event
    of a job; its :class:`~edge_magistral.generation.Done` ends the job. :class:`JobError` ends a
    job that failed, with the HTTP status and OpenAI error code to answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_magistral.generation import DEFAULT_LIMITS, Event, Limits
from edge_magistral.tools import Conversation

BEAT_INTERVAL_S = 0.5


@dataclass(frozen=True)
class JobSpec:
    """One generation: a chat (its validated ``conversation``: messages, tools, system mode; the
    worker encodes it, and ``limits.tools`` says what the turn may call) or a raw text ``prompt``
    (tokenized without special tokens; ``limits.raw`` is set for it)."""

    kind: str  # "chat" | "raw"
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    conversation: Conversation | None = None
    prompt: str = ""


# ------------------------------------------------------------------------- front → worker

@dataclass(frozen=True)
class RunJob:
    job_id: str
    spec: JobSpec


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class Stop:
    pass


ToWorker = RunJob | Cancel | Stop


# ------------------------------------------------------------------------- worker → front

@dataclass(frozen=True)
class Heartbeat:
    events: int  # engine events sent so far
    progress: int  # tokens the engine has evaluated (prompt batches included)


@dataclass(frozen=True)
class Status:
    text: str


@dataclass(frozen=True)
class WaitingForWorker:
    """Loading waits for an RPC worker that does not answer (or is busy): the reason, one line.
    The load timeout starts once every worker has answered (waiting is not a hung load)."""

    endpoint: str
    reason: str


@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]


@dataclass(frozen=True)
class Fatal:
    error_type: str
    message: str
    exit_code: int


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    event: Event


@dataclass(frozen=True)
class JobError:
    job_id: str
    status: int  # the HTTP status to answer
    code: str | None  # OpenAI's error code
    message: str


ToFront = Heartbeat | Status | WaitingForWorker | Ready | Fatal | JobEvent | JobError
