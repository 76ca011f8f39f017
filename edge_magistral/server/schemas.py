"""Request bodies as pydantic models: the OpenAI fields this server honours, its extensions, and
the OpenAI fields it refuses because silently ignoring them would change the answer.

Strict: wrong types are refused (no "5" for 5), unknown fields are refused as OpenAI refuses
them, every number has a range, NaN/Infinity are refused, text with lone surrogates is refused,
and JSON schemas are size- and depth-checked here, before anything reaches the worker. Limits
that depend on the loaded model (context size) are checked in :mod:`edge_magistral.server.api`.

Function calling: the shapes are checked here (tool calls, tool messages, sizes, surrogates, the
tools' nesting); what they mean (tool names, parameters schemas, calls answered by tool messages,
tool_choice naming a tool) is checked by :func:`edge_magistral.tools.conversation_from_request`,
the one conversion the ``prompt`` command shares, and refused as a 400 with its message.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from edge_magistral.generation import DEFAULT_LIMITS, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_TOOL_CALLS, MAX_TOOLS
from edge_magistral.tools import MAX_ID_CHARS

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


def _check_schema_shape(value: Any, depth: int = MAX_SCHEMA_DEPTH, what: str = "the JSON schema") -> None:
    """Refuse a JSON value nested deeper than ``depth`` (as ``generation.json_depth`` counts) or
    with a lone surrogate anywhere (keys included), in one iterative walk that stops at the first
    level too deep."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > depth:
            raise ValueError(f"{what} nests deeper than {depth} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                check_text(k, what)
                stack.append((x, d + 1))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, str):
            check_text(v, what)


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


NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's (and mistral-common's) function names


class FunctionCall(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="The function called (one of the tools offered then)")
    arguments: str = Field(description="Its arguments: a JSON object, as text")

    @field_validator("name", "arguments")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_text(v, "a tool call")


class ToolCall(_Strict):
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="Pairs the call with its tool message")
    type: Literal["function"] = "function"
    function: FunctionCall

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_text(v, "a tool call id")


def _message_text(v: str) -> str:
    return check_text(v, "message content")


Text = Annotated[str, AfterValidator(_message_text)]
Content = Text | list[TextPart]
_CONTENT = "Text, or text parts (no images or audio)"


class _Message(_Strict):
    name: str | None = Field(None, max_length=256, description="Accepted and ignored")

    @field_validator("name", "tool_call_id", "reasoning_content", "reasoning", check_fields=False)
    @classmethod
    def _texts(cls, v: str | None) -> str | None:
        return v if v is None else check_text(v, "a message field")


class SystemMessage(_Message):
    role: Literal["system", "developer"] = Field(description="'developer' is taken as 'system'; first only")
    content: Content = Field(description=_CONTENT)


class UserMessage(_Message):
    role: Literal["user"]
    content: Content = Field(description=_CONTENT)


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = Field(None, description=f"{_CONTENT}; null with tool_calls")
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOL_CALLS,
                                              description="Its calls (answer each with a tool message right after it)")
    reasoning_content: str | None = Field(
        None, description="Its thought: kept in a tool conversation (the thought that led to a call), dropped in a "
                          "plain chat (earlier thinking is not replayed)")
    reasoning: str | None = Field(None, description="Same as reasoning_content")


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content = Field(description="The call's result, fed to the model as it is")
    tool_call_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="The id of the call it answers")


_ROLE_TAGS = {"system": "system-message", "developer": "system-message", "user": "user-message",
              "assistant": "assistant-message", "tool": "tool-message"}  # a dash: not a field in error paths


def _role_tag(v: Any) -> str | None:
    role = v.get("role") if isinstance(v, dict) else getattr(v, "role", None)
    return _ROLE_TAGS.get(role) if isinstance(role, str) else None


ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("system-message")] | Annotated[UserMessage, Tag("user-message")]
    | Annotated[AssistantMessage, Tag("assistant-message")] | Annotated[ToolMessage, Tag("tool-message")],
    Discriminator(_role_tag, custom_error_type="invalid_role",
                  custom_error_message="role must be system, developer, user, assistant or tool")]


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


def _closed(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


# What the OpenAPI document says of a tool and a named tool_choice; they are validated as plain
# objects here and by edge_magistral.tools (whose messages say what is wrong in words).
_NAME = {"type": "string", "pattern": NAME_PATTERN}
TOOL_SCHEMA = _closed({"type": {"const": "function"}, "function": _closed(
    {"name": _NAME, "description": {"type": "string"}, "strict": {"type": "boolean"},
     "parameters": {"type": "object", "description": "A JSON schema of the arguments (an object)"}}, ["name"])},
    ["type", "function"])
NAMED_SCHEMA = _closed({"type": {"const": "function"}, "function": _closed({"name": _NAME}, ["name"])},
                       ["type", "function"])
NamedToolChoice = Annotated[dict[str, Any], WithJsonSchema(NAMED_SCHEMA)]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096, description="The last one from the user")
    max_tokens: Int | None = Field(None, ge=1, le=MAX_INT, description="All generated tokens, thinking included")
    max_completion_tokens: Int | None = Field(None, ge=1, le=MAX_INT, description="Same as max_tokens")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema constrain the answer; the thinking stays free (not with "
                          "tools unless tool_choice is none)")
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
    tools: list[Annotated[dict[str, Any], WithJsonSchema(TOOL_SCHEMA)]] | None = Field(
        None, max_length=MAX_TOOLS, description="Function tools ({type: function, function: {name, description, "
        "parameters}}): the model may call them (Magistral models only); a grammar built from a tool's "
        "parameters schema constrains its arguments")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" (the default with tools), "none" (no call), "required" (the answer is calls) or '
                          '{"type": "function", "function": {"name": ...}} (calls of that tool)')
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer")
    functions: list[dict[str, Any]] | None = _unsupported({"maxItems": 0}, "Only empty: use tools")
    function_call: str | dict[str, Any] | None = _unsupported({"enum": [None]}, "Only null: use tool_choice")
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(None, max_length=64)

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for tool in v or []:  # the rest (names, schemas, sizes) is checked in edge_magistral.tools
            _check_schema_shape(tool, MAX_SCHEMA_DEPTH + 3, "a tool")  # tool → function → parameters → …
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, dict):
            fn = v.get("function")
            if set(v) - {"type", "function"} or not isinstance(fn, dict) or set(fn) != {"name"}:
                raise ValueError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
            _check_schema_shape(v, 2, "tool_choice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs are not supported")
        if self.functions or self.function_call is not None:
            raise ValueError("functions and function_call are OpenAI's deprecated form: use tools and tool_choice")
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
