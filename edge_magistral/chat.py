"""Magistral's prompt format and default system prompt.

The runtime builds Magistral prompts from token ids (the GGUF's template is only for other tools);
:data:`CHAT_TEMPLATE` is what the build writes into GGUF metadata so that llama-server, Ollama or
LM Studio render Magistral 1.1 correctly: system prompt with the ``[THINK]`` tokens, earlier
turns' thinking dropped, and the generation prompt ending at ``[/INST]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
class Message:
    """One chat turn. Assistant turns carry only the answer: earlier thinking is never replayed."""

    role: str  # "system" | "user" | "assistant"
    content: str


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
                     system_mode: str = "replace") -> list[int]:
    """Token ids of a Magistral prompt, ending at ``[/INST]`` (the model opens ``[THINK]`` itself).

    Control tokens are inserted by id; all text goes through ``encode``, which must never produce
    control tokens — so a user typing ``[INST]`` or ``</s>`` gets plain text.
    """
    from edge_magistral import tekken as t

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
