"""Tool calling from the command line: the request ``run`` builds from ``--messages``, ``--tools``
and a prompt, the assistant message it prints when the model calls tools, and the conversation
file it saves.

Every request goes through :func:`edge_magistral.tools.conversation_from_request`, the path the
service and ``edge-magistral prompt`` take, so the CLI accepts and refuses what they do and feeds
the same prompt. Files are OpenAI's shapes: a ``tools`` list, a ``messages`` list or a request
body, and the assistant message with ``tool_calls`` that a script appends before the results.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_magistral.errors import BadInputError, StorageError
from edge_magistral.generation import Done, ParsedCall
from edge_magistral.tools import (
    TOOL_CHOICES,
    Conversation,
    conversation_from_request,
    parse_tool_choice,
    parse_tools,
)


@dataclass(frozen=True)
class RunRequest:
    """A validated request and the body it came from (the body's messages are saved back)."""

    body: dict[str, Any]  # the OpenAI request body: the file's fields, then the command line's
    conversation: Conversation
    from_body: bool  # --messages was a request body (saved back as one), not a bare list


@dataclass(frozen=True)
class RequestOptions:
    """What the command line adds to or overrides in the request file (None: not given)."""

    messages_path: str | None = None
    tools_path: str | None = None
    tool_choice: str | None = None  # none | auto | required | a function name
    parallel_tool_calls: bool | None = None
    system: str | None = None
    system_mode: str | None = None
    prompt: str = ""  # appended as a user message when not blank


@dataclass(frozen=True)
class ChatTools:
    """``chat``'s tools. The tool choice holds for the model's first turn after each user line;
    once it has results the model may answer (auto), or an exchange under ``required`` would
    never end. ``none`` holds throughout."""

    tools: list[Any] | None = None  # OpenAI's tools list, as read
    choice: str | dict[str, Any] | None = None  # a request's tool_choice (None: auto with tools)
    parallel: bool | None = None

    def body(self, messages: list[dict[str, Any]], system_mode: str, first: bool) -> dict[str, Any]:
        """The request body of one turn of an exchange."""
        choice = self.choice if first or self.choice == "none" else None
        return {"messages": messages, "tools": self.tools, "tool_choice": choice,
                "parallel_tool_calls": self.parallel, "system_mode": system_mode}


def read_json(path: str, what: str) -> Any:
    """The JSON in PATH ('-': standard input), or a one-line BadInputError."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise BadInputError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadInputError(f"{path}: the JSON nests too deeply") from None
    except ValueError as e:
        raise BadInputError(f"{path}: not JSON ({e})") from None


def read_tools(path: str) -> Any:
    """OpenAI's ``tools`` list, or an object with a ``tools`` key (a request body will do)."""
    raw = read_json(path, "the tools")
    if isinstance(raw, dict):
        if "tools" not in raw:
            raise BadInputError(f"{path}: an object of tools needs a 'tools' key (or give the list itself)")
        raw = raw["tools"]
    if not isinstance(raw, list):
        raise BadInputError(f"{path}: the tools must be a list (OpenAI's tools) or an object with a 'tools' key")
    return raw


def tool_choice_value(choice: str | None) -> str | dict[str, Any] | None:
    """``none``/``auto``/``required`` as they are; any other word names the function to call."""
    if choice is None or choice in (*TOOL_CHOICES, "any"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def chat_tools(tools_path: str | None, choice: str | None, parallel: bool | None) -> ChatTools:
    """``chat``'s tools, checked as a request's are (before the model loads: bad input first)."""
    tools = read_tools(tools_path) if tools_path is not None else None
    specs = parse_tools(tools)
    value = tool_choice_value(choice)
    parse_tool_choice(value, specs)
    return ChatTools(tools, value, parallel)


def build_request(opts: RequestOptions) -> RunRequest:
    """The request body of the files and options, validated as the service validates it."""
    body, from_body = _base_body(opts.messages_path)
    if opts.system:  # --system "" is no system prompt, as it always was
        if body["messages"] and isinstance(body["messages"][0], dict) and \
                body["messages"][0].get("role") in ("system", "developer"):
            raise BadInputError("--system and a system message in --messages: give one of them")
        body["messages"].insert(0, {"role": "system", "content": opts.system})
    if opts.prompt.strip():
        body["messages"].append({"role": "user", "content": opts.prompt})
    if opts.tools_path is not None:
        body["tools"] = read_tools(opts.tools_path)
    if opts.tool_choice is not None:
        body["tool_choice"] = tool_choice_value(opts.tool_choice)
    if opts.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = opts.parallel_tool_calls
    if opts.system_mode is not None:
        body["system_mode"] = opts.system_mode
    return RunRequest(body, conversation_from_request(body), from_body)


def _base_body(messages_path: str | None) -> tuple[dict[str, Any], bool]:
    """A copy of the --messages file as a request body, and whether it was one (not a list)."""
    if messages_path is None:
        return {"messages": []}, False
    raw = read_json(messages_path, "the messages")
    if isinstance(raw, list):
        return {"messages": list(raw)}, False
    if isinstance(raw, dict) and isinstance(raw.get("messages"), list):
        return {**raw, "messages": list(raw["messages"])}, True
    raise BadInputError(f"{messages_path}: give a messages list or a request body with a 'messages' list")


def assistant_message(answer: str, reasoning: str, calls: Sequence[ParsedCall]) -> dict[str, Any]:
    """The turn as OpenAI's assistant message. A message with calls keeps its reasoning (sent
    back, the prompt replays the thought that led to the calls); a text answer does not, as in
    a plain chat, where earlier thinking is never replayed."""
    if not calls:
        return {"role": "assistant", "content": answer}
    msg: dict[str, Any] = {"role": "assistant", "content": answer or None}
    if reasoning:
        msg["reasoning_content"] = reasoning
    msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                         for c in calls]
    return msg


def reply_message(answer: str, reasoning: str, done: Done) -> dict[str, Any]:
    """The assistant message to append after a turn: with calls only when the turn ended in them
    (a turn cut by max_tokens reports the calls it completed before the cut; they are not a
    reply to act on)."""
    return assistant_message(answer, reasoning, done.tool_calls if done.finish_reason == "tool_calls" else ())


def save_conversation(path: str, req: RunRequest, message: dict[str, Any]) -> None:
    """The request's messages and the new assistant message, written atomically to PATH: a list,
    or the request body (its other fields kept) when --messages was one. An empty answer is not
    kept (a request refuses an assistant message with nothing in it)."""
    empty = not (message.get("content") or message.get("tool_calls"))
    messages = [*req.body["messages"], *([] if empty else [message])]
    saved: Any = {**req.body, "messages": messages} if req.from_body else messages
    write_json_atomic(Path(path), saved)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write a temporary file beside PATH, fsync it, rename it over PATH (never half a file)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write the conversation ({e.strerror or e})") from None


def call_lines(calls: Sequence[ParsedCall]) -> list[str]:
    """Each call for a person: its name and id, then its arguments as indented JSON."""
    out = []
    for c in calls:
        args = json.dumps(json.loads(c.arguments), indent=2, ensure_ascii=False)
        out.append(f"{c.name} ({c.id}) {args}")
    return out
