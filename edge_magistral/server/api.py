"""The OpenAI-compatible routes: validated requests become worker jobs; job events become
OpenAI responses (JSON or server-sent events), one builder for both response types with a
format for each (chat.completion vs text_completion).

The thought goes in ``reasoning_content``, the answer in ``content`` (a raw completion: all of
it in ``text``), the calls in ``tool_calls`` (streamed as OpenAI streams them: id and name once,
then argument pieces); ``finish_reason`` is ``tool_calls``, ``stop`` or ``length`` only, as
OpenAI clients expect; what the [THINK] watchdog did, and a call the model botched
(``tool_error``), is in the extension object ``watchdog``;
``usage.completion_tokens_details.reasoning_tokens`` counts the thought. A streamed response
sends its headers only once the first event is known, so that an error before the first token
(a prompt too long, a worker crash) is still a proper 4xx/503.
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

from edge_magistral.audit import chat_prompt
from edge_magistral.chat import uses_tools
from edge_magistral.errors import BadInputError
from edge_magistral.generation import AnswerText, CallArguments, CallStart, Done, Event, Limits, ThinkingText
from edge_magistral.server.errors import ApiError
from edge_magistral.server.protocol import JobSpec
from edge_magistral.server.schemas import ChatCompletionRequest, CompletionRequest
from edge_magistral.server.supervisor import Job, State, Supervisor
from edge_magistral.tools import Conversation, conversation_from_request

log = logging.getLogger(__name__)
router = APIRouter()

EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": None}  # None: server default
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OUTPUT = (ThinkingText, AnswerText, CallStart, CallArguments)  # the events a client sees as output
Piece = ThinkingText | AnswerText | CallStart | CallArguments


# ------------------------------------------------------------------------- request → job

def _check_max(value: int | None, cap: int, name: str) -> None:
    if value is not None and value > cap:
        raise ApiError(400, f"{name}={value} is more than this server allows ({cap})", param=name,
                       code="value_too_large")


def _common_limits(req: Any, max_tokens: int | None, cap: int) -> dict[str, Any]:
    """The limits of both request types; a sampling field left out takes Limits' default
    (Magistral's recommendation)."""
    _check_max(max_tokens, cap, "max_tokens")
    sampling = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p}
    return {"max_tokens": max_tokens or cap, "seed": req.seed, "stop": req.stops(),
            **{k: v for k, v in sampling.items() if v is not None}}


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
    conv = conversation(req, info)
    limits = _common_limits(req, req.max_completion_tokens or req.max_tokens, cap)
    _check_max(req.max_answer_tokens, cap, "max_answer_tokens")
    schema, tool_use = req.response_format.schema_dict() if req.response_format else None, conv.tool_use()
    if schema is not None and tool_use is not None:
        raise ApiError(400, "response_format constrains a text answer and cannot be combined with tools the "
                       "model may call; drop response_format or set tool_choice to none", param="response_format")
    limits.update(
        think_budget=think_budget(req, info["think_budget"], info["n_ctx"]),
        answer_budget=req.max_answer_tokens,
        json_schema=schema,
        system_mode=conv.system_mode,
        force_thinking=bool(req.force_thinking),
        tools=tool_use,
    )
    return JobSpec("chat", Limits(**limits), conversation=conv)


CONVERSATION_FIELDS = {"messages", "tools", "tool_choice", "parallel_tool_calls", "system_mode"}


def conversation(req: ChatCompletionRequest, info: dict[str, Any]) -> Conversation:
    """The request's conversation, by the one conversion the ``prompt`` command uses too; what it
    refuses is a 400 with its message. Tools and tool turns need a Magistral model."""
    body = req.model_dump(by_alias=True, exclude_none=True, include=CONVERSATION_FIELDS)
    try:
        conv = conversation_from_request(body)
    except BadInputError as e:
        raise ApiError(400, str(e), param=_param_of(str(e)), code="invalid_value") from None
    if not info.get("is_magistral", True) and uses_tools(conv.messages, conv.tools):
        raise ApiError(400, "tools, tool calls and tool messages need a Magistral model; this model's own chat "
                       "template gets plain chats only", param="tools", code="invalid_value")
    return conv


def _param_of(message: str) -> str | None:
    """The request field a conversion error is about (OpenAI's ``param``), when it is plain."""
    for needle, param in (("tool_choice", "tool_choice"), ("parallel_tool_calls", "parallel_tool_calls"),
                          ("message", "messages"), ("tool", "tools"), ("system_mode", "system_mode")):
        if needle in message:
            return param
    return None


