"""Function calling: an OpenAI-style chat request body becomes the typed conversation that
:func:`edge_magistral.chat.magistral_prompt` encodes.

This is the one conversion the service and ``edge-magistral prompt`` share, so a prompt printed
by the command is the prompt the engine is fed. It reads ``messages``, ``tools``, ``tool_choice``,
``parallel_tool_calls`` and ``system_mode``; other fields of the body are the caller's.

The encoding is mistral-common's v13 (``ChatCompletionRequest.from_openai`` then
``encode_chat_completion``), checked token for token in ``tests/test_tools.py``:

- ``developer`` is ``system``; a message's text parts are joined with a blank line (empty parts
  skipped), as mistral-common joins the chunks of one message; only text parts are accepted.
- Tools are dumped as ``{type, function: {name, description, parameters}}`` (description ``""``
  when missing, parameters ``{}`` when missing, ``strict`` dropped) with ``json.dumps(...,
  ensure_ascii=False)`` and default separators.
- A call's arguments are re-dumped: ``json.dumps(json.loads(arguments), ensure_ascii=False)``;
  ``""`` or null is ``{}``. Arguments must be a JSON object (mistral-common would quote anything
  else as a JSON string; we refuse it).
- A tool result's content is fed byte for byte, JSON or not. That is mistral-common since 1.11.4
  (v7+ tokenizers); up to 1.11.3 JSON content was re-dumped (``{"a":1}`` became ``{"a": 1}``). We
  match the newer behaviour, Mistral's fix, whatever mistral-common is installed.
- ``reasoning_content`` (or ``reasoning``) sent back with an assistant message is kept as
  ``[THINK]…[/THINK]`` in a tool conversation (an agent loop needs the thought that led to a call).
  In a plain chat (no tools, no calls, no tool messages) it is dropped, as it always was: Mistral
  advises not to replay earlier thinking, and plain chats keep today's prompt exactly.
- ``tool_choice`` and ``parallel_tool_calls`` never change the prompt; they are for decoding.

Known differences from mistral-common, none of which an OpenAI client produces in a normal loop:
consecutive messages of the same role are encoded one by one (mistral-common merges them with a
blank line); literal ``[THINK]`` text in a plain chat's assistant text is stripped (see
:func:`edge_magistral.chat.strip_thinking`); and a plain chat's assistant text keeps trailing spaces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_magistral.chat import (
    SYSTEM_MODES,
    Message,
    ToolCall,
    ToolSpec,
    check_conversation,
    magistral_prompt,
    tools_json,
)
from edge_magistral.errors import BadInputError
from edge_magistral.generation import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    MAX_TOOLS_BYTES,
    ToolUse,
    json_depth,
)

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # mistral-common's (and OpenAI's) function names
MAX_ID_CHARS = 256
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Conversation:
    """A validated chat request, ready to encode: the turns, the tools, and how decoding may call them."""

    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"  # "none" | "auto" | "required" | "function" (call `tool_name`)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    system_mode: str = "replace"

    def prompt_ids(self, encode: Callable[[str], list[int]]) -> list[int]:
        """The prompt's token ids (``encode``: plain text → ids, never a control token)."""
        return magistral_prompt(self.messages, encode, self.system_mode, self.tools)

    def tool_use(self) -> ToolUse | None:
        """What decoding may call: None (``[TOOL_CALLS]`` banned) for tool_choice "none" or no tools;
        the tools then stay in the prompt, the turn just cannot call them."""
        if self.tool_choice == "none" or not self.tools:
            return None
        return ToolUse(tuple((t.name, t.parameters) for t in self.tools), self.tool_choice, self.tool_name,
                       self.parallel_tool_calls)


