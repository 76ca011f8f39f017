"""The data of a generation: how a model is loaded, what a turn may do, and what it reports.

Plain dataclasses with no llama.cpp import, so they pickle across the worker pipe and the HTTP
front (which never loads llama.cpp) can build and read them. The defaults here are the only
place request defaults live: Magistral's recommended sampling (temperature 0.7, top-p 0.95),
the 40960-token cap on a turn, and the size and depth caps on a JSON schema (a malformed or
deeply nested grammar can crash llama.cpp, so nothing larger reaches it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edge_magistral.errors import BadInputError

SPECULATE_MODES = ("ngram", "draft", "off")
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
# Tools (function calling): each tool's parameters schema has the caps above; these bound the set.
MAX_TOOLS = 128  # OpenAI's own limit
MAX_TOOLS_BYTES = 256 * 1024  # the [AVAILABLE_TOOLS] JSON, UTF-8
MAX_TOOL_CALLS = 128  # calls in one assistant message


# ------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class LoadSettings:
    """How to load the model: what a Plan decides (``from_plan``) or what a caller overrides."""

    model_path: str
    n_ctx: int = 4096  # the context of one slot
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    tensor_split: tuple[float, ...] = ()
    think_budget: int = 8192  # the default per-turn think budget (from the profile)
    # top-k on the device that computes the logits (None: when the output layer is on a GPU)
    backend_sampling: bool | None = None
    n_slots: int = 1  # requests decoded together (1: one KV stream; N > 1: N + 1, see batch.py)
    # Speculative decoding (speculate.py): "ngram" verifies prompt-lookup guesses when they pay,
    # "draft" a small draft model's (``draft_model``, same Tekken vocabulary), "off" decodes plainly.
    speculate: str = "ngram"
    draft_model: str | None = None
    draft_gpu_layers: int = 0
    # Verify the same number of guesses every step (speculate.py): None = where every layer is on
    # a GPU, whose CUDA graphs make a step of an unchanged shape cheaper than one of a new shape.
    speculate_hold: bool | None = None
    # llama.cpp RPC workers ("host:port", probed first: see rpc/), whose devices come first in
    # llama.cpp's device order, so ``tensor_split`` lists theirs before the local GPUs.
    workers: tuple[str, ...] = ()
    # Keep the output layer's weights (and the logits) on this box's CPU although llama.cpp puts
    # the output layer on the last device: a head without a GPU whose layers are on RPC workers
    # (otherwise a logits row of n_vocab floats crosses the link every token).
    output_on_host: bool = False

    @classmethod
    def from_plan(cls, plan: Any) -> LoadSettings:
        """A plan across boxes also gives the workers (in its device order) and, when it keeps the
        output layer on a GPU-less head while layers are offloaded, ``output_on_host``."""
        cluster = getattr(plan, "cluster", None)
        return cls(model_path=plan.model_path, n_ctx=plan.n_ctx, n_gpu_layers=plan.n_gpu_layers,
                   n_threads=plan.n_threads, n_threads_batch=plan.n_threads_batch, n_batch=plan.n_batch,
                   n_ubatch=plan.n_ubatch, flash_attn=plan.flash_attn, type_k=plan.type_k, type_v=plan.type_v,
                   tensor_split=tuple(plan.tensor_split or ()), think_budget=plan.think_budget,
                   n_slots=getattr(plan, "n_slots", 1),
                   workers=tuple(w.endpoint for w in cluster.workers) if cluster else (),
                   output_on_host=bool(cluster) and cluster.output_device == "CPU" and plan.n_gpu_layers > 0)

    def check(self) -> None:
        """Refuse settings llama.cpp would misread (before anything is loaded)."""
        for name, t in (("type_k", self.type_k), ("type_v", self.type_v)):
            if t not in KV_TYPES:
                raise BadInputError(f"{name} {t!r} is not one of {', '.join(KV_TYPES)}")
        if self.n_slots < 1:
            raise BadInputError(f"n_slots must be at least 1, not {self.n_slots}")
        if self.speculate not in SPECULATE_MODES:
            raise BadInputError(f"speculate must be one of {', '.join(SPECULATE_MODES)}, not {self.speculate!r}")
        if (self.speculate == "draft") != (self.draft_model is not None):
            raise BadInputError("a draft model goes with speculate=draft (give --draft-model, or another mode)")


@dataclass(frozen=True)
class Limits:
    """Per-request limits and sampling. ``think_budget=None`` takes the engine's default."""

    think_budget: int | None = None
    max_tokens: int = 40960
    answer_budget: int | None = None
    deadline_s: float | None = None
    ttft_deadline_s: float | None = None
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    stop: tuple[str, ...] = ()
    system_mode: str = "replace"
    force_thinking: bool = False  # open [THINK] in the prompt instead of letting the model choose
    raw: bool = False  # a raw completion: no thinking handling, every token is answer text
    ignore_eos: bool = False  # never sample end-of-sequence (benchmarks: a fixed number of tokens)
    speculate: bool = True  # False: this turn decodes plainly even where the engine speculates
    tools: ToolUse | None = None  # the tools this turn may call (None: calls are banned)


