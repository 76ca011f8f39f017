"""The [THINK] watchdog driven by scripted token streams (the runtime rules that a pure
state machine can own: budget forcing, loops, EOS in thinking, a second [THINK], runaway answers,
max_tokens clipping, multi-byte characters, greedy sampling, deadlines).

Natural text comes from the real Tekken tokenizer (mistral-common's vocabulary with Magistral's
control tokens) over the repository's corpus and Python's own docstrings and sources.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
from pathlib import Path

import pytest

from edge_magistral.errors import BadInputError
from edge_magistral.tekken import END_THINK, EOS, THINK
from edge_magistral.watchdog import (
    MIN_THINKING_TEMPERATURE,
    WRAP_UP_TEXT,
    Action,
    Decision,
    NgramNovelty,
    PeriodicTail,
    Phase,
    Reason,
    Watchdog,
    WatchdogConfig,
    check_sampling,
    ends_sentence,
    grace_tokens,
    per_token_cost_us,
    resolve_think_budget,
)

CORPUS_DIR = Path(__file__).parent / "data" / "corpus"
DOC_MODULES = ("argparse", "collections", "json", "textwrap", "unittest", "pydoc", "logging",
               "asyncio", "pathlib", "random", "statistics", "decimal", "fractions", "difflib", "functools",
               "itertools", "calendar", "datetime", "csv", "configparser", "zipfile", "shutil", "subprocess",
               "threading", "inspect", "dataclasses", "enum", "contextlib")
CODE_MODULES = ("json.decoder", "textwrap", "statistics", "calendar", "heapq", "string", "colorsys")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def varied(n: int, start: int = 1000) -> list[int]:
    """n distinct ordinary token ids: never a loop."""
    return list(range(start, start + n))


def thinking(config: WatchdogConfig, clock: FakeClock | None = None) -> Watchdog:
    """A started watchdog that has seen [THINK]."""
    wd = Watchdog(config, clock=clock or FakeClock())
    assert wd.start().action is Action.CONTINUE
    assert wd.feed(THINK).action is Action.CONTINUE
    assert wd.phase is Phase.THINKING
    return wd


def feed_until_action(wd: Watchdog, tokens: list[int], text: str = " word") -> tuple[int, Decision]:
    """Feed tokens until a decision other than a plain CONTINUE; (index, decision)."""
    for i, token in enumerate(tokens):
        d = wd.feed(token, text)
        if d.action is not Action.CONTINUE or d.drop:
            return i, d
    raise AssertionError(f"no action after {len(tokens)} tokens")


def feed_all(wd: Watchdog, tokens: list[int]) -> None:
    """Feed tokens that must all pass untouched."""
    for i, token in enumerate(tokens):
        d = wd.feed(token, "x")
        assert d.action is Action.CONTINUE and not d.drop, (i, d, wd.events)


@pytest.fixture(scope="module")
def tekken(tmp_path_factory: pytest.TempPathFactory):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from edge_magistral.tekken import write_magistral_tekken

    path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    write_magistral_tekken(path)
    return Tekkenizer.from_file(str(path))


def encode(tekken, text: str) -> list[int]:
    return tekken.encode(text, bos=False, eos=False)


@pytest.fixture(scope="module")
def natural_prose(tekken) -> list[int]:
    """~45k tokens of real prose: the multilingual corpus and the stdlib's (distinct) docstrings.

    The corpus's whitespace category is left out: its 1000- and 5000-space runs are tokenizer
    stress tests, and in generated text they are exactly what a period-1 loop looks like.
    """
    texts: list[str] = []
    for f in sorted(CORPUS_DIR.glob("*.jsonl")):
        if f.stem == "whitespace":
            continue
        texts += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line]
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__:
                doc = inspect.getdoc(obj)
                if doc and doc not in texts:
                    texts.append(doc)
    return encode(tekken, "\n\n".join(texts))


@pytest.fixture(scope="module")
def natural_code(tekken) -> list[int]:
    """Real Python source (repetitive in the way code is)."""
    return encode(tekken, "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES))


def paraphrase_loop(tekken, n_tokens: int, seed: int = 0) -> list[int]:
    """A reasoning model going round in circles: the same doubt, reworded at random each time."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        sentence = (" " + rng.choice(["Wait", "Hmm", "Actually", "But wait"]) + ", "
                    + rng.choice(["let me", "I should", "maybe I should"])
                    + rng.choice([" check", " verify", " re-check", " double-check"])
                    + rng.choice([" the calculation", " this again", " the problem statement", " my answer"])
                    + rng.choice([".", " again."]))
        ids += encode(tekken, sentence)
    return ids


