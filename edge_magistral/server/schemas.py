"""Request bodies as pydantic models: the OpenAI fields this server honours, its extensions, and
the OpenAI fields it refuses because silently ignoring them would change the answer.

Strict: wrong types are refused (no "5" for 5), unknown fields are refused as OpenAI refuses
them, every number has a range, NaN/Infinity are refused, text with lone surrogates is refused,
and JSON schemas are size- and depth-checked here, before anything reaches the worker. Limits
that depend on the loaded model (context size) are checked in :mod:`edge_magistral.server.api`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from edge_magistral.generation import DEFAULT_LIMITS, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH

INT64 = 2**63
MAX_STOP = 4
MAX_STOP_CHARS = 256
_SURROGATE = re.compile("[\ud800-\udfff]")

Float = Annotated[float, Field(allow_inf_nan=False)]


def _whole(v: Any) -> Any:
    """JSON Schema counts 2.0 as an integer; so do we (but not true, "2" or 2.5)."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v


Int = Annotated[int, BeforeValidator(_whole)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]


def check_text(s: str, what: str) -> str:
    if _SURROGATE.search(s):
        raise ValueError(f"{what} contains a lone surrogate (invalid Unicode): send valid UTF-8")
    return s


def _check_schema_shape(value: Any) -> None:
    """Refuse a JSON value nested deeper than MAX_SCHEMA_DEPTH (as ``generation.json_depth``
    counts) or with a lone surrogate anywhere (keys included), in one iterative walk that stops
    at the first level too deep."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                check_text(k, "the JSON schema")
                stack.append((x, d + 1))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, str):
            check_text(v, "the JSON schema")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


# ------------------------------------------------------------------------------ pieces

class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_text(v, "text")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is taken as 'system'; tool messages are not supported")
    content: str | list[TextPart] = Field(description="Text, or text parts (no images or audio)")
    name: str | None = Field(None, max_length=256, description="Accepted and ignored")
    reasoning_content: str | None = Field(None, description="Accepted and ignored: earlier thinking is never replayed")

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        if isinstance(v, str):
            check_text(v, "message content")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        _check_schema_shape(v)
        size = len(json.dumps(v))
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"the JSON schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
        return v


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self

    def schema_dict(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_ or {}
        return None


# ------------------------------------------------------------------------- shared fields

def _unsupported(neutral: dict[str, Any], description: str) -> Any:
    """An OpenAI field accepted only at its neutral value: the validators say why in words, and
    the OpenAPI document says exactly what is accepted."""
    return Field(None, description=description, json_schema_extra=neutral)


class _Sampling(_Strict):
    """Fields common to chat and raw completions."""

    model: str | None = Field(None, max_length=256, description="Any name: this server serves one model")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(None, ge=0, le=2,
                                      description=f"Default {DEFAULT_LIMITS.temperature}, Magistral's recommendation")
    top_p: Float | None = Field(None, ge=0, le=1, description=f"Default {DEFAULT_LIMITS.top_p}")
    top_k: Int | None = Field(None, ge=0, le=100_000, description=f"Extension; default "
                                                                       f"{DEFAULT_LIMITS.top_k}, 0 disables")
    min_p: Float | None = Field(None, ge=0, le=1, description=f"Extension; default {DEFAULT_LIMITS.min_p:g}")
    seed: Int | None = Field(None, ge=-INT64, le=2**64 - 1)
    stop: StopString | StopList | None = Field(None, description=f"Up to {MAX_STOP} strings; matched in the "
                                                                  "answer only")
    deadline_s: Float | None = Field(None, ge=1, le=86_400, description="Extension: seconds this request may "
                                     "take, queue wait included (capped by the server's --request-timeout)")
    n: Int | None = Field(None, ge=1, le=1, description="Only 1: one generation at a time")
    frequency_penalty: Float | None = _unsupported({"maximum": 0, "minimum": 0}, "Only 0 (not supported)")
    presence_penalty: Float | None = _unsupported({"maximum": 0, "minimum": 0}, "Only 0 (not supported)")
    logit_bias: dict[str, Float] | None = _unsupported({"maxProperties": 0}, "Only empty (not supported)")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        for s in [v] if isinstance(v, str) else (v or []):
            check_text(s, "a stop string")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (only 0): the watchdog handles repetition")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# ------------------------------------------------------------------------------ requests

MAX_INT = 2**31 - 1


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096, description="The last one from the user")
    max_tokens: Int | None = Field(None, ge=1, le=MAX_INT, description="All generated tokens, thinking included")
    max_completion_tokens: Int | None = Field(None, ge=1, le=MAX_INT, description="Same as max_tokens")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema constrain the answer; the thinking stays free")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="Think budget: none 0, minimal 256, low 1024, medium 4096, high the server's default "
                          "(each at most the server's default)")
    max_thinking_tokens: Int | None = Field(None, ge=0, le=MAX_INT,
                                            description="Extension: think budget (0: answer without thinking)")
    max_answer_tokens: Int | None = Field(None, ge=1, le=MAX_INT, description="Extension: answer budget")
    force_thinking: bool | None = Field(None, description="Extension: open [THINK] in the prompt")
    system_mode: Literal["replace", "extend"] | None = Field(
        None, description="Extension: a system message replaces (default) or extends Magistral's system prompt")
    logprobs: bool | None = _unsupported({"enum": [False, None]}, "Only false (not supported)")
    top_logprobs: Int | None = _unsupported({"enum": [None]}, "Only null (not supported)")
    tools: list[dict[str, Any]] | None = _unsupported({"maxItems": 0}, "Only empty (not supported)")
    functions: list[dict[str, Any]] | None = _unsupported({"maxItems": 0}, "Only empty (not supported)")
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs are not supported")
        if self.tools or self.functions:
            raise ValueError("tools and functions are not supported")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: give one")
        if self.reasoning_effort is not None and self.max_thinking_tokens is not None:
            raise ValueError("give reasoning_effort or max_thinking_tokens, not both")
        return self


class CompletionRequest(_Sampling):
    prompt: str = Field(description="Plain text, tokenized without special tokens; the continuation is plain "
                                    "text too (no reasoning split)")
    max_tokens: Int | None = Field(16, ge=1, le=MAX_INT)
    logprobs: Int | None = _unsupported({"enum": [None]}, "Only null (not supported)")
    echo: bool | None = _unsupported({"enum": [False, None]}, "Only false (not supported)")
    suffix: str | None = _unsupported({"enum": [None]}, "Only null (not supported)")
    best_of: Int | None = Field(None, ge=1, le=1, description="Only 1")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return check_text(v, "the prompt")

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        return self
