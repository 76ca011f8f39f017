"""Magistral's prompt format and default system prompt.

The runtime builds Magistral prompts from token ids (the GGUF's template is only for other tools);
:data:`CHAT_TEMPLATE` is what the build writes into GGUF metadata so that llama-server, Ollama or
LM Studio render Magistral 1.1 correctly: system prompt with the ``[THINK]`` tokens, earlier
turns' thinking dropped, and the generation prompt ending at ``[/INST]``.

Function calling follows mistral-common's v13 encoding token for token (see
:func:`magistral_prompt`); turning an OpenAI-style request into these messages is
:mod:`edge_magistral.tools`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_magistral.errors import BadInputError

# Magistral Small 1.1's default system prompt. "[THINK]" and "[/THINK]" here stand for the control
# tokens 34 and 35, not for text: tokenize with :func:`split_special_markers`.
DEFAULT_SYSTEM_PROMPT = (
    "First draft your thinking process (inner monologue) until you arrive at a response. Format your "
    "response using Markdown, and use LaTeX for any mathematical equations. Write both your thoughts "
    "and the response in the same language as the input.\n\n"
    "Your thinking process must follow the template below:[THINK]Your thoughts or/and draft, like "
    "working through an exercise on scratch paper. Be as casual and as long as you want until you are "
    "confident to generate the response. Use the same language as the input.[/THINK]Here, provide a "
    "self-contained response."
)

_TEMPLATE_SYSTEM = DEFAULT_SYSTEM_PROMPT.replace("\n", "\\n")

CHAT_TEMPLATE = (
    "{%- set default_system_message = '" + _TEMPLATE_SYSTEM + "' %}"
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- if system_message %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    # Mistral recommends dropping earlier turns' reasoning from the context.
    "{%- set content = message['content'] %}"
    "{%- if '[/THINK]' in content %}{%- set content = content.split('[/THINK]')[-1] %}{%- endif %}"
    "{{- content + eos_token }}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def split_special_markers(text: str, markers: dict[str, int]) -> list[str | int]:
    """Split ``text`` at the given special-token markers: plain text pieces and token ids.

    Used for the *system prompt template only* (trusted text). User text is never split this way.
    """
    out: list[str | int] = []
    rest = text
    while rest:
        hits = [(rest.find(m), m) for m in markers if m in rest]
        if not hits:
            out.append(rest)
            break
        pos, m = min(hits)
        if pos:
            out.append(rest[:pos])
        out.append(markers[m])
        rest = rest[pos + len(m):]
    return out


# ------------------------------------------------------------------------------ prompt building

@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: OpenAI's ``tools[i].function`` without ``strict``."""

    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema (of an object)

    def as_json(self) -> dict[str, Any]:
        """The tool as mistral-common dumps it: ``{type, function: {name, description, parameters}}``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One call an assistant turn made. The id only pairs it with its result: v13 prompts carry no ids."""

    id: str
    name: str
    arguments: str  # JSON text as the prompt carries it: json.dumps(json.loads(raw), ensure_ascii=False)


@dataclass(frozen=True)
class Message:
    """One chat turn.

    Plain chats (no tools, no tool fields) carry only the answer in assistant turns: earlier
    thinking is never replayed. ``reasoning`` (an assistant's thought sent back), ``tool_calls``
    (assistant) and ``tool_call_id`` (a ``tool`` message: the result of that call) make the
    conversation a tool conversation, encoded as mistral-common v13 does.
    """

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


SYSTEM_MODES = ("replace", "extend")


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise BadInputError("no messages: give at least one user message")
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            raise BadInputError(f"message {i}: unknown role {m.role!r} (use system, user or assistant)")
        if m.role == "system" and i != 0:
            raise BadInputError(f"message {i}: a system message may only come first")
        if not isinstance(m.content, str):
            raise BadInputError(f"message {i}: content must be text")
    if messages[-1].role != "user":
        raise BadInputError("the last message must be from the user")


def split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """The user's own system text (None if absent) and the remaining turns."""
    if messages and messages[0].role == "system":
        return messages[0].content, list(messages[1:])
    return None, list(messages)


def strip_thinking(answer: str) -> str:
    """Drop a leading ``[THINK]…[/THINK]`` written as text in an assistant turn (clients echo it)."""
    return answer.split("[/THINK]", 1)[1] if "[/THINK]" in answer else answer


def _system_ids(own: str | None, mode: str, encode: Callable[[str], list[int]]) -> list[int]:
    """``replace``: the user's system text replaces Magistral's default (its reasoning template
    goes too). ``extend``: it is appended to the default after a blank line. The default's
    ``[THINK]``/``[/THINK]`` become control tokens; the user's text never does."""
    from edge_magistral import tekken as t

    if mode not in SYSTEM_MODES:
        raise BadInputError(f"system mode must be one of {', '.join(SYSTEM_MODES)}")
    if own is not None and mode == "replace":
        return encode(own)
    pieces = split_special_markers(DEFAULT_SYSTEM_PROMPT, {"[THINK]": t.THINK, "[/THINK]": t.END_THINK})
    if own is not None:
        pieces[-1] = f"{pieces[-1]}\n\n{own}"  # the default ends with text, never a marker
    return [i for p in pieces for i in ([p] if isinstance(p, int) else encode(p))]