# ------------------------------------------------------------------ 16: runaway thinking


def test_runaway_thought_is_closed_at_budget_plus_grace_and_an_answer_follows():
    cfg = WatchdogConfig(think_budget=100, grace_fraction=0.1, max_tokens=4096)
    wd = thinking(cfg)
    i, d = feed_until_action(wd, varied(1000), text=" word")  # no sentence end anywhere
    assert i + 1 == 100 + 10  # budget + grace
    assert d.action is Action.FORCE_CLOSE and d.reason is Reason.THINK_BUDGET and not d.drop
    assert d.inject == (WRAP_UP_TEXT, END_THINK)
    assert {THINK, END_THINK, EOS} <= d.banned
    wd.injected(21)  # the engine tokenized the wrap-up (20 tokens) and fed [/THINK]
    assert wd.phase is Phase.ANSWER
    feed_all(wd, varied(20, start=5000))
    d = wd.feed(EOS)
    assert d.action is Action.STOP and d.reason is Reason.EOS
    u = wd.usage()
    assert u.reasoning_truncated and u.close_reason is Reason.THINK_BUDGET
    assert u.finish_reason == "stop"  # the answer ended naturally although the thought was cut
    assert u.answer_tokens == 20
    assert u.reasoning_tokens == 1 + 110 + 21
    assert u.completion_tokens == u.reasoning_tokens + u.answer_tokens
    assert [(e.action, e.reason) for e in u.events] == [("force_close", Reason.THINK_BUDGET)]
    assert u.events[0].reasoning_tokens == 111 and "grace 10" in u.events[0].detail


@pytest.mark.parametrize("piece", [".", " end.\n", "?\"", "!", "\n\n", "。", " done.)", ":\n"])
def test_close_waits_for_a_sentence_end_within_the_grace_window(piece: str):
    wd = thinking(WatchdogConfig(think_budget=200, grace_fraction=0.1))  # grace 20
    feed_all(wd, varied(204))  # budget reached 4 tokens ago, no sentence end yet
    d = wd.feed(9999, piece)
    assert d.action is Action.FORCE_CLOSE and d.reason is Reason.THINK_BUDGET
    assert wd.counts.think == 205


@pytest.mark.parametrize("piece", [" word", ",", " e", "3", " (", "**", ""])
def test_pieces_that_do_not_end_a_sentence(piece: str):
    assert not ends_sentence(piece)


def test_a_sentence_end_before_the_budget_does_not_close():
    wd = thinking(WatchdogConfig(think_budget=50))
    for token in varied(49):
        assert wd.feed(token, "Done.\n").action is Action.CONTINUE
    assert wd.feed(2000, ".").action is Action.FORCE_CLOSE  # the 50th: at the budget, at an end


def test_grace_is_capped():
    cfg = WatchdogConfig(think_budget=20000, grace_fraction=0.1, grace_max=256, max_tokens=40960)
    assert grace_tokens(20000, cfg) == 256
    wd = thinking(cfg)
    i, d = feed_until_action(wd, varied(30000))
    assert i + 1 == 20256 and d.reason is Reason.THINK_BUDGET


# ---------------------------------------------------------------------- 22: multi-byte