def raw_job(req: CompletionRequest, cap: int) -> JobSpec:
    return JobSpec("raw", Limits(**_common_limits(req, req.max_tokens, cap), raw=True), prompt=req.prompt)


# ------------------------------------------------------------------------------ running

@dataclass
class Outcome:
    """What a finished job produced."""

    thinking: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    done: Done | None = None
    first_text_at: float | None = None


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

    async def next(self) -> Event | ApiError:
        """The next event, recorded in the outcome."""
        ev = await self.job.events.get()
        o = self.outcome
        if isinstance(ev, OUTPUT) and o.first_text_at is None:
            o.first_text_at = time.monotonic()
        match ev:
            case ThinkingText(text=text) | AnswerText(text=text):
                (o.thinking if isinstance(ev, ThinkingText) else o.answer).append(text)
            case Done():
                o.done = ev
        return ev

    async def finish(self) -> Outcome:
        """Run to the end (non-streaming)."""
        while not isinstance(ev := await self.next(), Done):
            if isinstance(ev, ApiError):
                raise ev
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


def _after(request: Request, run: RequestRun, kind: str, payload: Any) -> None:
    """Metrics and the audit record of a finished generation."""
    o, state = run.outcome, request.app.state
    if o.done is None:
        return
    state.metrics.finished(o.done, run.ttft_s, time.monotonic() - run.t0)
    if state.audit is not None:
        state.audit.record(run.job.id, kind, payload, o)


# ------------------------------------------------------------------------- formatting

def usage(done: Done) -> dict[str, Any]:
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.timings.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def watchdog_ext(done: Done) -> dict[str, Any]:
    """The extension object: why the turn ended, every intervention of the watchdog, and
    ``tool_error`` when the model's output left the call grammar (no call is reported then)."""
    return {"stop_reason": done.stop_reason, "reasoning_truncated": done.reasoning_truncated,
            "reasoning_tokens": done.usage.reasoning_tokens, "think_budget": done.sampling.get("think_budget"),
            "events": done.watchdog_events, "tool_error": done.tool_error}


def finish_reason(done: Done) -> str:
    """OpenAI's values only: "tool_calls" when the answer is calls, "stop"; a cancelled turn
    (deadline, shutdown) was cut, so "length" (a call cut short is no call, and "length" too)."""
    if done.finish_reason == "tool_calls" and done.tool_calls:
        return "tool_calls"
    return "stop" if done.finish_reason == "stop" else "length"


def tool_calls(done: Done) -> list[dict[str, Any]]:
    """OpenAI's ``message.tool_calls``, the arguments as canonical JSON text; none unless the
    answer ended as calls (a turn cut by max_tokens after a complete call reports no call)."""
    if finish_reason(done) != "tool_calls":
        return []
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in done.tool_calls]


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class ChatFormat:
    """chat.completion: the thought in ``reasoning_content``, the answer in ``content``."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    extra: dict[str, Any] = {"system_fingerprint": None}

    def opening(self) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}}

    def piece(self, ev: Piece) -> dict[str, Any]:
        """A text delta, or OpenAI's ``delta.tool_calls``: a call's id and name once, then pieces
        of its argument text as the model writes them."""
        match ev:
            case CallStart(index=i, id=call_id, name=name):
                return {"delta": {"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]}}
            case CallArguments(index=i, text=text):
                return {"delta": {"tool_calls": [{"index": i, "function": {"arguments": text}}]}}
        return {"delta": {"reasoning_content" if isinstance(ev, ThinkingText) else "content": ev.text}}

    def closing(self) -> dict[str, Any]:
        return {"delta": {}}

    def whole(self, o: Outcome) -> dict[str, Any]:
        answer, calls = "".join(o.answer), tool_calls(o.done)
        message = {"role": "assistant", "content": None if calls and not answer else answer,
                   "reasoning_content": "".join(o.thinking) or None}
        return {"message": {**message, "tool_calls": calls} if calls else message}


class TextFormat:
    """text_completion: plain text (a raw prompt has no thinking split)."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"
    extra: dict[str, Any] = {}

    def opening(self) -> dict[str, Any] | None:
        return None

    def piece(self, ev: Piece) -> dict[str, Any]:
        return {"text": ev.text}  # a raw completion has no tools: only text comes

    def closing(self) -> dict[str, Any]:
        return {"text": ""}

    def whole(self, o: Outcome) -> dict[str, Any]:
        return {"text": "".join(o.thinking + o.answer)}


