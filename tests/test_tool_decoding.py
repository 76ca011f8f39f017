"""A turn that may call tools: the core's parsing and constraints.

Two halves. Scripted ids on a fake model (no llama.cpp decode): what the turn emits, when the
grammar holds and which ids are banned at each step. Then the tiny random Magistral model in the
real engine: whatever the random weights prefer, a required or named call comes out complete and
valid against its tool's schema, ``none`` never calls, and ``auto`` constrains the arguments once
the model opens a call.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from test_toolcalls import FakeVocab  # text ↔ fake 3-byte tokens, as the parser's tests use

from edge_magistral import tekken as tk
from edge_magistral.errors import BadInputError
from edge_magistral.generation import (
    AnswerText,
    CallArguments,
    CallStart,
    Done,
    Limits,
    LoadSettings,
    ThinkingText,
    ToolUse,
)
from edge_magistral.tool_decoding import AFTER_ARGS, IN_ARGS, IN_NAME, IN_THOUGHT, tools_grammar
from edge_magistral.turn import Turn
from edge_magistral.watchdog import WatchdogConfig

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"]}
TOOLS = (("get_weather", WEATHER), ("now", {}))
PROMPT = [tk.BOS, tk.INST, 1000, tk.END_INST]


class FakeModel:
    """What a Turn asks of a loaded Magistral model; ``sampler`` returns what the chain would hold."""

    n_ctx, eos_id, load_s = 4096, tk.EOS, 0.0

    def __init__(self, vocab: FakeVocab):
        self.vocab = vocab

    def thinks(self, limits: Limits) -> bool:
        return not limits.raw

    def watchdog_config(self, limits: Limits, max_tokens: int) -> WatchdogConfig:
        budget = 2048 if limits.think_budget is None else limits.think_budget
        return WatchdogConfig(think_budget=budget, max_tokens=max_tokens)

    def piece(self, token: int) -> bytes:
        return self.vocab.table.get(token, b"")

    def sampler(self, limits, temperature, banned, grammar, root="root"):
        return {"banned": banned, "grammar": grammar, "root": root if grammar else None}

    def free_sampler(self, chain) -> None:
        pass

    def accept(self, chain, tokens) -> None:
        chain["replayed"] = list(tokens)

    def encode_text(self, text: str) -> list[int]:
        return [900_000]


def turn_with(use: ToolUse | None, **kw) -> tuple[Turn, FakeVocab]:
    vocab = FakeVocab()
    turn = Turn(FakeModel(vocab), PROMPT, Limits(tools=use, **kw))
    turn.prefill()
    return turn, vocab


def run(turn: Turn, ids: list[int]) -> list:
    """Feed scripted ids (checking the sampler asked before each); the events, Done last."""
    for t in ids:
        turn.sampler()
        if not turn.token(t):
            break
    turn.end()
    return turn.events


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


# ----------------------------------------------------------------------------- scripted

def test_auto_content_then_two_calls_stream_as_call_events_and_finish_tool_calls() -> None:
    turn, v = turn_with(ToolUse(TOOLS), think_budget=0)
    events = run(turn, v.ids("Checking.", tk.TOOL_CALLS, "get_weather", tk.ARGS, '{"city": "Paris"}',
                             tk.TOOL_CALLS, "now", tk.ARGS, "{}", tk.EOS))
    assert "".join(e.text for e in of(events, AnswerText)) == "Checking."
    assert [(e.index, e.name) for e in of(events, CallStart)] == [(0, "get_weather"), (1, "now")]
    assert "".join(e.text for e in of(events, CallArguments) if e.index == 0) == '{"city": "Paris"}'
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "tool_calls" and done.tool_error is None
    assert [(c.name, c.arguments) for c in done.tool_calls] == [("get_weather", '{"city": "Paris"}'), ("now", "{}")]
    assert [c.id for c in done.tool_calls] == [e.id for e in of(events, CallStart)]


def test_auto_bans_and_grammar_follow_the_call_step_by_step() -> None:
    turn, v = turn_with(ToolUse(TOOLS))
    seen = []

    def step(t: int) -> None:
        chain = turn.sampler()
        seen.append((chain["banned"] & (IN_ARGS | {tk.TOOL_CALLS}), chain["root"]))
        assert turn.token(t)

    step(tk.THINK)
    for t in v.ids("hmm", tk.END_THINK, "ok", tk.TOOL_CALLS, "now", tk.ARGS, '{"a": "}"}'):
        step(t)
    chain = turn.sampler()
    assert seen[0] == (frozenset(), None)  # the first token: [THINK], text or a call
    assert seen[1][0] >= IN_THOUGHT and seen[1][1] is None  # inside the thought: no call, no grammar
    i_call = 1 + len(v.ids("hmm")) + 1 + 1
    after_call = seen[i_call + 1]
    assert after_call == (IN_NAME & (IN_ARGS | {tk.TOOL_CALLS}), "root")  # the name: grammar on
    assert chain["replayed"][0] == tk.TOOL_CALLS  # the grammar starts at the [TOOL_CALLS] written
    assert seen[-1][0] == IN_ARGS & (IN_ARGS | {tk.TOOL_CALLS})  # '}' inside a string: still open
    assert tk.TOOL_CALLS not in chain["banned"] and chain["banned"] >= AFTER_ARGS  # closed: a next call may come


def test_required_starts_the_grammar_with_the_answer_and_lets_the_thought_open_first() -> None:
    turn, v = turn_with(ToolUse(TOOLS, choice="required"))
    assert turn.sampler()["root"] == "think-or-answer"  # [THINK] or the first token of a call
    assert turn.token(tk.THINK)
    assert turn.sampler()["root"] is None  # the thought is free
    for t in v.ids("plan", tk.END_THINK):
        assert turn.token(t)
    chain = turn.sampler()
    assert chain["root"] == "root" and chain["replayed"] == []  # nothing of the thought is replayed
    direct, _ = turn_with(ToolUse(TOOLS, choice="required"))
    assert direct.token(tk.TOOL_CALLS)  # no thought: the call's first token stays in the grammar
    assert direct.sampler()["replayed"] == [tk.TOOL_CALLS]


def test_without_tools_a_call_is_banned_everywhere_and_with_tools_only_in_the_thought() -> None:
    plain, v = turn_with(None)
    assert tk.TOOL_CALLS in plain.sampler()["banned"]
    plain.token(tk.THINK)
    plain.token(v.ids("x")[0])
    plain.token(tk.END_THINK)
    assert tk.TOOL_CALLS in plain.sampler()["banned"]
    tools, v = turn_with(ToolUse(TOOLS))
    assert tk.TOOL_CALLS not in tools.sampler()["banned"]
    tools.token(tk.THINK)
    assert tk.TOOL_CALLS in tools.sampler()["banned"]
    tools.token(tk.END_THINK)
    assert tk.TOOL_CALLS not in tools.sampler()["banned"]


def test_stop_strings_apply_to_the_answer_text_never_inside_a_call() -> None:
    turn, v = turn_with(ToolUse(TOOLS), think_budget=0, stop=("Paris",))
    events = run(turn, v.ids("I will", tk.TOOL_CALLS, "get_weather", tk.ARGS, '{"city": "Paris"}', tk.EOS))
    assert events[-1].finish_reason == "tool_calls" and events[-1].tool_calls[0].arguments == '{"city": "Paris"}'
    assert "".join(e.text for e in of(events, AnswerText)) == "I will"  # held back text came out before the call
    turn, v = turn_with(ToolUse(TOOLS), think_budget=0, stop=("Paris",))
    events = run(turn, v.ids("Paris is sunny", tk.TOOL_CALLS, "now", tk.ARGS, "{}", tk.EOS))
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == "stop_string"
    assert not events[-1].tool_calls


def test_a_call_cut_by_max_tokens_is_no_call_and_finishes_length() -> None:
    turn, v = turn_with(ToolUse(TOOLS), think_budget=0, max_tokens=8)
    events = run(turn, v.ids("ok", tk.TOOL_CALLS, "now", tk.ARGS, '{"a": "' + "x" * 40))
    done = events[-1]
    assert done.finish_reason == "length" and done.tool_calls == () and done.tool_error is None
    assert of(events, CallStart)  # the name was streamed; the finish reason tells the client it was cut


def test_repetitive_arguments_are_not_a_loop_but_repetitive_text_is() -> None:
    turn, v = turn_with(ToolUse(TOOLS), think_budget=0, max_tokens=4000)
    ids = v.ids(tk.TOOL_CALLS, "now", tk.ARGS, '{"xs": [')
    ids += [v.ids("1, ")[0]] * 400 + v.ids("1]}", tk.EOS)
    done = run(turn, ids)[-1]
    assert done.finish_reason == "tool_calls" and done.stop_reason == "eos"
    looping, v = turn_with(ToolUse(TOOLS), think_budget=0, max_tokens=4000)
    done = run(looping, [v.ids("ab ")[0]] * 400)[-1]
    assert done.stop_reason == "loop"


def test_output_that_leaves_the_grammar_ends_the_turn_with_no_call() -> None:
    turn, v = turn_with(ToolUse(TOOLS), think_budget=0)
    done = run(turn, v.ids(tk.TOOL_CALLS, "rm_rf", tk.ARGS, "{}", tk.EOS))[-1]
    assert done.finish_reason == "stop" and done.stop_reason == "tool_error" and not done.tool_calls
    assert "rm_rf" in done.tool_error and "not a tool of the request" in done.tool_error


def test_tools_need_a_magistral_chat_turn_and_no_response_format() -> None:
    with pytest.raises(BadInputError, match="Magistral chat turn"):
        turn_with(ToolUse(TOOLS), raw=True)
    with pytest.raises(BadInputError, match="response_format and tools"):
        turn_with(ToolUse(TOOLS), json_schema={"type": "object"})


def test_the_grammar_offers_known_names_only_and_one_call_unless_parallel() -> None:
    g = tools_grammar(ToolUse(TOOLS, choice="required"))
    assert g.startswith("root ::= call+\n") and '"get_weather" <[32]>' in g and '"now" <[32]>' in g
    assert f"<[{tk.TOOL_CALLS}]>" in g
    one = tools_grammar(ToolUse(TOOLS, choice="function", name="now", parallel=False))
    assert one.startswith("root ::= call\n") and '"get_weather"' not in one
    assert '[^"\\\\\\x7F\\x00-\\x1F]' in g  # no raw control characters in strings (strict JSON)
    with pytest.raises(BadInputError, match="cannot be enforced"):
        tools_grammar(ToolUse((("bad", {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}),)))


# ------------------------------------------------------------------------ the real engine
# Each constrained token costs llama.cpp's grammar a pass over the 131k-token vocabulary (tens of
# ms on this CPU), and random weights happily write endless strings: the engine's tools take
# enums and numbers, so a call is a dozen tokens, and each loop stops at its first finished call.
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
        "required": ["city"], "additionalProperties": False}
UNIT = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"],
        "additionalProperties": False}
ENGINE_TOOLS = (("get_weather", CITY), ("units", UNIT))


@pytest.fixture(scope="module")
def engine(tiny_gguf_f32: Path):
    from edge_magistral.engine import Engine

    e = Engine(LoadSettings(str(tiny_gguf_f32), n_ctx=2048, n_threads=2, think_budget=32))
    yield e
    e.close()


def prompt(engine) -> list[int]:
    from edge_magistral.tools import conversation_from_request

    tools = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in ENGINE_TOOLS]
    conv = conversation_from_request({"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                      "tools": tools})
    return conv.prompt_ids(engine.encode_text)


def check_calls(events: list) -> None:
    """Every reported call is known, whole and schema-valid; a call cut by the turn's end is not
    reported (the calls finished before it are, with finish_reason "length")."""
    done, schemas = events[-1], dict(ENGINE_TOOLS)
    started = [e.id for e in of(events, CallStart)]
    reported = [c.id for c in done.tool_calls]
    if done.finish_reason == "tool_calls":
        assert reported == started
    else:
        assert reported == started[:len(reported)] and len(started) - len(reported) <= 1
    for call in done.tool_calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def first_call(engine, use: ToolUse, seeds: int = 8, **limits) -> list | None:
    """Run seeds until a turn finishes with calls (checking every turn on the way); its events."""
    for seed in range(seeds):
        events = list(engine.submit(prompt(engine), Limits(tools=use, seed=seed, **limits)))
        check_calls(events)
        if events[-1].finish_reason == "tool_calls":
            return events
    return None


@pytest.mark.parametrize("use", [ToolUse(ENGINE_TOOLS, choice="required"),
                                 ToolUse(ENGINE_TOOLS, choice="function", name="get_weather", parallel=False)],
                         ids=["required", "named"])
def test_the_engine_makes_complete_schema_valid_calls_when_required(engine, use: ToolUse) -> None:
    events = first_call(engine, use, think_budget=0, max_tokens=48)
    assert events is not None, "no seed produced a complete call"
    assert not of(events, AnswerText)  # the answer IS the calls
    calls = events[-1].tool_calls
    assert all(c.name == (use.name or c.name) for c in calls) and (use.parallel or len(calls) == 1)


def test_the_engine_never_calls_with_tool_choice_none(engine) -> None:
    for seed in range(3):
        events = list(engine.submit(prompt(engine), Limits(seed=seed, think_budget=0, max_tokens=48)))
        assert not of(events, CallStart) and events[-1].tool_calls == ()


def test_auto_constrains_the_arguments_once_the_model_opens_a_call(engine, monkeypatch) -> None:
    """The random model never chooses [TOOL_CALLS] itself, so its first answer token is replaced
    by one, as if sampled: from there the real grammar must produce a valid call of a known tool."""
    original = Turn.token

    def token(self: Turn, t: int) -> bool:
        if self.tooling is not None and not self.tooling.started and self.wd.phase.name == "ANSWER":
            t = tk.TOOL_CALLS
        return original(self, t)

    monkeypatch.setattr(Turn, "token", token)
    assert first_call(engine, ToolUse(ENGINE_TOOLS, parallel=False), think_budget=0, max_tokens=48) is not None


def test_a_required_call_may_follow_a_thought(engine) -> None:
    use = ToolUse(ENGINE_TOOLS, choice="required", parallel=False)
    for seed in range(8):
        events = list(engine.submit(prompt(engine), Limits(tools=use, seed=seed, think_budget=16, max_tokens=400)))
        check_calls(events)
        if of(events, ThinkingText) and events[-1].finish_reason == "tool_calls":
            return  # the thought opened first (the grammar's alternative start) and the call followed
    pytest.fail("no seed thought before calling")


def test_arguments_the_grammar_cannot_bound_are_checked_and_never_reported_as_a_call() -> None:
    days = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}}
    turn, v = turn_with(ToolUse((("forecast", days),)), think_budget=0)
    done = run(turn, v.ids(tk.TOOL_CALLS, "forecast", tk.ARGS, '{"days": -6}', tk.EOS))[-1]
    assert done.tool_calls == () and done.stop_reason == "tool_error"
    assert "days" in done.tool_error and "minimum" in done.tool_error
    turn, v = turn_with(ToolUse((("forecast", days),)), think_budget=0)
    assert run(turn, v.ids(tk.TOOL_CALLS, "forecast", tk.ARGS, '{"days": 6}', tk.EOS))[-1].finish_reason == "tool_calls"