def test_never_forces_inside_a_multibyte_character():
    wd = thinking(WatchdogConfig(think_budget=64, grace_fraction=0.0))
    feed_all(wd, varied(63))
    # the 64th..66th tokens are bytes of one pending character: the decoder has no text yet
    for token in (3000, 3001, 3002):
        d = wd.feed(token, "", complete=False)
        assert d.action is Action.CONTINUE
    d = wd.feed(3003, "😀", complete=True)
    assert d.action is Action.FORCE_CLOSE and wd.counts.think == 67


def test_a_sentence_end_followed_by_pending_bytes_is_no_place_to_close():
    wd = thinking(WatchdogConfig(think_budget=64, grace_fraction=0.5))
    feed_all(wd, varied(64))
    assert wd.feed(3000, ".", complete=False).action is Action.CONTINUE  # ". " + first byte of "é"
    assert wd.feed(3001, "é.", complete=True).action is Action.FORCE_CLOSE


def test_a_loop_close_also_waits_for_a_whole_character():
    wd = thinking(WatchdogConfig(think_budget=10000))
    pattern = [4000, 4001]
    decisions = [wd.feed(t, "", complete=False) for t in pattern * 40]  # all mid-character
    assert all(d.action is Action.CONTINUE for d in decisions)
    assert wd.feed(4000, "ä", complete=True).reason is Reason.LOOP


# -------------------------------------------------------------------------- 17: loops


@pytest.mark.parametrize("period", range(1, 65))
def test_verbatim_loop_of_any_period_up_to_64_closes_the_thought_early(period: int):
    cfg = WatchdogConfig(think_budget=10000)
    wd = thinking(cfg)
    feed_all(wd, varied(300, start=20000))  # a normal start
    pattern = varied(period, start=50000 + 100 * period)
    i, d = feed_until_action(wd, pattern * 400)
    repeats = max(cfg.loop_min_repeats, math.ceil(cfg.loop_min_span / period))
    assert (d.action, d.reason) == (Action.FORCE_CLOSE, Reason.LOOP)
    assert i + 1 == repeats * period  # exactly when the required repeats are complete
    assert d.inject == (WRAP_UP_TEXT, END_THINK)
    assert f"period {period} " in wd.events[-1].detail
    assert wd.usage().reasoning_truncated


def test_short_repetitions_are_not_loops():
    wd = thinking(WatchdogConfig(think_budget=10000))
    feed_all(wd, [5000, 5000])  # "the the"
    feed_all(wd, varied(100))
    feed_all(wd, [6000 + k for k in range(8)] * 3)  # a phrase said three times
    feed_all(wd, varied(100, start=7000))
    feed_all(wd, [8000] * 40)  # a run of 40 dashes, below the 48-token span
    feed_all(wd, varied(100, start=9000))


def test_paraphrase_loop_in_thinking_is_closed_by_the_novelty_measure(tekken):
    wd = thinking(WatchdogConfig(think_budget=10000))
    i, d = feed_until_action(wd, paraphrase_loop(tekken, 3000))
    assert (d.action, d.reason) == (Action.FORCE_CLOSE, Reason.LOOP)
    assert "novelty" in wd.events[-1].detail
    assert i < 1000  # within two windows of 512, far before the budget


def test_loop_detection_restarts_in_the_answer():
    """An answer that repeats the end of the thought verbatim is not a loop."""
    wd = thinking(WatchdogConfig(think_budget=10000))
    draft = varied(40, start=30000)
    feed_all(wd, varied(200) + draft + draft)
    assert wd.feed(END_THINK).action is Action.CONTINUE
    feed_all(wd, draft)  # a third copy right after [/THINK]


# -------------------------------------------------------------- no false positives


def test_no_intervention_on_natural_text_in_thinking_or_answer(natural_prose, natural_code):
    for stream in (natural_prose, natural_code):
        assert len(stream) > 10000
        big = WatchdogConfig(think_budget=len(stream) + 1, max_tokens=3 * len(stream) + 1024)
        wd = thinking(big)
        feed_all(wd, stream)
        wd.feed(END_THINK)
        feed_all(wd, stream)
        assert wd.events == [] and wd.usage().answer_tokens == len(stream)


