"""The OpenAI-compatible routes: validated requests become worker jobs; job events become
OpenAI responses (JSON or server-sent events).

Reporting follows ../shared/RELIABILITY.md: the thought in ``reasoning_content``, the answer in
``content``; ``finish_reason`` is ``stop`` or ``length`` only; what the watchdog did is in the
extension object ``watchdog``; ``usage.completion_tokens_details.reasoning_tokens`` counts the
thought. A streamed response sends its headers only once the first event is known, so that an
error before the first token (a prompt too long, a worker crash) is still a proper 4xx/503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge_magistral.server.errors import ApiError
from edge_magistral.server.schemas import ChatCompletionRequest, CompletionRequest
from edge_magistral.server.supervisor import Job, State, Supervisor
from edge_magistral.server.worker import JobSpec

log = logging.getLogger(__name__)
router = APIRouter()

DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.0}  # Magistral's recommendation
EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": None}  # None: server default
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ------------------------------------------------------------------------- request → job

def _check_max(value: int | None, cap: int, name: str) -> None:
    if value is not None and value > cap:
        raise ApiError(400, f"{name}={value} is more than this server allows ({cap})", param=name,
                       code="value_too_large")


def _common_limits(req: Any, max_tokens: int | None, cap: int) -> dict[str, Any]:
    _check_max(max_tokens, cap, "max_tokens")
    return {
        "max_tokens": max_tokens or cap,
        "temperature": DEFAULTS["temperature"] if req.temperature is None else req.temperature,
        "top_p": DEFAULTS["top_p"] if req.top_p is None else req.top_p,
        "top_k": DEFAULTS["top_k"] if req.top_k is None else req.top_k,
        "min_p": DEFAULTS["min_p"] if req.min_p is None else req.min_p,
        "seed": req.seed,
        "stop": req.stops(),
    }


def think_budget(req: ChatCompletionRequest, default: int, n_ctx: int) -> int | None:
    """The think budget asked for: max_thinking_tokens, or reasoning_effort mapped within the
    server's default budget (which the plan sized for this box's context); None: the default."""
    if req.max_thinking_tokens is not None:
        _check_max(req.max_thinking_tokens, n_ctx, "max_thinking_tokens")
        return req.max_thinking_tokens
    if req.reasoning_effort is not None:
        budget = EFFORT_BUDGETS[req.reasoning_effort]
        return default if budget is None else min(budget, default)
    return None


def chat_job(req: ChatCompletionRequest, info: dict[str, Any], cap: int) -> JobSpec:
    n_ctx = info["n_ctx"]
    limits = _common_limits(req, req.max_completion_tokens or req.max_tokens, cap)
    _check_max(req.max_answer_tokens, cap, "max_answer_tokens")
    limits.update(
        think_budget=think_budget(req, info["think_budget"], n_ctx),
        answer_budget=req.max_answer_tokens,
        json_schema=req.response_format.schema_dict() if req.response_format else None,
        system_mode=req.system_mode or "replace",
        force_thinking=bool(req.force_thinking),
    )
    messages = tuple(("system" if m.role == "developer" else m.role, m.text()) for m in req.messages)
    return JobSpec("chat", limits, messages=messages)


def raw_job(req: CompletionRequest, cap: int) -> JobSpec:
    return JobSpec("raw", _common_limits(req, req.max_tokens, cap), prompt=req.prompt)


# ------------------------------------------------------------------------------ running

@dataclass
class Outcome:
    """What a finished job produced."""

    thinking: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    done: dict[str, Any] | None = None
    first_text_at: float | None = None


def error_from_event(ev: tuple) -> ApiError:
    """An ("error", status, code, message[, headers]) event as an ApiError."""
    headers = ev[4] if len(ev) > 4 else ({"Retry-After": "5"} if ev[1] == 503 else {})
    return ApiError(ev[1], ev[3], code=ev[2], headers=headers)


class RequestRun:
    """A job tied to its HTTP request: the client going away cancels the job."""

    def __init__(self, sup: Supervisor, job: Job, request: Request):
        self.sup, self.job = sup, job
        self.t0 = time.monotonic()
        self.outcome = Outcome()
        self._watch = asyncio.create_task(self._watch_disconnect(request))

    async def _watch_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.sup.cancel(self.job)

    async def next(self) -> tuple:
        """The next event, recorded in the outcome."""
        ev = await self.job.events.get()
        kind, o = ev[0], self.outcome
        if kind in ("thinking", "answer") and o.first_text_at is None:
            o.first_text_at = time.monotonic()
        if kind == "thinking":
            o.thinking.append(ev[1])
        elif kind == "answer":
            o.answer.append(ev[1])
        elif kind == "done":
            o.done = ev[1]
        return ev

    async def finish(self) -> Outcome:
        """Run to the end (non-streaming)."""
        while (ev := await self.next())[0] != "done":
            if ev[0] == "error":
                raise error_from_event(ev)
        if self.job.cancelled:  # nobody is listening; counted apart from answers in the metrics
            raise ApiError(499, "the client closed the request", code="client_closed")
        return self.outcome

    def close(self) -> None:
        self._watch.cancel()
        self.sup.cancel(self.job)  # a no-op when it has finished

    @property
    def ttft_s(self) -> float | None:
        t = self.outcome.first_text_at
        return None if t is None else t - self.t0


def _start(request: Request, spec: JobSpec, deadline_s: float | None) -> RequestRun:
    sup: Supervisor = request.app.state.supervisor
    return RequestRun(sup, sup.submit(spec, _deadline(request, deadline_s)), request)


def _deadline(request: Request, asked: float | None) -> float:
    cap = request.app.state.config.request_timeout_s
    return min(asked, cap) if asked else cap


def _ready_info(request: Request) -> dict[str, Any]:
    sup: Supervisor = request.app.state.supervisor
    if not sup.info:
        raise ApiError(503, "the model is loading; retry shortly", code="model_loading", headers={"Retry-After": "5"})
    return sup.info


def _cap(request: Request, info: dict[str, Any]) -> int:
    return min(request.app.state.config.max_tokens or info["n_ctx"], info["n_ctx"])


# ------------------------------------------------------------------------- formatting

def usage(done: dict[str, Any]) -> dict[str, Any]:
    u = done["usage"]
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": done["timings"]["cached_prompt_tokens"]},
            "completion_tokens_details": {"reasoning_tokens": u["reasoning_tokens"]}}


def watchdog_ext(done: dict[str, Any]) -> dict[str, Any]:
    """The extension object: why the turn ended and every intervention of the watchdog."""
    return {"stop_reason": done["stop_reason"], "reasoning_truncated": done["reasoning_truncated"],
            "reasoning_tokens": done["usage"]["reasoning_tokens"],
            "think_budget": done.get("sampling", {}).get("think_budget"), "events": done["watchdog_events"]}


def finish_reason(done: dict[str, Any]) -> str:
    """OpenAI's values only: a cancelled turn (deadline, shutdown) was cut, so "length"."""
    return "stop" if done["finish_reason"] == "stop" else "length"


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


