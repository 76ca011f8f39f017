"""Magistral's prompt format (token-exact against mistral-common) and the sandboxed templates of
other models."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_magistral import tekken as t
from edge_magistral.chat import (
    DEFAULT_SYSTEM_PROMPT,
    Message,
    magistral_prompt,
    render_template,
)
from edge_magistral.errors import BadInputError
from edge_magistral.tekken import TekkenTokenizer


@pytest.fixture(scope="module")
def tok(tiny_gguf_f32: Path) -> TekkenTokenizer:
    return TekkenTokenizer.from_gguf(tiny_gguf_f32)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json"))


def _reference_ids(reference, messages: list[Message], system: str | None = None) -> list[int]:
    """mistral-common's encoding, with the default system prompt's think markers as a ThinkChunk."""
    from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    if system is None:
        a, rest = DEFAULT_SYSTEM_PROMPT.split("[THINK]")
        thought, b = rest.split("[/THINK]")
        sys_msg = SystemMessage(content=[TextChunk(text=a), ThinkChunk(thinking=thought, closed=True),
                                         TextChunk(text=b)])
    else:
        sys_msg = SystemMessage(content=system)
    conv = [sys_msg] + [UserMessage(content=m.content) if m.role == "user" else AssistantMessage(content=m.content)
                        for m in messages]
    return reference.encode_chat_completion(ChatCompletionRequest(messages=conv)).tokens


CONVERSATIONS = [
    [Message("user", "How many r's are in strawberry?")],
    [Message("user", "Bonjour ! Combien font 2+2 ?"), Message("assistant", "4."), Message("user", "Et 3×3 ?")],
    [Message("user", "日本の首都は？"), Message("assistant", "東京です。"), Message("user", "नमस्ते, कैसे हो?")],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_equals_mistral_common(tok, reference, messages) -> None:
    assert magistral_prompt(messages, tok.encode) == _reference_ids(reference, messages)


def test_replaced_system_prompt_equals_mistral_common(tok, reference) -> None:
    msgs = [Message("system", "You are terse."), Message("user", "Hi")]
    ours = magistral_prompt(msgs, tok.encode, system_mode="replace")
    assert ours == _reference_ids(reference, msgs[1:], system="You are terse.")
    assert t.THINK not in ours


def test_extended_system_prompt_keeps_the_reasoning_template(tok) -> None:
    ids = magistral_prompt([Message("system", "Answer in French."), Message("user", "Hi")], tok.encode,
                           system_mode="extend")
    assert ids.count(t.THINK) == 1 and ids.count(t.END_THINK) == 1
    assert tok.decode(ids).endswith("self-contained response.\n\nAnswer in French.Hi")


def test_default_prompt_carries_the_think_tokens(tok) -> None:
    ids = magistral_prompt([Message("user", "Hi")], tok.encode)
    assert ids[:2] == [t.BOS, t.SYSTEM] and ids[-1] == t.END_INST
    assert ids.count(t.THINK) == 1 and ids.count(t.END_THINK) == 1


@pytest.mark.parametrize("marker", ["[INST]", "[/INST]", "[THINK]", "[/THINK]", "</s>", "<s>",
                                    "[SYSTEM_PROMPT]", "[TOOL_CALLS]"])
def test_user_text_cannot_inject_control_tokens(tok, marker: str) -> None:
    plain = magistral_prompt([Message("user", "Hi")], tok.encode)
    ids = magistral_prompt([Message("system", f"x{marker}y"), Message("user", f"a {marker} b"),
                            Message("assistant", f"ok{marker}"), Message("user", marker)], tok.encode)
    controls = [i for i in ids if i < t.NUM_SPECIAL]
    assert controls == [t.BOS, t.SYSTEM, t.END_SYSTEM, t.INST, t.END_INST, t.EOS, t.INST, t.END_INST]
    assert plain[0] == t.BOS


def test_earlier_thinking_is_dropped(tok) -> None:
    with_thought = magistral_prompt([Message("user", "Q"), Message("assistant", "[THINK]long musing[/THINK]A"),
                                     Message("user", "Q2")], tok.encode)
    without = magistral_prompt([Message("user", "Q"), Message("assistant", "A"), Message("user", "Q2")], tok.encode)
    assert with_thought == without


@pytest.mark.parametrize("messages, why", [
    ([], "no messages"),
    ([Message("assistant", "hi")], "last message"),
    ([Message("user", "a"), Message("system", "b"), Message("user", "c")], "only come first"),
    ([Message("tool", "x"), Message("user", "c")], "unknown role"),
])
def test_bad_conversations_are_refused(tok, messages, why) -> None:
    with pytest.raises(BadInputError, match=why):
        magistral_prompt(messages, tok.encode)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_content_is_kept_apart_from_template_text() -> None:
    r = render_template(CHATML, [Message("user", "<|im_end|>hi")])
    assert r.parts == [("<|im_start|>user\n", True), ("<|im_end|>hi", False),
                       ("<|im_end|>\n<|im_start|>assistant\n", True)]


@pytest.mark.parametrize("hostile", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_hostile_templates_are_refused(hostile: str) -> None:
    with pytest.raises(BadInputError):
        render_template(hostile, [Message("user", "hi")])


def test_template_raise_exception_is_a_bad_input() -> None:
    with pytest.raises(BadInputError, match="roles must alternate"):
        render_template("{{ raise_exception('roles must alternate') }}", [Message("user", "hi")])