# ----------------------------------------------------------------- 18: EOS in thinking


def test_eos_inside_thinking_is_replaced_by_the_close_and_an_answer_is_required():
    wd = thinking(WatchdogConfig(think_budget=1000, min_answer_tokens=1))
    feed_all(wd, varied(20))
    d = wd.feed(EOS)
    assert (d.action, d.reason, d.drop) == (Action.FORCE_CLOSE, Reason.EOS_IN_THINKING, True)
    assert d.inject == (END_THINK,)  # the model had finished: no "limited time" sentence
    assert EOS in d.banned
    wd.injected(1)
    # an engine that ignores the ban: EOS right after the close is dropped, not an end
    d = wd.feed(EOS)
    assert d.action is Action.CONTINUE and d.drop and d.reason is Reason.EOS_BEFORE_ANSWER
    assert wd.feed(1010, "\n\n").banned == d.banned  # blank text is not an answer yet
    d = wd.feed(1011, " Yes")
    assert EOS not in d.banned and THINK in d.banned
    d = wd.feed(EOS)
    assert d.action is Action.STOP and d.reason is Reason.EOS
    u = wd.usage()
    assert u.answer_tokens == 2 and not u.reasoning_truncated and u.close_reason is Reason.EOS_IN_THINKING
    assert u.reasoning_tokens == 1 + 20 + 1


def test_eos_ban_lasts_for_the_configured_number_of_answer_tokens():
    wd = thinking(WatchdogConfig(think_budget=1000, min_answer_tokens=2))
    wd.feed(END_THINK)
    assert EOS in wd.feed(1000, " A").banned
    assert EOS not in wd.feed(1001, " B").banned


def test_eos_as_the_very_first_token_is_dropped_and_an_answer_required():
    wd = Watchdog(WatchdogConfig(), clock=FakeClock())
    wd.start()
    d = wd.feed(EOS)
    assert d.drop and wd.phase is Phase.ANSWER and {EOS, THINK} <= d.banned


# --------------------------------------------------------- 19: a second [THINK]


def test_think_is_banned_after_the_close_and_dropped_if_sampled_anyway():
    cfg = WatchdogConfig(think_budget=1000, max_violations=3)
    wd = thinking(cfg)
    feed_all(wd, varied(10))
    d = wd.feed(END_THINK)
    assert THINK in d.banned and END_THINK in d.banned
    feed_all(wd, [1500])
    before = wd.usage()
    for reason in (Reason.THINK_AFTER_CLOSE, Reason.END_THINK_IN_ANSWER):
        d = wd.feed(THINK if reason is Reason.THINK_AFTER_CLOSE else END_THINK)
        assert (d.action, d.reason, d.drop) == (Action.CONTINUE, reason, True)
    assert wd.usage().completion_tokens == before.completion_tokens  # dropped tokens are not output
    assert wd.phase is Phase.ANSWER
    d = wd.feed(THINK)  # the third violation ends the turn
    assert (d.action, d.reason) == (Action.STOP, Reason.VIOLATIONS)


def test_nested_think_inside_the_thought_is_dropped():
    wd = thinking(WatchdogConfig(think_budget=1000))
    d = wd.feed(THINK)
    assert d.drop and d.reason is Reason.NESTED_THINK and wd.phase is Phase.THINKING


def test_answer_without_thinking_is_accepted_and_think_banned_after():
    wd = Watchdog(WatchdogConfig(), clock=FakeClock())
    wd.start()
    d = wd.feed(1000, "Paris")
    assert d.action is Action.CONTINUE and wd.phase is Phase.ANSWER and THINK in d.banned
    assert wd.feed(THINK).drop
    assert wd.usage().reasoning_tokens == 0 and wd.usage().answer_tokens == 1


# --------------------------------------------------------- 20: loops and runaways in the answer