def magistral_prompt(messages: Sequence[Message], encode: Callable[[str], list[int]],
                     system_mode: str = "replace", tools: Sequence[ToolSpec] = ()) -> list[int]:
    """Token ids of a Magistral prompt, ending at ``[/INST]`` (the model opens ``[THINK]`` itself)
    or, after tool results, at ``[/TOOL_RESULTS]``.

    Control tokens are inserted by id; all text goes through ``encode``, which must never produce
    control tokens — so a user typing ``[INST]`` or ``</s>`` gets plain text. With ``tools`` or
    tool fields in the messages the conversation is encoded as mistral-common v13 encodes it
    (:func:`_tool_prompt`); otherwise as a plain chat.
    """
    from edge_magistral import tekken as t

    if uses_tools(messages, tools):
        return _tool_prompt(messages, encode, system_mode, tools)
    _check_messages(messages)
    own, turns = split_system(messages)
    system = _system_ids(own, system_mode, encode)
    ids = [t.BOS] + ([t.SYSTEM, *system, t.END_SYSTEM] if system else [])
    for m in turns:
        if m.role == "user":
            ids += [t.INST, *encode(m.content), t.END_INST]
        else:
            ids += [*encode(strip_thinking(m.content)), t.EOS]
    return ids


# ------------------------------------------------------------------------- function calling