def conversation_from_request(body: Mapping[str, Any]) -> Conversation:
    """The conversation of an OpenAI-style chat request body, or a BadInputError saying what is wrong."""
    if not isinstance(body, Mapping):
        raise BadInputError("the request must be a JSON object")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise BadInputError(f"{legacy} is OpenAI's deprecated form: use tools and tool_choice")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadInputError("messages must be a non-empty list")
    tools = parse_tools(body.get("tools"))
    choice, name = parse_tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadInputError("parallel_tool_calls must be true or false")
    mode = body.get("system_mode") or "replace"
    if mode not in SYSTEM_MODES:
        raise BadInputError(f"system_mode must be one of {', '.join(SYSTEM_MODES)}")
    messages = tuple(parse_message(i, m) for i, m in enumerate(raw))
    if not tools and not any(m.tool_calls or m.role == "tool" for m in messages):  # a plain chat
        messages = tuple(Message(m.role, m.content) for m in messages)
    check_conversation(messages, tools)
    return Conversation(messages, tools, choice, name, parallel is not False, mode)


# ------------------------------------------------------------------------------------ tools

def parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    """OpenAI's ``tools``: at most MAX_TOOLS function tools, distinct names, MAX_TOOLS_BYTES of JSON."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadInputError("tools must be a list")
    if len(raw) > MAX_TOOLS:
        raise BadInputError(f"{len(raw)} tools; the limit is {MAX_TOOLS}")
    tools = tuple(parse_tool(i, t) for i, t in enumerate(raw))
    seen: set[str] = set()
    for t in tools:
        if t.name in seen:
            raise BadInputError(f"two tools are named {t.name!r}; tool names must be distinct")
        seen.add(t.name)
    size = len(tools_json(tools).encode("utf-8", "surrogatepass"))
    if size > MAX_TOOLS_BYTES:
        raise BadInputError(f"the tools are {size} bytes of JSON; the limit is {MAX_TOOLS_BYTES}")
    return tools


def function_of(where: str, raw: Any, fields: str) -> Mapping[str, Any]:
    """The ``function`` object of a tool or a tool call (``type`` "function", the default)."""
    if not isinstance(raw, Mapping):
        raise BadInputError(f"{where} must be an object")
    if raw.get("type", "function") != "function":
        raise BadInputError(f"{where}: type {raw.get('type')!r} is not supported (only function)")
    fn = raw.get("function")
    if not isinstance(fn, Mapping):
        raise BadInputError(f"{where}.function must be an object with {fields}")
    return fn


def parse_tool(i: int, raw: Any) -> ToolSpec:
    where = f"tools[{i}]"
    fn = function_of(where, raw, "a name")
    name = check_name(f"{where}.function.name", fn.get("name"))
    description = fn.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise BadInputError(f"{where}.function.description must be text")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise BadInputError(f"{where}.function.strict must be true or false")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {}
    check_parameters(f"{where}.function.parameters ({name})", parameters)
    return ToolSpec(name, description, dict(parameters))


def check_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadInputError(f"{where} must be 1 to 64 letters, digits, underscores or dashes; got {name!r}")
    return name


def check_parameters(where: str, schema: Any) -> None:
    """A tool's parameters: a valid Draft 7 JSON schema of an object, within the schema caps."""
    import jsonschema

    if not isinstance(schema, Mapping):
        raise BadInputError(f"{where} must be a JSON schema object")
    if json_depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise BadInputError(f"{where} nests deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError) as e:
        raise BadInputError(f"{where} is not JSON ({e})") from None
    if size > MAX_SCHEMA_BYTES:
        raise BadInputError(f"{where} is {size} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}")
    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        raise BadInputError(f"{where} is not a valid JSON schema: {e.message}") from None
    kind = schema.get("type", "object")
    if kind != "object":
        raise BadInputError(f"{where} must describe an object (the arguments), not type {kind!r}")


def parse_tool_choice(raw: Any, tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    """(``none`` | ``auto`` | ``required`` | ``function``, the named tool). Default: auto with tools."""
    if raw is None:
        return ("auto" if tools else "none"), None
    if isinstance(raw, str):
        if raw == "any":  # Mistral's older name
            raw = "required"
        if raw not in TOOL_CHOICES:
            raise BadInputError(f"tool_choice {raw!r} is not one of none, auto, required or a function")
        if raw == "required" and not tools:
            raise BadInputError("tool_choice 'required' needs tools")
        return raw, None
    fn = raw.get("function") if isinstance(raw, Mapping) and raw.get("type", "function") == "function" else None
    if not isinstance(fn, Mapping):
        raise BadInputError('tool_choice must be none, auto, required or {"type": "function", "function": '
                            '{"name": ...}}')
    name = check_name("tool_choice.function.name", fn.get("name"))
    if name not in {t.name for t in tools}:
        raise BadInputError(f"tool_choice names {name!r}, which is not one of the tools")
    return "function", name


# --------------------------------------------------------------------------------- messages

def parse_message(i: int, raw: Any) -> Message:
    where = f"messages[{i}]"
    if not isinstance(raw, Mapping):
        raise BadInputError(f"{where} must be an object")
    role = raw.get("role")
    if role not in ROLES:
        raise BadInputError(f"{where}: unknown role {role!r} (use system, developer, user, assistant or tool)")
    role = "system" if role == "developer" else role
    content = message_text(f"{where}.content", raw.get("content"), none_ok=role == "assistant")
    if role == "tool":
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise BadInputError(f"{where}: a tool message needs the tool_call_id of the call it answers")
        return Message("tool", content, tool_call_id=check_id(f"{where}.tool_call_id", call_id))
    if role != "assistant":
        for key in ("tool_calls", "tool_call_id", "reasoning_content", "reasoning"):
            if raw.get(key) is not None:
                raise BadInputError(f"{where}: a {role} message has no {key}")
        return Message(role, content)
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadInputError(f"{where}.tool_calls must be a list")
    if len(calls) > MAX_TOOL_CALLS:
        raise BadInputError(f"{where} has {len(calls)} tool calls; the limit is {MAX_TOOL_CALLS}")
    return Message("assistant", content, reasoning_of(where, raw),
                   tuple(parse_tool_call(f"{where}.tool_calls[{k}]", c) for k, c in enumerate(calls)))


def message_text(where: str, content: Any, none_ok: bool = False) -> str:
    """Text, or text parts joined with a blank line (empty parts skipped) as mistral-common does."""
    if content is None and none_ok:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadInputError(f"{where} must be text or a list of text parts")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadInputError(f'{where}[{k}]: only text parts ({{"type": "text", "text": ...}}) are supported')
        texts.append(part["text"])
    return "\n\n".join(t for t in texts if t)


def reasoning_of(where: str, raw: Mapping[str, Any]) -> str | None:
    """``reasoning_content`` or ``reasoning`` (equal when both are given), or None."""
    given = [raw.get(k) for k in ("reasoning_content", "reasoning") if raw.get(k) is not None]
    if any(not isinstance(r, str) for r in given):
        raise BadInputError(f"{where}: reasoning_content must be text")
    if len(given) == 2 and given[0] != given[1]:
        raise BadInputError(f"{where}: reasoning_content and reasoning differ; give one")
    return given[0] if given else None


def check_id(where: str, call_id: Any) -> str:
    if not isinstance(call_id, str) or not call_id or len(call_id) > MAX_ID_CHARS:
        raise BadInputError(f"{where} must be an id of 1 to {MAX_ID_CHARS} characters")
    return call_id


def parse_tool_call(where: str, raw: Any) -> ToolCall:
    fn = function_of(where, raw, "a name and arguments")
    return ToolCall(check_id(f"{where}.id", raw.get("id")), check_name(f"{where}.function.name", fn.get("name")),
                    canonical_arguments(f"{where}.function.arguments", fn.get("arguments")))


def canonical_arguments(where: str, raw: Any) -> str:
    """The arguments as the prompt carries them: ``json.dumps(json.loads(raw), ensure_ascii=False)``."""
    if raw is None or raw == "":
        return "{}"
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except RecursionError:
            raise BadInputError(f"{where} nests too deeply") from None
        except ValueError as e:
            raise BadInputError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{where} must be a JSON object (as a string), not {type(value).__name__}")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)  # 1e400 parses as inf: not JSON
    except RecursionError:
        raise BadInputError(f"{where} nests too deeply") from None
    except (TypeError, ValueError) as e:
        raise BadInputError(f"{where} is not JSON ({e})") from None