def test_verbatim_loop_in_the_answer_stops_with_reason():
    wd = thinking(WatchdogConfig(think_budget=1000))
    wd.feed(END_THINK)
    feed_all(wd, varied(50))
    _, d = feed_until_action(wd, [7000, 7001, 7002, 7003, 7004] * 100)
    assert (d.action, d.reason) == (Action.STOP, Reason.LOOP)
    u = wd.usage()
    assert u.finish_reason == "length" and u.stop_reason is Reason.LOOP
    assert wd.feed(1234).action is Action.STOP  # stopped stays stopped
    assert wd.usage().answer_tokens == u.answer_tokens


def test_paraphrase_loop_in_the_answer_stops(tekken):
    wd = thinking(WatchdogConfig(think_budget=1000))
    wd.feed(END_THINK)
    rng = random.Random(1)
    sentences = [" The answer is 42.", " So the result is 42.", " Therefore, 42 is the answer.",
                 " Hence the answer: 42.", " Thus we get 42."]
    stream: list[int] = []
    while len(stream) < 3000:
        stream += encode(tekken, rng.choice(sentences))
    _, d = feed_until_action(wd, stream)
    assert (d.action, d.reason) == (Action.STOP, Reason.LOOP)


def test_runaway_answer_stops_at_the_answer_budget():
    wd = thinking(WatchdogConfig(think_budget=1000, answer_budget=300))
    feed_all(wd, varied(10))
    wd.feed(END_THINK)
    i, d = feed_until_action(wd, varied(5000, start=9000))
    assert i + 1 == 300 and (d.action, d.reason) == (Action.STOP, Reason.ANSWER_BUDGET)
    assert wd.usage().finish_reason == "length"


def test_max_tokens_counts_thought_wrap_up_and_answer():
    cfg = WatchdogConfig(think_budget=100, grace_fraction=0.0, max_tokens=500)
    wd = thinking(cfg)
    _, d = feed_until_action(wd, varied(1000))
    assert d.reason is Reason.THINK_BUDGET
    wd.injected(20)
    i, d = feed_until_action(wd, varied(1000, start=9000))
    assert (d.action, d.reason) == (Action.STOP, Reason.MAX_TOKENS)
    u = wd.usage()
    assert u.completion_tokens == 500 and u.answer_tokens == 500 - 1 - 100 - 20 == i + 1


# ----------------------------------------------------------------- 21: max_tokens too small


def test_the_answer_keeps_room_even_without_an_answer_reserve():
    cfg = WatchdogConfig(think_budget=None, grace_fraction=0.0, answer_reserve=0, max_tokens=300)
    wd = thinking(cfg)
    _, d = feed_until_action(wd, varied(1000))
    assert (d.action, d.reason) == (Action.FORCE_CLOSE, Reason.MAX_TOKENS)
    wd.injected(cfg.wrap_up_reserve)  # a wrap-up as long as its reserve
    d = wd.feed(9000, " Yes")
    assert (d.action, d.reason) == (Action.STOP, Reason.MAX_TOKENS)
    assert wd.usage().answer_tokens == cfg.min_answer_tokens == 1


def test_budget_is_clipped_to_fit_max_tokens_and_reported():
    cfg = WatchdogConfig(think_budget=8192, grace_fraction=0.1, max_tokens=2000)
    budget, clipped = resolve_think_budget(cfg)
    room = 2000 - 1 - cfg.wrap_up_reserve - cfg.answer_reserve
    assert clipped and budget + grace_tokens(budget, cfg) <= room < budget + 1 + grace_tokens(budget + 1, cfg)
    wd = thinking(cfg)
    assert wd.think_budget == budget and wd.usage().requested_think_budget == 8192
    assert [(e.action, e.reason) for e in wd.events] == [("clip", Reason.BUDGET_CLIPPED)]
    i, d = feed_until_action(wd, varied(5000))
    assert d.reason is Reason.THINK_BUDGET and i + 1 == budget + grace_tokens(budget, cfg)
    assert 2000 - wd.counts.total >= cfg.wrap_up_reserve + cfg.answer_reserve