@dataclass
class _Meta:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


def _after(request: Request, run: RequestRun, kind: str, payload: Any) -> None:
    """Metrics and the audit record of a finished generation."""
    o, state = run.outcome, request.app.state
    if o.done is None:
        return
    state.metrics.finished(o.done, run.ttft_s, time.monotonic() - run.t0)
    if state.audit is not None:
        state.audit.record(run.job.id, kind, payload, o)


# ----------------------------------------------------------------------------- routes

@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    info = _ready_info(request)
    spec = chat_job(req, info, _cap(request, info))
    run = _start(request, spec, req.deadline_s)
    meta = _meta("chatcmpl", info)
    payload = [{"role": r, "content": c} for r, c in spec.messages]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _chat_chunks(run, meta, include_usage, lambda: _after(request, run, "chat", payload))
        return await _streaming(run, chunks)
    try:
        o = await run.finish()
    finally:
        run.close()
    _after(request, run, "chat", payload)
    message = {"role": "assistant", "content": "".join(o.answer),
               "reasoning_content": "".join(o.thinking) or None}
    return JSONResponse({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(o.done), "logprobs": None}],
        "usage": usage(o.done), "watchdog": watchdog_ext(o.done), "system_fingerprint": None,
    })


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    info = _ready_info(request)
    run = _start(request, raw_job(req, _cap(request, info)), req.deadline_s)
    meta = _meta("cmpl", info)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _text_chunks(run, meta, include_usage, lambda: _after(request, run, "raw", req.prompt))
        return await _streaming(run, chunks)
    try:
        o = await run.finish()
    finally:
        run.close()
    _after(request, run, "raw", req.prompt)
    return JSONResponse({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
        "choices": [{"index": 0, "text": "".join(o.thinking + o.answer), "finish_reason": finish_reason(o.done),
                     "logprobs": None}],
        "usage": usage(o.done), "watchdog": watchdog_ext(o.done),
    })


