"""Magistral's output, token by token, as OpenAI-style tool calls (tokenizer v13).

The model answers in ``think? (content | content? ([TOOL_CALLS] name [ARGS] json)+)`` and ends
its turn with ``</s>``. :class:`ToolCallParser` reads that grammar one sampled token at a time, by
control-token id (never by matching text, so a user who types ``[TOOL_CALLS]`` cannot fake a call),
and turns it into events a server can forward as they come:

- ``ThinkingText`` / ``AnswerText`` (the engine's own event types) for the thought and the content
  before the first call;
- ``CallStart`` once per call when its name is complete and known (``[ARGS]`` seen), then
  ``CallArguments`` pieces: exactly what OpenAI's streamed ``delta.tool_calls`` carries (index, id,
  name once, arguments in pieces);
- ``CallDone`` when a call's arguments end (at the next ``[TOOL_CALLS]`` or ``</s>``) and parse as
  a JSON object;
- ``ParseError`` when the output leaves the grammar (an unknown tool, arguments that are not a JSON
  object, text after a call's JSON, ``[THINK]`` after content, a call inside the thought, a stray
  control token). It is an event, not an exception: the turn's text is the model's, not ours to
  crash on. After an error the parser ignores the rest; a caller should stop generating;
- ``Finish`` from :meth:`ToolCallParser.end`: the finish reason and the complete calls.

Rules the API relies on:

- A call is reported only whole. A turn cut (``max_tokens``, the context) inside a call's name or
  arguments reports ``CallTruncated`` and finishes ``"length"``: never a half call as a call. Calls
  completed before the cut are still listed, but the reason stays ``"length"`` so a client knows
  the turn was cut. A streaming server has already sent the cut call's name and argument pieces
  (OpenAI streams behave the same); the finish reason is what tells the client.
- ``"tool_calls"`` is the finish reason when the turn ended with ``</s>`` after at least one
  complete call; otherwise the reason the caller gives (``"stop"``, ``"length"``).
- A turn with a parse error reports no call (``Finish.calls`` is empty, ``Finish.error`` says why):
  never run a call from a malformed turn.
- ``CallDone.call.arguments`` is the arguments re-dumped as the prompt carries them
  (``json.dumps(value, ensure_ascii=False)``, default separators; see :mod:`edge_magistral.tools`),
  so a call sent back encodes to the tokens the model wrote. The model is trained on that form, so
  the streamed pieces normally concatenate to it exactly; ``raw_arguments`` is always their exact
  concatenation (it differs only when the model spaced its JSON otherwise or escaped a character).
"""

from __future__ import annotations

import codecs
import json
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from edge_magistral import tekken as tk
from edge_magistral.chat import ToolCall
from edge_magistral.generation import (
    MAX_TOOL_CALLS,
    AnswerText,
    CallArguments,
    CallStart,
    ParsedCall,
    ThinkingText,
)

CALL_ID_ALPHABET = string.ascii_letters + string.digits
JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
MAX_NAME_CHARS = 64  # tools.NAME's limit: a longer name can only be unknown, so stop buffering it


def random_call_id() -> str:
    """``call_`` and 24 random letters or digits: OpenAI's shape, unguessable, unique in practice."""
    return "call_" + "".join(secrets.choice(CALL_ID_ALPHABET) for _ in range(24))


def as_tool_call(call: ParsedCall) -> ToolCall:
    """A parsed call as an assistant message carries it back into a conversation."""
    return ToolCall(call.id, call.name, call.arguments)


class JsonScan:
    """Where a JSON text stands, character by character: inside a string, how deep, whether the
    first value has closed. Enough to tell when a call's arguments object is complete (the text
    is known to be valid JSON while a grammar constrains it)."""

    def __init__(self) -> None:
        self.depth = 0
        self.opened = False
        self.in_string = False
        self.escaped = False

    @property
    def closed(self) -> bool:
        return self.opened and self.depth == 0

    def feed(self, text: str) -> None:
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                self.opened = True
            elif ch in "}]":
                self.depth -= 1


# ------------------------------------------------------------------------------------ events

@dataclass(frozen=True)
class CallDone:
    call: ParsedCall


@dataclass(frozen=True)
class CallTruncated:
    """The turn ended inside this call (before or inside its arguments): it is no call."""

    index: int
    name: str  # as far as it was written
    raw_arguments: str


@dataclass(frozen=True)
class ParseError:
    """The output left the grammar. ``code`` is stable for programs, ``message`` is for people."""

    # ``message`` quotes the model's output: it goes to the requester, never to the log.
    code: str  # unknown_tool | bad_arguments | not_an_object | text_after_call | think_after_content
    #            | call_in_thinking | missing_arguments | unexpected_token | too_many_calls | after_end
    #            | schema_mismatch
    message: str
    index: int | None = None  # the call it concerns, if any