def test_budget_that_fits_is_not_clipped():
    budget, clipped = resolve_think_budget(WatchdogConfig(think_budget=32768, max_tokens=40960))
    assert (budget, clipped) == (32768, False)


def test_unlimited_budget_takes_what_max_tokens_leaves():
    cfg = WatchdogConfig(think_budget=None, max_tokens=40960)
    budget, clipped = resolve_think_budget(cfg)
    assert not clipped
    assert budget + grace_tokens(budget, cfg) + 1 + cfg.wrap_up_reserve + cfg.answer_reserve == 40960


def test_max_tokens_too_small_to_think_at_all_is_bad_input():
    with pytest.raises(BadInputError, match="think_budget=0"):
        Watchdog(WatchdogConfig(think_budget=4096, max_tokens=200))
    assert Watchdog(WatchdogConfig(think_budget=0, max_tokens=1)).think_budget == 0


@pytest.mark.parametrize("bad", [dict(think_budget=-1), dict(max_tokens=0), dict(grace_fraction=1.5),
                                 dict(deadline_s=0), dict(loop_min_repeats=1), dict(novelty_min_answer=2.0),
                                 dict(eos_id=THINK)])
def test_invalid_settings_are_bad_input(bad: dict):
    with pytest.raises(BadInputError, match="invalid watchdog setting"):
        WatchdogConfig(**bad)


# ------------------------------------------------------------------ think_budget = 0


def test_think_budget_zero_closes_the_thought_before_it_opens():
    wd = Watchdog(WatchdogConfig(think_budget=0), clock=FakeClock())
    d = wd.start()
    assert (d.action, d.reason) == (Action.FORCE_CLOSE, Reason.NO_THINKING)
    assert d.inject == (THINK, END_THINK)  # appended to the prompt: an empty thought
    assert {THINK, END_THINK, EOS} <= d.banned and wd.phase is Phase.ANSWER
    feed_all(wd, [1000])
    assert wd.feed(THINK).drop
    assert wd.feed(EOS).reason is Reason.EOS
    u = wd.usage()
    assert (u.reasoning_tokens, u.answer_tokens, u.reasoning_truncated) == (0, 1, False)


# ------------------------------------------------------------------ 24: greedy


def test_greedy_in_thinking_mode_is_clamped():
    t, why = check_sampling(0.0, thinking=True)
    assert t == MIN_THINKING_TEMPERATURE and "greedy" in why
    assert check_sampling(0.2, thinking=True)[0] == MIN_THINKING_TEMPERATURE
    assert check_sampling(0.7, thinking=True) == (0.7, None)
    assert check_sampling(0.0, thinking=False) == (0.0, None)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(BadInputError):
            check_sampling(bad, thinking=True)


# ------------------------------------------------------------------ deadlines


def test_ttft_deadline_is_checked_before_the_first_token():
    clock = FakeClock()
    wd = Watchdog(WatchdogConfig(ttft_deadline_s=5.0), clock=clock)
    wd.start()
    clock.t += 4.9
    assert wd.poll().action is Action.CONTINUE
    clock.t += 0.2
    d = wd.poll()
    assert (d.action, d.reason) == (Action.STOP, Reason.TTFT_DEADLINE)
    assert wd.feed(THINK) is d and wd.usage().finish_reason == "length"


def test_ttft_deadline_does_not_apply_after_the_first_token():
    clock = FakeClock()
    wd = Watchdog(WatchdogConfig(ttft_deadline_s=5.0), clock=clock)
    wd.start()
    clock.t += 1
    wd.feed(THINK)
    clock.t += 60
    assert wd.poll().action is Action.CONTINUE and wd.feed(1000).action is Action.CONTINUE


def test_a_late_first_token_is_still_a_missed_ttft_deadline():
    clock = FakeClock()
    wd = Watchdog(WatchdogConfig(ttft_deadline_s=5.0, think_budget=0), clock=clock)
    wd.start()
    clock.t += 7
    assert wd.feed(1000).reason is Reason.TTFT_DEADLINE