def _meta(prefix: str, info: dict[str, Any]) -> _Meta:
    return _Meta(f"{prefix}-{uuid.uuid4().hex}", info["model"])


async def _streaming(run: RequestRun, chunks: AsyncIterator[bytes]) -> Response:
    """Wait for the first event (an early error becomes a proper status), then stream."""
    try:
        first = await chunks.__anext__()
    except BaseException:
        run.close()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for c in chunks:
                yield c
        finally:
            run.close()
    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _events_until_text(run: RequestRun) -> list[tuple]:
    """Events up to and including the first that produces output; an error before it raises."""
    seen = []
    while True:
        ev = await run.next()
        if ev[0] == "error":
            raise error_from_event(ev)
        seen.append(ev)
        if ev[0] in ("thinking", "answer", "done"):
            return seen


async def _event_stream(run: RequestRun) -> AsyncIterator[tuple]:
    for ev in await _events_until_text(run):
        yield ev
        if ev[0] == "done":
            return
    while True:
        ev = await run.next()
        yield ev
        if ev[0] in ("done", "error"):
            return


async def _chat_chunks(run: RequestRun, meta: _Meta, include_usage: bool, after: Any) -> AsyncIterator[bytes]:
    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
        return sse({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra})

    events = _event_stream(run)
    first = await events.__anext__()  # errors before any output propagate as a status code
    yield chunk({"role": "assistant", "content": ""})
    async for ev in _chain(first, events):
        if ev[0] == "thinking":
            yield chunk({"reasoning_content": ev[1]})
        elif ev[0] == "answer":
            yield chunk({"content": ev[1]})
        elif ev[0] == "error":
            yield sse(error_from_event(ev).body())
            return
        elif ev[0] == "done":
            after()
            yield chunk({}, finish_reason(ev[1]), watchdog=watchdog_ext(ev[1]))
            if include_usage:
                yield sse({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                           "model": meta.model, "choices": [], "usage": usage(ev[1])})
            yield b"data: [DONE]\n\n"
            return


async def _text_chunks(run: RequestRun, meta: _Meta, include_usage: bool, after: Any) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None = None, **extra: Any) -> bytes:
        return sse({"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], **extra})

    events = _event_stream(run)
    first = await events.__anext__()
    async for ev in _chain(first, events):
        if ev[0] in ("thinking", "answer"):
            yield chunk(ev[1])
        elif ev[0] == "error":
            yield sse(error_from_event(ev).body())
            return
        elif ev[0] == "done":
            after()
            yield chunk("", finish_reason(ev[1]), watchdog=watchdog_ext(ev[1]))
            if include_usage:
                yield sse({"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                           "choices": [], "usage": usage(ev[1])})
            yield b"data: [DONE]\n\n"
            return


async def _chain(first: tuple, rest: AsyncIterator[tuple]) -> AsyncIterator[tuple]:
    yield first
    async for ev in rest:
        yield ev


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    card = _model_card(request)
    if model_id != card["id"]:
        raise ApiError(404, f"model {model_id!r} is not served here; this server serves {card['id']!r}",
                       param="model", code="model_not_found")
    return card


def _model_card(request: Request) -> dict[str, Any]:
    config = request.app.state.config
    return {"id": config.model_name, "object": "model", "created": config.model_created, "owned_by": "edge-magistral"}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Open (no key): 200 when the model is loaded and the worker healthy, else 503."""
    sup: Supervisor = request.app.state.supervisor
    if sup.state is State.READY:
        plan = sup.info.get("plan", {})
        keys = ("quant", "profile", "n_ctx", "n_gpu_layers", "type_k", "type_v", "flash_attn", "think_budget",
                "n_slots")
        return JSONResponse({"status": "ok", "model": sup.info.get("model"),
                             "plan": {k: plan.get(k) for k in keys}, "queue": len(sup.queue),
                             "generating": bool(sup.running),
                             "slots": {"busy": len(sup.running), "total": sup.n_slots}})
    return JSONResponse({"status": sup.state.value}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    m = request.app.state.metrics
    m.observe_supervisor(request.app.state.supervisor)  # now, not as of the last tick: /health agrees
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())