@dataclass(frozen=True)
class ToolUse:
    """What a turn may call and how decoding is constrained (see :mod:`edge_magistral.tool_decoding`).

    ``choice``: ``auto`` (the model decides; once it opens a call, the name is one of ``tools``
    and the arguments follow that tool's schema), ``required`` (after the thought, the answer is
    one or more calls) or ``function`` (calls of ``name`` only). ``tool_choice: "none"`` is no
    ToolUse at all: the tools stay in the prompt and ``[TOOL_CALLS]`` is banned."""

    tools: tuple[tuple[str, dict[str, Any]], ...]  # (name, parameters JSON schema)
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True  # False: at most one call per turn

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.tools)


DEFAULT_LIMITS = Limits()


def json_depth(x: Any, limit: int | None = None) -> int:
    """How deeply a JSON value nests (a scalar is depth 0). Iterative, and it stops once past
    ``limit``: a hostile value cannot exhaust the stack before the cap is checked."""
    deepest, stack = 0, [(x, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if limit is not None and deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((c, d + 1) for c in v.values())
        elif isinstance(v, list):
            stack.extend((c, d + 1) for c in v)
    return deepest


def check_schema(schema: Any) -> str:
    """The schema as JSON text, once it is known to be an object within the size and depth caps."""
    if not isinstance(schema, dict):
        raise BadInputError("json schema must be a JSON object")
    if json_depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise BadInputError(f"json schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    raw = json.dumps(schema)
    if len(raw) > MAX_SCHEMA_BYTES:
        raise BadInputError(f"json schema is {len(raw)} bytes; the limit is {MAX_SCHEMA_BYTES}")
    return raw


# --------------------------------------------------------------------------------- events

@dataclass(frozen=True)
class ThinkingText:
    text: str


@dataclass(frozen=True)
class AnswerText:
    text: str


@dataclass(frozen=True)
class WatchdogAction:
    """What the [THINK] watchdog (or the sampling check) did to the turn."""

    action: str  # force_close | stop | drop | clip | sampling
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class CallStart:
    """A tool call's name is complete and known: stream ``{index, id, type, function: {name}}`` once."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """A piece of a call's argument text, as generated: stream ``{index, function: {arguments}}``."""

    index: int
    text: str


@dataclass(frozen=True)
class ParsedCall:
    """A complete call: its place in the turn, the id we gave it, a known name, a JSON object."""

    index: int
    id: str
    name: str
    arguments: str  # json.dumps(value, ensure_ascii=False): the form the prompt carries
    raw_arguments: str  # the text the model wrote (the streamed pieces, concatenated)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    reasoning_tokens: int
    answer_tokens: int

    @property
    def completion_tokens(self) -> int:
        return self.reasoning_tokens + self.answer_tokens


@dataclass(frozen=True)
class Timings:
    load_s: float
    prompt_s: float  # prompt evaluation (prefill)
    ttft_s: float | None  # request start to first generated token
    generation_s: float
    tokens_per_s: float  # generation speed, first token excluded
    prompt_tokens_per_s: float
    cached_prompt_tokens: int  # prompt tokens reused from the KV cache instead of evaluated
    drafted_tokens: int = 0  # speculative guesses verified
    accepted_tokens: int = 0  # guesses the model agreed with (each one a token for a shared step)


@dataclass(frozen=True)
class Done:
    """The last event: why the turn ended, what it cost, what the watchdog did."""

    finish_reason: str  # OpenAI's: "stop" | "length" | "tool_calls" (+ "cancelled" when the caller cancelled)
    stop_reason: str  # ours, more precise: eos, stop_string, max_tokens, loop, deadline, context_full, ...
    usage: Usage
    timings: Timings
    reasoning_truncated: bool
    watchdog_events: list[dict[str, Any]] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    tool_calls: tuple[ParsedCall, ...] = ()  # complete calls (finish_reason "tool_calls")
    tool_error: str | None = None  # the output left the call grammar: no call is reported


Event = ThinkingText | AnswerText | WatchdogAction | CallStart | CallArguments | Done