def test_deadline_closes_the_thought_early_then_stops_the_answer():
    clock = FakeClock()
    wd = thinking(WatchdogConfig(think_budget=100000, max_tokens=200000, deadline_s=100.0,
                                 think_deadline_fraction=0.75), clock)
    for token in varied(74):
        clock.t += 1.0
        assert wd.feed(token, " w").action is Action.CONTINUE
    clock.t += 1.0  # 75 s: the thought should end at the next sentence end
    assert wd.feed(2000, " w").action is Action.CONTINUE
    clock.t += 1.0
    d = wd.feed(2001, ".")
    assert (d.action, d.reason) == (Action.FORCE_CLOSE, Reason.DEADLINE)
    wd.injected(20)
    for token in varied(23, start=9000):
        clock.t += 1.0
        assert wd.feed(token, " a").action is Action.CONTINUE
    clock.t += 1.0  # 100 s
    d = wd.feed(9999, " a")
    assert (d.action, d.reason) == (Action.STOP, Reason.DEADLINE)
    assert [e.reason for e in wd.events] == [Reason.DEADLINE, Reason.DEADLINE]
    assert wd.events[1].elapsed_s == pytest.approx(100.0)


def test_deadline_inside_the_thought_without_time_to_close_stops():
    clock = FakeClock()
    wd = thinking(WatchdogConfig(deadline_s=10.0, think_deadline_fraction=1.0), clock)
    clock.t += 10.0
    d = wd.poll()
    assert (d.action, d.reason) == (Action.STOP, Reason.DEADLINE)
    u = wd.usage()
    assert u.reasoning_truncated and u.finish_reason == "length" and u.close_reason is None


# ------------------------------------------------------------ the detectors against brute force


def brute_period(tokens: list[int], max_period: int, min_repeats: int, min_span: int) -> int:
    """The smallest period whose required repeats are all at the tail, by direct comparison."""
    for p in range(1, max_period + 1):
        k = max(min_repeats, math.ceil(min_span / p)) * p
        tail = tokens[-k:]
        if len(tail) == k and all(tail[i] == tail[i - p] for i in range(p, k)):
            return p
    return 0


def test_periodic_tail_matches_brute_force_on_random_streams():
    rng = random.Random(7)
    for alphabet in (2, 3, 5):
        detector, tokens = PeriodicTail(12, 3, 8), []
        hits = 0
        for _ in range(3000):
            if rng.random() < 0.3 and len(tokens) > 10:  # paste a repeat to create periodic tails
                tokens_to_add = tokens[-rng.randint(1, 10):]
            else:
                tokens_to_add = [rng.randrange(alphabet)]
            for t in tokens_to_add:
                tokens.append(t)
                got = detector.push(t)
                assert got == brute_period(tokens, 12, 3, 8), len(tokens)
                hits += bool(got)
        assert hits > 50  # the comparison covered detections, not only misses


def test_ngram_novelty_matches_brute_force():
    rng = random.Random(3)
    n, window = 3, 40
    novelty, tokens = NgramNovelty(n, window, 0.5), []
    for _ in range(2000):
        tokens.append(rng.randrange(4))
        low = novelty.push(tokens[-1])
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)][-window:]
        assert novelty.distinct == len(set(grams))
        assert low == (len(grams) == window and len(set(grams)) < math.ceil(0.5 * window))


# ------------------------------------------------------------------ cost per token


def test_wrap_up_fits_its_reserve(tekken):
    assert len(encode(tekken, WRAP_UP_TEXT)) + 1 <= WatchdogConfig().wrap_up_reserve


def test_cost_per_token_is_small_and_flat(natural_prose):
    stream = (natural_prose * 3)[:100_000]
    small = min(per_token_cost_us(stream[:10_000]) for _ in range(3))
    large = per_token_cost_us(stream)
    print(f"\nwatchdog cost: {small:.2f} us/token over 10k tokens, {large:.2f} us/token over 100k tokens")
    assert large < 3 * small + 1.0
    assert large < 50  # a generous ceiling (measured ~2 us on a desktop CPU)
