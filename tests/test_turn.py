"""The per-token lifecycle of one turn (``edge_magistral.turn.Turn``) on scripted token ids, with a
fake model: no llama.cpp, so what the engine's every path shares is pinned down exactly, and fast.

The fake model's ordinary tokens are ids >= 1000 whose piece is ``w<id> ``; the special ids are
Magistral's ([THINK] 34, [/THINK] 35, </s> 2)."""

from __future__ import annotations

import random

import pytest

from edge_magistral import tekken as tk
from edge_magistral.errors import BadInputError, PromptTooLongError
from edge_magistral.generation import AnswerText, Done, Limits, ThinkingText, WatchdogAction
from edge_magistral.turn import Turn
from edge_magistral.watchdog import WRAP_UP_TEXT, WatchdogConfig


class FakeModel:
    """What a Turn asks of a loaded model, for Magistral-like ids."""

    n_ctx = 4096
    eos_id = tk.EOS
    load_s = 0.0
    think_budget = 2048

    def thinks(self, limits: Limits) -> bool:
        return not limits.raw

    def watchdog_config(self, limits: Limits, max_tokens: int) -> WatchdogConfig:
        budget = self.think_budget if limits.think_budget is None else limits.think_budget
        return WatchdogConfig(think_budget=budget if self.thinks(limits) else 0, max_tokens=max_tokens)

    def piece(self, token: int) -> bytes:
        return f"w{token} ".encode() if token >= 1000 else b""

    def sampler(self, limits: Limits, temperature: float, banned: frozenset[int], grammar: str | None,
                root: str = "root"):
        return banned  # what the native chain would ban: enough to check the turn's choice

    def free_sampler(self, chain) -> None:
        pass

    def encode_text(self, text: str) -> list[int]:
        return [900_000 + len(text)]  # one id per text (the wrap-up, when the thought is forced closed)


def words(n: int, seed: int = 0) -> list[int]:
    """Varied ordinary ids (no loop for the detectors to find)."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 100_000) for _ in range(n)]


def thinking_turn(limits: Limits) -> Turn:
    turn = Turn(FakeModel(), [tk.BOS, tk.INST, 1000, tk.END_INST], limits)
    turn.prefill()
    assert turn.token(tk.THINK)
    turn.events.clear()
    return turn


def test_a_quiet_token_costs_one_event_and_no_watchdog_snapshot(monkeypatch) -> None:
    turn = thinking_turn(Limits(think_budget=4096, max_tokens=8192, seed=1))

    def no_snapshot():
        raise AssertionError("a usage snapshot was taken for a token where nothing happened")

    monkeypatch.setattr(turn.wd, "usage", no_snapshot)
    feed = None
    for t in words(300):
        assert turn.token(t)
        assert list(turn.feed) == [t]
        assert feed is None or turn.feed is feed  # the feed list is reused, not rebuilt
        feed = turn.feed
        assert turn.events == [ThinkingText(f"w{t} ")]
        turn.events.clear()


def test_the_budget_closes_the_thought_with_the_wrap_up_then_the_answer_ends_at_eos() -> None:
    turn = thinking_turn(Limits(think_budget=64, max_tokens=1024, seed=1))
    closed_at = None
    for i, t in enumerate(words(200)):
        assert turn.token(t)
        if len(turn.feed) > 1:
            closed_at = i
            break
    assert closed_at is not None and 64 <= closed_at + 1 <= 64 + 6  # the budget plus its grace window
    assert turn.feed[0] == t and turn.feed[-1] == tk.END_THINK  # the token, the wrap-up, [/THINK]
    assert any(isinstance(e, WatchdogAction) and e.action == "force_close" for e in turn.events)
    assert ThinkingText(WRAP_UP_TEXT) in turn.events
    turn.events.clear()
    assert turn.token(4242)
    assert turn.events == [AnswerText("w4242 ")]
    assert not turn.token(tk.EOS)  # the answer may end now
    turn.end()
    done = turn.events[-1]
    assert isinstance(done, Done) and done is turn.done
    assert done.finish_reason == "stop" and done.stop_reason == "eos" and done.reasoning_truncated
    assert done.usage.answer_tokens == 1 and done.usage.reasoning_tokens > 64  # </s> ends it, uncounted


def test_a_stop_string_ends_the_answer_and_keeps_the_text_before_it() -> None:
    turn = Turn(FakeModel(), [tk.BOS, tk.INST, 1000, tk.END_INST], Limits(think_budget=0, stop=("w2002",)))
    prompt = turn.prefill()
    assert prompt[-2:] == [tk.THINK, tk.END_THINK]  # think budget 0: closed in the prompt
    turn.events.clear()
    assert turn.token(2001)
    assert not turn.token(2002)
    assert not turn.feed  # nothing more to evaluate
    turn.end()
    text = "".join(e.text for e in turn.events if isinstance(e, AnswerText))
    assert text == "w2001 "
    assert turn.done.finish_reason == "stop" and turn.done.stop_reason == "stop_string"


def test_a_banned_token_is_dropped_and_sampled_again() -> None:
    turn = Turn(FakeModel(), [tk.BOS, 1000], Limits(think_budget=0))
    turn.prefill()
    assert turn.token(3001)  # the answer has begun: [THINK] is banned from now on
    assert tk.THINK in turn.decision.banned
    turn.events.clear()
    assert turn.token(tk.THINK)  # an engine that did not apply the ban sampled it anyway
    assert not turn.feed  # not evaluated: the engine samples again from the same logits
    assert [e.action for e in turn.events if isinstance(e, WatchdogAction)] == ["drop"]


def test_the_engine_ends_a_turn_with_its_own_reason() -> None:
    turn = thinking_turn(Limits(think_budget=512, max_tokens=1024))
    turn.token(5000)
    turn.end("cancelled")
    assert turn.done.finish_reason == "cancelled" and turn.done.stop_reason == "cancelled"
    turn = thinking_turn(Limits(think_budget=512, max_tokens=1024))
    turn.end("context_full")
    assert turn.done.finish_reason == "length" and turn.done.stop_reason == "context_full"


def test_bad_requests_are_refused_when_the_turn_is_made() -> None:
    with pytest.raises(PromptTooLongError, match="4096 tokens but the context holds 4096: 1 too many"):
        Turn(FakeModel(), [1000] * 4096, Limits())
    with pytest.raises(BadInputError, match="max_tokens must be at least 1"):
        Turn(FakeModel(), [1000], Limits(max_tokens=0))


def test_a_chat_turn_never_samples_a_tool_call() -> None:
    """No request offers tools yet: [TOOL_CALLS] is banned in a Magistral chat turn, thinking or
    answering (inside [THINK] a call is never allowed), and left alone in a raw completion."""
    turn = thinking_turn(Limits(think_budget=512, max_tokens=1024))
    assert tk.TOOL_CALLS in turn.sampler()
    turn.token(5000)
    assert turn.token(tk.END_THINK)
    assert tk.TOOL_CALLS in turn.sampler()  # in the answer too
    raw = Turn(FakeModel(), [tk.BOS, 1000], Limits(raw=True))
    raw.prefill()
    assert tk.TOOL_CALLS not in raw.sampler()