@dataclass(frozen=True)
class Finish:
    reason: str  # "tool_calls", or the reason end() was given ("stop", "length", ...)
    calls: tuple[ParsedCall, ...]
    content: str  # the answer text before the first call
    truncated: CallTruncated | None = None
    error: ParseError | None = None


ToolEvent = ThinkingText | AnswerText | CallStart | CallArguments | CallDone | CallTruncated | ParseError | Finish


class State(Enum):
    START = "start"  # nothing yet: [THINK], content or a call may come
    THINKING = "thinking"
    CONTENT = "content"  # after [/THINK] or the first content text
    NAME = "name"  # after [TOOL_CALLS]
    ARGS = "args"  # after [ARGS]
    ENDED = "ended"  # </s> seen
    FAILED = "failed"  # a parse error; the rest is ignored


# ------------------------------------------------------------------------------------ parser

class ToolCallParser:
    """The v13 output grammar as an incremental state machine (see the module docstring).

    ``known_tools``: the names the request offered; ``piece``: token id → its bytes (or text), used
    when :meth:`push` is given no text (the engine passes the text its detokenizer already made);
    ``new_id``: the call-id source (tests inject a deterministic one); ``max_calls``: 1 when the
    request says ``parallel_tool_calls: false``; ``thinking``: the prompt already ends in ``[THINK]``.
    """

    def __init__(self, known_tools: Iterable[str], piece: Callable[[int], bytes | str] | None = None, *,
                 new_id: Callable[[], str] = random_call_id, max_calls: int = MAX_TOOL_CALLS,
                 thinking: bool = False, check: Callable[[str, str], str | None] | None = None):
        self.known = frozenset(known_tools)
        self._check = check  # (name, arguments JSON) → why they break the tool's schema, or None
        self._piece = piece
        self._new_id = new_id
        self.max_calls = max_calls
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.state = State.THINKING if thinking else State.START
        self.calls: list[ParsedCall] = []
        self.content: list[str] = []
        self.error: ParseError | None = None
        self._name: list[str] = []
        self._args: list[str] = []
        self._id = ""
        self._scan = JsonScan()
        self._finished = False

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    @property
    def in_call(self) -> bool:
        """Inside a call: its name or its arguments."""
        return self.state in (State.NAME, State.ARGS)

    @property
    def args_open(self) -> bool:
        """Inside a call's arguments, before their JSON object has closed."""
        return self.state is State.ARGS and not self._scan.closed

    # ------------------------------------------------------------------------ public
    def push(self, token: int, text: str | None = None) -> list[ToolEvent]:
        """Events for one generated token. ``text``: what it decodes to (None: use ``piece``)."""
        if self.state is State.FAILED or self._finished:
            return []
        if self.state is State.ENDED:
            return self._fail("after_end", f"token {token} after </s>")
        if 0 <= token < tk.NUM_SPECIAL:
            out = self._text(self._decoder.decode(b"", final=True)) if self._piece is not None else []
            self._decoder.reset()
            return out + (self._control(token) if self.state is not State.FAILED else [])
        if text is None:
            text = self._decode(token)
        return self._text(text) if text else []

    def end(self, reason: str = "stop") -> list[ToolEvent]:
        """The turn is over (``reason``: the engine's finish reason). Returns the last events and
        ``Finish``; only the first call does anything."""
        if self._finished:
            return []
        out: list[ToolEvent] = []
        if self._piece is not None and self.state not in (State.FAILED, State.ENDED):
            out += self._text(self._decoder.decode(b"", final=True))
        truncated = None
        if self.state in (State.NAME, State.ARGS):  # cut inside a call: no call, and "length"
            truncated = CallTruncated(len(self.calls), "".join(self._name), "".join(self._args))
            out.append(truncated)
            reason = "length" if reason in ("stop", "tool_calls") else reason
        self._finished = True
        content = "".join(self.content)
        if self.error is not None:
            out.append(Finish(reason, (), content, truncated, self.error))
        elif self.calls and self.state is State.ENDED:
            out.append(Finish("tool_calls", tuple(self.calls), content))
        else:
            out.append(Finish(reason, tuple(self.calls), content, truncated))
        return out

    # ------------------------------------------------------------------------ states
    def _decode(self, token: int) -> str:
        if self._piece is None:
            raise ValueError("ToolCallParser.push needs the token's text when no piece function is given")
        p = self._piece(token)
        return self._decoder.decode(p.encode("utf-8") if isinstance(p, str) else p)

    def _text(self, text: str) -> list[ToolEvent]:
        """Ordinary text in the current state."""
        if not text:
            return []
        s = self.state
        if s is State.THINKING:
            return [ThinkingText(text)]
        if s in (State.START, State.CONTENT):
            self.state = State.CONTENT
            self.content.append(text)
            return [AnswerText(text)]
        if s is State.NAME:
            self._name.append(text)
            if sum(map(len, self._name)) > MAX_NAME_CHARS:
                return self._unknown_tool()
            return []
        self._args.append(text)  # State.ARGS
        self._scan.feed(text)
        return [CallArguments(len(self.calls), text)]

    def _control(self, token: int) -> list[ToolEvent]:
        """A control token: the grammar's transitions."""
        s, name = self.state, tk.SPECIAL_TOKENS.get(token, f"<SPECIAL_{token}>")
        if token == tk.THINK:
            if s is State.START:
                self.state = State.THINKING
                return []
            if s is State.THINKING:
                return self._fail("unexpected_token", "[THINK] inside the thought")
            return self._fail("think_after_content", "[THINK] after the answer began")
        if token == tk.END_THINK and s is State.THINKING:
            self.state = State.CONTENT
            return []
        if token == tk.TOOL_CALLS and s is State.THINKING:
            return self._fail("call_in_thinking", "[TOOL_CALLS] inside the thought")
        if token == tk.TOOL_CALLS and s in (State.START, State.CONTENT, State.ARGS):
            out = self._close_call() if s is State.ARGS else []
            if self.state is State.FAILED:
                return out
            if len(self.calls) >= self.max_calls:
                return out + self._fail("too_many_calls", f"more than {self.max_calls} calls in one turn",
                                        len(self.calls))
            self.state, self._name, self._args, self._scan = State.NAME, [], [], JsonScan()
            return out
        if token == tk.ARGS and s is State.NAME:
            return self._open_arguments()
        if token == tk.EOS:
            if s is State.NAME:
                return self._fail("missing_arguments", "the call has no [ARGS]", len(self.calls))
            out = self._close_call() if s is State.ARGS else []
            if self.state is not State.FAILED:
                self.state = State.ENDED
            return out
        return self._fail("unexpected_token", f"unexpected {name} in the {s.value}",
                          len(self.calls) if s in (State.NAME, State.ARGS) else None)

    def _open_arguments(self) -> list[ToolEvent]:
        """[ARGS]: the name is complete; it must be a tool the request offered."""
        name = "".join(self._name)
        if name not in self.known:
            return self._unknown_tool()
        self._id = self._new_id()
        self.state = State.ARGS
        return [CallStart(len(self.calls), self._id, name)]

    def _unknown_tool(self) -> list[ToolEvent]:
        name = "".join(self._name)
        shown = name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS] + "…"
        known = sorted(self.known)
        offered = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "") or "none"
        return self._fail("unknown_tool", f"the model called {shown!r}, which is not a tool of the request "
                          f"(offered: {offered})", len(self.calls))

    def _close_call(self) -> list[ToolEvent]:
        """The arguments ended: a JSON object, re-dumped, or a parse error."""
        index, raw = len(self.calls), "".join(self._args)
        value, error = parse_arguments(raw)
        if error is not None:
            code, why = error
            return self._fail(code, f"call {index} ({''.join(self._name)}): {why}", index)
        name = "".join(self._name)
        why = self._check(name, value) if self._check is not None else None
        if why is not None:
            return self._fail("schema_mismatch", f"call {index} ({name}): {why}", index)
        call = ParsedCall(index, self._id, name, value, raw)
        self.calls.append(call)
        return [CallDone(call)]

    def _fail(self, code: str, message: str, index: int | None = None) -> list[ToolEvent]:
        self.error = ParseError(code, message, index)
        self.state = State.FAILED
        return [self.error]


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_arguments(raw: str) -> tuple[str, tuple[str, str] | None]:
    """(the arguments re-dumped as the prompt carries them, None) or ("", (error code, why)).

    Strict JSON: ``NaN``, ``Infinity`` and numbers beyond a double (which Python's json accepts or
    turns into ``Infinity``) are refused, as are lone surrogate escapes (no UTF-8 response carries
    them); a complete object followed by anything but blanks is text after the call, not arguments."""
    text = raw.strip()
    if not text:
        return "", ("bad_arguments", "no arguments after [ARGS] (expected a JSON object)")
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    try:
        value, end = decoder.raw_decode(text)
    except RecursionError:
        return "", ("bad_arguments", "the arguments nest too deeply")
    except ValueError as e:
        return "", ("bad_arguments", f"the arguments are not valid JSON ({e})")
    if not isinstance(value, dict):
        kind = JSON_KINDS.get(type(value), "value")
        return "", ("not_an_object", f"the arguments are a JSON {kind}, not an object")
    if end != len(text):
        return "", ("text_after_call", f"text after the arguments' JSON object: {text[end:end + 40]!r}")
    try:
        dumped = json.dumps(value, ensure_ascii=False, allow_nan=False)
        dumped.encode("utf-8")
    except RecursionError:
        return "", ("bad_arguments", "the arguments nest too deeply")
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800): no UTF-8 response could carry it
        return "", ("bad_arguments", "the arguments escape a lone surrogate")
    except ValueError:  # 1e400 parses as inf, which JSON cannot carry
        return "", ("bad_arguments", "a number in the arguments is out of range")
    return dumped, None