def uses_tools(messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> bool:
    """Whether this is a tool conversation (encoded as mistral-common v13), not a plain chat."""
    return bool(tools) or any(m.reasoning is not None or m.tool_calls or m.tool_call_id is not None
                              for m in messages)


def tools_json(tools: Sequence[ToolSpec]) -> str:
    """The ``[AVAILABLE_TOOLS]`` text: Python's ``json.dumps(..., ensure_ascii=False)``, default separators."""
    return json.dumps([tool.as_json() for tool in tools], ensure_ascii=False)


TOOL_ROLES = ("system", "user", "assistant", "tool")


def _check_fields(i: int, m: Message) -> None:
    """One message's own fields: a known role and only the fields of its role."""
    if m.role not in TOOL_ROLES:
        raise BadInputError(f"message {i}: unknown role {m.role!r} (use system, user, assistant or tool)")
    if m.role == "system" and i != 0:
        raise BadInputError(f"message {i}: a system message may only come first")
    if not isinstance(m.content, str):
        raise BadInputError(f"message {i}: content must be text")
    if m.role != "assistant" and (m.tool_calls or m.reasoning is not None):
        raise BadInputError(f"message {i}: only assistant messages carry tool_calls or reasoning")
    if m.role != "tool" and m.tool_call_id is not None:
        raise BadInputError(f"message {i}: only tool messages carry a tool_call_id")
    if m.role == "tool" and not m.tool_call_id:
        raise BadInputError(f"message {i}: a tool message needs the tool_call_id of the call it answers")
    if m.role == "assistant" and not (m.content or m.tool_calls or m.reasoning is not None):
        raise BadInputError(f"message {i}: an assistant message needs content, tool_calls or reasoning")
    ids = [c.id for c in m.tool_calls]
    if len(set(ids)) != len(ids):
        raise BadInputError(f"message {i}: two tool calls share an id; each call needs its own id")


def check_conversation(messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> None:
    """Refuse what :func:`magistral_prompt` would refuse, without encoding anything."""
    if uses_tools(messages, tools):
        check_tool_conversation(messages, tools)
    else:
        _check_messages(messages)


def check_tool_conversation(messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> None:
    """Refuse a tool conversation mistral-common or the model could not make sense of.

    Every call of an assistant message is answered by exactly one ``tool`` message right after it
    (in any order), before the next user or assistant message; the conversation ends with a user
    or a tool message; tools need a user message (their block goes before its ``[INST]``).
    """
    if not messages:
        raise BadInputError("no messages: give at least one user message")
    calls: dict[str, int] = {}  # the open calls' ids, of the message `asked`
    answered: set[str] = set()
    asked = -1
    for i, m in enumerate(messages):
        _check_fields(i, m)
        if m.role == "tool":
            if m.tool_call_id not in calls:
                raise BadInputError(f"message {i}: this tool message answers no call: tool_call_id "
                                    f"{m.tool_call_id!r} is not a call of the assistant message before it")
            if m.tool_call_id in answered:
                raise BadInputError(f"message {i}: call {m.tool_call_id!r} is answered a second time")
            answered.add(m.tool_call_id)
            continue
        _check_answered(calls, answered, asked, f"before message {i}")
        calls, answered, asked = {c.id: k for k, c in enumerate(m.tool_calls)}, set(), i
    if messages[-1].role not in ("user", "tool"):
        raise BadInputError("the last message must be from the user or a tool")
    _check_answered(calls, answered, asked, "at the end")
    if tools and not any(m.role == "user" for m in messages):
        raise BadInputError("a conversation with tools needs a user message (the tools go before it)")


def _check_answered(calls: dict[str, int], answered: set[str], asked: int, where: str) -> None:
    missing = [c for c in calls if c not in answered]
    if missing:
        raise BadInputError(f"message {asked}: tool call(s) {', '.join(map(repr, missing))} have no tool "
                            f"message {where}; answer every call right after the assistant message")


def results_in_call_order(messages: Sequence[Message]) -> list[Message]:
    """The messages with each run of tool results sorted into the order of the calls they answer
    (mistral-common v13 reorders by ``tool_call_id``). The conversation must be checked first."""
    out: list[Message] = []
    order: dict[str, int] = {}
    i = 0
    while i < len(messages):
        if messages[i].role != "tool":
            order = {c.id: k for k, c in enumerate(messages[i].tool_calls)}
            out.append(messages[i])
            i += 1
            continue
        j = i
        while j < len(messages) and messages[j].role == "tool":
            j += 1
        out += sorted(messages[i:j], key=lambda r: order[r.tool_call_id or ""])
        i = j
    return out


def _assistant_ids(m: Message, encode: Callable[[str], list[int]]) -> list[int]:
    """``[THINK]reasoning[/THINK]`` (only when sent back), the text, each call, ``</s>``.

    As mistral-common: text without reasoning loses its trailing spaces (``rstrip(" ")``), text
    after a thought is kept as it is; a call is ``[TOOL_CALLS]name[ARGS]arguments``, no id.
    """
    from edge_magistral import tekken as t

    if m.reasoning is not None:
        ids = [t.THINK, *encode(m.reasoning), t.END_THINK, *encode(m.content)]
    else:
        ids = encode(m.content.rstrip(" "))
    for call in m.tool_calls:
        ids += [t.TOOL_CALLS, *encode(call.name), t.ARGS, *encode(call.arguments)]
    return [*ids, t.EOS]


def _tool_prompt(messages: Sequence[Message], encode: Callable[[str], list[int]], system_mode: str,
                 tools: Sequence[ToolSpec]) -> list[int]:
    """mistral-common v13: ``<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]``, then the turns; the tools block
    ``[AVAILABLE_TOOLS]json[/AVAILABLE_TOOLS]`` right before the first user message's ``[INST]``;
    ``[TOOL_RESULTS]content[/TOOL_RESULTS]`` per result, its content byte for byte."""
    from edge_magistral import tekken as t

    check_tool_conversation(messages, tools)
    own, turns = split_system(messages)
    system = _system_ids(own, system_mode, encode)
    ids = [t.BOS] + ([t.SYSTEM, *system, t.END_SYSTEM] if system else [])
    block = [t.AVAILABLE_TOOLS, *encode(tools_json(tools)), t.END_AVAILABLE_TOOLS] if tools else []
    for m in results_in_call_order(turns):
        if m.role == "user":
            ids += [*block, t.INST, *encode(m.content), t.END_INST]
            block = []
        elif m.role == "tool":
            ids += [t.TOOL_RESULTS, *encode(m.content), t.END_TOOL_RESULTS]
        else:
            ids += _assistant_ids(m, encode)
    return ids


# ------------------------------------------------------------ other models' templates, sandboxed

_SENTINEL = "\x00EMCONTENT{}\x00"


@dataclass(frozen=True)
class RenderedPrompt:
    """A template's output split into trusted template text and untrusted message content."""

    parts: list[tuple[str, bool]]  # (text, is_template_text)


def render_template(template: str, messages: Sequence[Message], bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True) -> RenderedPrompt:
    """Render a GGUF's Jinja chat template in a sandbox.

    Templates come from model files: ``ImmutableSandboxedEnvironment`` blocks attribute escapes
    (``''.__class__``…) and mutation. Message contents are passed as sentinels and split back out,
    so the caller can tokenize template text with special tokens and user text without.
    """
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    if uses_tools(messages):
        raise BadInputError("tools, tool calls and reasoning sent back need a Magistral model; this model's "
                            "own chat template gets plain chats only")
    _check_messages(messages)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg: str) -> None:
        raise BadInputError(f"the model's chat template refused the messages: {msg}")

    env.globals["raise_exception"] = raise_exception
    msgs = [{"role": m.role, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    try:
        text = env.from_string(template).render(messages=msgs, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except SecurityError as e:
        raise BadInputError(f"the model's chat template tried an unsafe operation ({e}); refusing it") from None
    except TemplateError as e:
        raise BadInputError(f"the model's chat template is broken ({e})") from None
    parts: list[tuple[str, bool]] = []
    pattern = re.compile("\x00EMCONTENT(\\d+)\x00")
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            parts.append((text[pos:m.start()], True))
        parts.append((messages[int(m.group(1))].content, False))
        pos = m.end()
    if pos < len(text):
        parts.append((text[pos:], True))
    return RenderedPrompt(parts)