Format = ChatFormat | TextFormat


@dataclass
class Reply:
    """One response's identity and its bodies, in the format of its type."""

    fmt: Format
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.fmt.prefix}-{uuid.uuid4().hex}"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, o: Outcome) -> dict[str, Any]:
        choice = {"index": 0, **self.fmt.whole(o), "finish_reason": finish_reason(o.done), "logprobs": None}
        return {**self._head(self.fmt.object), "choices": [choice], "usage": usage(o.done),
                "watchdog": watchdog_ext(o.done), **self.fmt.extra}

    def chunk(self, body: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, **body, "finish_reason": finish, "logprobs": None}
        return sse({**self._head(self.fmt.chunk_object), "choices": [choice], **extra})

    def usage_chunk(self, done: Done) -> bytes:
        return sse({**self._head(self.fmt.chunk_object), "choices": [], "usage": usage(done)})


CHAT, TEXT = ChatFormat(), TextFormat()


# ----------------------------------------------------------------------------- routes

@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    info = _ready_info(request)
    spec = chat_job(req, info, _cap(request, info))
    payload = chat_prompt(spec.conversation)
    return await _respond(request, req, spec, Reply(CHAT, info["model"]), "chat", payload)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    info = _ready_info(request)
    spec = raw_job(req, _cap(request, info))
    return await _respond(request, req, spec, Reply(TEXT, info["model"]), "raw", req.prompt)


async def _respond(request: Request, req: Any, spec: JobSpec, reply: Reply, kind: str, payload: Any) -> Response:
    """Run the job; answer with one JSON body, or with server-sent events when asked to stream."""
    run = _start(request, spec, req.deadline_s)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _streaming(run, _chunks(run, reply, include_usage, lambda: _after(request, run, kind, payload)))
    try:
        o = await run.finish()
    finally:
        run.close()
    _after(request, run, kind, payload)
    return JSONResponse(reply.whole(o))


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


async def _events_until_text(run: RequestRun) -> list[Event]:
    """Events up to and including the first that produces output; an error before it raises."""
    seen = []
    while True:
        ev = await run.next()
        if isinstance(ev, ApiError):
            raise ev
        seen.append(ev)
        if isinstance(ev, (*OUTPUT, Done)):
            return seen


async def _event_stream(run: RequestRun) -> AsyncIterator[Event | ApiError]:
    for ev in await _events_until_text(run):
        yield ev
        if isinstance(ev, Done):
            return
    while True:
        ev = await run.next()
        yield ev
        if isinstance(ev, (Done, ApiError)):
            return


async def _chunks(run: RequestRun, reply: Reply, include_usage: bool, after: Any) -> AsyncIterator[bytes]:
    """The server-sent events of one response: text pieces, then the closing chunk (the finish
    reason and the watchdog's report), the usage if asked, ``[DONE]``; or an error event."""
    events = _event_stream(run)
    first = await events.__anext__()  # errors before any output propagate as a status code
    if (opening := reply.fmt.opening()) is not None:
        yield reply.chunk(opening)
    async for ev in _chain(first, events):
        match ev:
            case ThinkingText() | AnswerText() | CallStart() | CallArguments():
                yield reply.chunk(reply.fmt.piece(ev))
            case ApiError():
                yield sse(ev.body())
                return
            case Done():
                after()
                yield reply.chunk(reply.fmt.closing(), finish_reason(ev), watchdog=watchdog_ext(ev))
                if include_usage:
                    yield reply.usage_chunk(ev)
                yield b"data: [DONE]\n\n"
                return


async def _chain(first: Event | ApiError, rest: AsyncIterator[Event | ApiError]) -> AsyncIterator[Event | ApiError]:
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
                "n_slots", "speculate")
        body = {"status": "ok", "model": sup.info.get("model"), "plan": {k: plan.get(k) for k in keys},
                "queue": len(sup.queue), "generating": bool(sup.running),
                "slots": {"busy": len(sup.running), "total": sup.n_slots}}
        if workers := sup.info.get("workers"):
            body["workers"] = workers  # each RPC worker: its devices and the buffers llama.cpp put there
        return JSONResponse(body)
    body = {"status": sup.state.value}
    if sup.waiting is not None:
        body["waiting_for_worker"] = sup.waiting  # which RPC worker loading waits for, and why
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    m = request.app.state.metrics
    m.observe_supervisor(request.app.state.supervisor)  # now, not as of the last tick: /health agrees
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())
