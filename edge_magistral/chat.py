"""Magistral's prompt format and default system prompt.

The runtime builds Magistral prompts from token ids (the GGUF's template is only for other tools);
:data:`CHAT_TEMPLATE` is what the build writes into GGUF metadata so that llama-server, Ollama or
LM Studio render Magistral 1.1 correctly: system prompt with the ``[THINK]`` tokens, earlier
turns' thinking dropped, and the generation prompt ending at ``[/INST]``.
"""

from __future__ import annotations

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
