"""Speculative decoding: the n-gram guesses, the choice of k, and the engine's verification.

The engine tests fix the verify cost at 0 so every proposal is verified at full length (the
real engine measures the cost and may decline): speculation must then change nothing in what a
turn produces, greedy or seeded, through the watchdog's forced close, stop strings, a JSON
schema and tool calls; only the counters say it ran.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from edge_magistral.chat import Message
from edge_magistral.generation import Done, Limits, LoadSettings, ToolUse
from edge_magistral.speculate import HOLD_STEPS, NgramDraft, Speculator, VerifyCost, best_k
from edge_magistral.turn import Turn

# ------------------------------------------------------------------------------ units


def test_the_draft_proposes_what_followed_the_latest_longest_match() -> None:
    d = NgramDraft([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    for t in (1, 2, 3):
        d.push(t)
    # "1 2 3" occurred at the start, followed by 4 5 9; "2 3" last occurred before 7 8
    assert d.propose(3) == [4, 5, 9]
    d.push(6)
    assert d.propose(3) == []  # "3 6" never occurred, nor "1 2 3 6"
    short = NgramDraft([5, 6, 5])
    short.push(6)
    assert short.propose(5) == [5, 6, 5, 6, 5]  # a match at the end copies on from itself


def test_best_k_grows_with_acceptance_and_shrinks_with_cost() -> None:
    assert best_k(0.0, 0.0, 8) == 0 and best_k(0.9, 1.0, 8) == 0  # nothing accepted, or a guess costs a step
    assert best_k(0.9, 0.0, 8) == 8 and best_k(0.9, 0.0, 3) == 3  # free guesses: all that are offered
    assert 0 < best_k(0.6, 0.05, 8) < best_k(0.9, 0.05, 8)
    assert best_k(0.5, 0.69, 8) == 0  # this CPU with SmolLM2: guesses at half acceptance do not pay


def test_the_cost_is_measured_from_steps_of_different_sizes() -> None:
    c = VerifyCost(prior=0.1)
    assert c.relative == 0.1
    c.observe(1, 0.010, 1)
    c.observe(5, 0.014, 1)  # four guesses cost 4 ms over a 10 ms step
    assert c.relative == pytest.approx(0.1)
    c.observe(2, 0.020, 2)  # two sequences, one token each: 10 ms per sequence still
    assert c.t1 == pytest.approx(0.010)


def test_the_speculator_learns_acceptance_from_verified_and_unverified_guesses() -> None:
    s = Speculator([1, 2, 3, 1, 2, 3, 1, 2], VerifyCost(fixed=0.0))
    guesses = s.next(3, room=8)
    assert guesses == [1, 2, 3, 1, 2, 3, 1, 2]  # as many as asked, at no cost (the repeat copies on)
    s.verified(len(guesses), 8)
    assert s.rate > 0.5
    expensive = Speculator([1, 2, 3, 1, 2, 3, 1, 2], VerifyCost(fixed=5.0))
    assert expensive.next(3, room=8) == []  # not worth verifying, but remembered
    rate = expensive.rate
    expensive.next(9, room=8)  # the guess was 1: a miss
    assert expensive.rate < rate


def test_steady_step_times_skip_each_new_shape_s_first_steps() -> None:
    """A new shape's first steps run eagerly, then capture a CUDA graph: not its steady cost."""
    c = VerifyCost()
    for t in (0.015, 0.014, 0.010, 0.010):  # eager, capture, replayed, replayed
        c.observe(1, t, 1)
    assert c.steady == {1: pytest.approx(0.010)} and c.step_cost(0) == pytest.approx(1.0)
    assert c.step_cost(2) is None
    for t in (0.013, 0.020, 0.012, 0.012):
        c.observe(3, t, 1)
    assert c.step_cost(2) == pytest.approx(1.2)
    c.observe(2, 0.020, 2)  # several sequences: not a width of one
    assert set(c.steady) == {1, 3}


def held(cost: VerifyCost, right: int, steps: int, history=(1, 2, 3, 1, 2, 3)) -> list[int]:
    """Drive a held Speculator for ``steps`` steps, each step's first ``right`` guesses accepted;
    the number of guesses of each step."""
    s = Speculator(list(history), cost, hold=True)
    widths = []
    for i in range(steps):
        g = s.next(4 + i % 3, room=8)
        widths.append(len(g))
        if g:
            s.verified(len(g), min(right, len(g)))
    return widths


def test_a_held_width_starts_plain_then_climbs_while_guesses_pay() -> None:
    cost = VerifyCost()
    for _ in range(4):
        cost.observe(1, 0.010, 1)  # a steady one-token step is known...
    for n in range(2, 10):  # ...and every width costs 2% more per guess (a GPU's replayed graphs)
        for _ in range(4):
            cost.observe(n, 0.010 * (1 + 0.02 * (n - 1)), 1)
    widths = held(cost, right=8, steps=6 * HOLD_STEPS)
    epochs = [widths[i:i + HOLD_STEPS] for i in range(0, len(widths), HOLD_STEPS)]
    assert all(len(set(e)) == 1 for e in epochs)  # one width per epoch: the step's shape holds
    assert [e[0] for e in epochs] == [0, 1, 2, 3, 4, 5]  # the carried width (none yet), then one further each time
    # the next turn goes on at that width for an epoch, while it learns its own acceptance
    assert held(cost, right=8, steps=HOLD_STEPS + 1) == [5] * HOLD_STEPS + [6]
    fresh = held(VerifyCost(), right=8, steps=HOLD_STEPS)
    assert set(fresh) == {0}  # nothing measured: plain steps first, to time a steady one-token step


def test_a_held_width_comes_down_when_guesses_fail_or_cost_too_much() -> None:
    cost = VerifyCost()
    for n, t in ((1, 0.010), (2, 0.0106), (3, 0.0122), (4, 0.0146)):  # the H100's replayed c(k)
        for _ in range(4):
            cost.observe(n, t, 1)
    s = Speculator([1, 2, 3, 1, 2, 3], cost, hold=True)
    s.width = 3  # kept for a first epoch, then one lower each epoch
    for _ in range(4 * HOLD_STEPS):
        g = s.next(9, room=8)  # 9 never occurred before: the padding repeats it
        assert len(g) == s.width and (not g or g == [9] * len(g))
        if g:
            s.verified(len(g), 0)
    assert s.width == 0  # never right: down a width each epoch


# ------------------------------------------------------------------------- the engine

def run(engine, request, limits: Limits) -> tuple[list, Done]:
    events = list(engine.submit(request, limits))
    return events[:-1], events[-1]


def make_engine(path: Path, speculate: str, **kw):
    from edge_magistral.engine import Engine

    e = Engine(LoadSettings(str(path), n_ctx=2048, n_threads=2, speculate=speculate, **kw))
    e.verify_cost = VerifyCost(fixed=0.0)  # verify every proposal at full length
    e.ngram_sizes = (2, 1)  # random weights rarely repeat 2-grams: single tokens give guesses to verify
    return e


@pytest.fixture(scope="module")
def tiny_pair(tiny_gguf_f32: Path):
    on, off = make_engine(tiny_gguf_f32, "ngram", think_budget=48), make_engine(tiny_gguf_f32, "off", think_budget=48)
    yield on, off
    on.close()
    off.close()


REPEAT = [Message("user", "alpha beta gamma delta " * 30)]


def evaluated_ids(engine, request, limits: Limits, monkeypatch) -> list[int]:
    """Every id a plain turn evaluates, in order: the prompt as prefilled, then each feed."""
    seq: list[int] = []
    prefill, token = Turn.prefill, Turn.token

    def logged_prefill(self: Turn) -> list[int]:
        ids = prefill(self)
        seq.extend(ids)
        return ids

    def logged_token(self: Turn, t: int) -> bool:
        going = token(self, t)
        seq.extend(self.feed)
        return going

    with monkeypatch.context() as m:
        m.setattr(Turn, "prefill", logged_prefill)
        m.setattr(Turn, "token", logged_token)
        list(engine.submit(request, limits))
    return seq


def oracle(monkeypatch, reference: list[int]) -> None:
    """Guesses that know the plain turn's future, with every third proposal's second guess wrong:
    long runs are accepted and rejections happen at every depth. Random weights never repeat
    themselves when sampling, so n-gram guesses alone would leave the verification untested."""
    def propose(self: NgramDraft, k: int) -> list[int]:
        at = len(self.tokens)
        out = list(reference[at:at + k])
        if at % 3 == 0 and len(out) > 1:
            out[1] += 1
        return out

    monkeypatch.setattr(NgramDraft, "propose", propose)


# Greedy output must be the same tokens, and so must the sampling chain's at top-k 1 (a thinking
# turn raises temperature 0 to its minimum, so the forced-close case samples). A guess's logits
# come from a batch, which differ from a one-token step's in the last float bits (up to 5e-4 on
# this F32 model on a CPU, as between llama.cpp's own batch sizes): where two candidates tie that
# closely, either path may pick either, as llama.cpp's speculative decoding may. Random weights
# have such near ties every few hundred tokens, so these turns are short; seeded sampling at
# top-k > 1 is held to the same distribution instead (below).
@pytest.mark.parametrize("limits", [
    Limits(temperature=0.0, think_budget=0, max_tokens=200),
    Limits(seed=3, top_k=1, think_budget=40, max_tokens=400, answer_budget=24, force_thinking=True),  # closed mid-draft
    Limits(temperature=0.0, think_budget=0, max_tokens=200, stop=("a",)),
    Limits(temperature=0.0, think_budget=0, max_tokens=120, json_schema={"type": "object", "properties": {
        "xs": {"type": "array", "items": {"enum": ["alpha", "beta"]}}}}),
], ids=["greedy", "forced-close", "stop-string", "json-schema"])
def test_speculation_changes_nothing_a_turn_produces(tiny_pair, limits: Limits, monkeypatch) -> None:
    on, off = tiny_pair
    oracle(monkeypatch, evaluated_ids(off, REPEAT, limits, monkeypatch))
    ev_on, done_on = run(on, REPEAT, limits)
    ev_off, done_off = run(off, REPEAT, limits)
    assert ev_on == ev_off
    t = done_on.timings
    assert 0 < t.accepted_tokens <= t.drafted_tokens  # guesses were verified (a long turn also rejects some)
    assert t.drafted_tokens < 20 or t.accepted_tokens < t.drafted_tokens
    assert (done_on.finish_reason, done_on.stop_reason, done_on.usage) == \
        (done_off.finish_reason, done_off.stop_reason, done_off.usage)
    assert done_off.timings.drafted_tokens == 0


def test_a_held_width_changes_nothing_a_turn_produces(tiny_gguf_f32: Path, tiny_pair, monkeypatch) -> None:
    """Every step verifies the held number of guesses, padded where the oracle has too few."""
    _, off = tiny_pair
    hold = make_engine(tiny_gguf_f32, "ngram", think_budget=48, speculate_hold=True)
    try:
        assert hold.speculate_hold and not off.speculate_hold  # auto is off on a CPU
        for limits in (Limits(temperature=0.0, think_budget=0, max_tokens=200),
                       Limits(seed=3, top_k=1, think_budget=40, max_tokens=400, answer_budget=24,
                              force_thinking=True)):
            oracle(monkeypatch, evaluated_ids(off, REPEAT, limits, monkeypatch))
            ev_on, done_on = run(hold, REPEAT, limits)
            ev_off, done_off = run(off, REPEAT, limits)
            assert ev_on == ev_off and done_on.usage == done_off.usage
            assert 0 < done_on.timings.accepted_tokens < done_on.timings.drafted_tokens
    finally:
        hold.close()


def test_tool_calls_are_the_same_with_speculation(tiny_pair, monkeypatch) -> None:
    on, off = tiny_pair
    unit = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}
    use = ToolUse((("units", unit),), choice="required")
    for seed in range(3):
        limits = Limits(tools=use, seed=seed, top_k=1, think_budget=0, max_tokens=48)
        oracle(monkeypatch, evaluated_ids(off, REPEAT, limits, monkeypatch))
        ev_on, done_on = run(on, REPEAT, limits)
        ev_off, done_off = run(off, REPEAT, limits)
        assert [type(e) for e in ev_on] == [type(e) for e in ev_off]  # call ids are random; the rest is equal
        calls = [[(c.name, c.arguments) for c in d.tool_calls] for d in (done_on, done_off)]
        assert calls[0] == calls[1] and done_on.finish_reason == done_off.finish_reason
        assert done_on.timings.accepted_tokens > 0


def test_sampling_keeps_its_distribution_when_guesses_are_verified(tiny_pair, monkeypatch) -> None:
    """Three tokens sampled at top-k 2 (8 outcomes), 300 seeds each way; the guesses are the
    greedy continuation, accepted about half of the time. A chi-square test of homogeneity at
    p = 0.001 (7 degrees of freedom: 24.32); the seeds are fixed, so the result is too."""
    on, off = tiny_pair
    oracle(monkeypatch, evaluated_ids(off, REPEAT, Limits(temperature=0.0, think_budget=0, max_tokens=8),
                                      monkeypatch))
    counts: list[dict[tuple[str, ...], int]] = [{}, {}]
    for side, engine in enumerate((on, off)):
        for seed in range(300):
            events, _ = run(engine, REPEAT, Limits(seed=seed, top_k=2, think_budget=0, max_tokens=3))
            key = tuple(e.text for e in events if hasattr(e, "text"))
            counts[side][key] = counts[side].get(key, 0) + 1
    cells = set(counts[0]) | set(counts[1])
    chi2 = sum((counts[0].get(c, 0) - counts[1].get(c, 0)) ** 2 / (counts[0].get(c, 0) + counts[1].get(c, 0))
               for c in cells)
    assert len(cells) > 2 and chi2 < 24.32, (chi2, counts)
    assert on.stats.accepted > 0 and on.stats.drafted > on.stats.accepted


def test_several_slots_verify_their_own_guesses_in_one_batch(tiny_gguf_f32: Path, tiny_pair, monkeypatch) -> None:
    _, off = tiny_pair
    requests = [(REPEAT, Limits(temperature=0.0, think_budget=0, max_tokens=n)) for n in (60, 90, 120)]
    oracle(monkeypatch, evaluated_ids(off, *requests[-1], monkeypatch))  # greedy: the others are its prefixes
    many = make_engine(tiny_gguf_f32, "ngram", think_budget=48, n_slots=3)
    try:
        together = [list(s) for s in many.submit_all(requests)]
        alone = [list(off.submit(r, lim)) for r, lim in requests]
        for a, b in zip(together, alone):
            assert a[:-1] == b[:-1]
        assert many.stats.max_active == 3 and many.stats.accepted > 0
    finally:
        many.close()


@pytest.mark.parametrize("device_topk", [False, True], ids=["host-sampling", "device-topk"])
def test_smollm2_greedy_is_identical_with_speculation(smollm2_gguf: Path, device_topk: bool) -> None:
    """Also with the top-k on the device that computes the logits (the default where the output
    layer is on a GPU; forced here on the CPU backend): llama.cpp then needs room for several
    logits rows per sequence, or it refuses the verify step."""
    rng = random.Random(0)
    text = " ".join(rng.choice(["one", "two", "three", "four"]) for _ in range(60))
    messages = [Message("user", f"Repeat exactly: {text}")]
    outs = []
    for mode in ("ngram", "off"):
        e = make_engine(smollm2_gguf, mode, backend_sampling=device_topk)
        try:
            outs.append(run(e, messages, Limits(temperature=0.0, max_tokens=160)))
        finally:
            e.close()
    (ev_on, done_on), (ev_off, _) = outs
    assert ev_on == ev_off and done_on.timings.accepted_tokens > 0


# ---------------------------------------------------------------------------- draft model

@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with other random weights: the same vocabulary, other guesses."""
    from edge_magistral.build.checkpoint import open_checkpoint
    from edge_magistral.build.convert import convert
    from edge_magistral.build.tiny import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("other-tiny")
    return convert(open_checkpoint(make_tiny_checkpoint(d / "ck", seed=1)), d / "other-F32.gguf", "F32")


def draft_engine(target: Path, draft: Path, **kw):
    from edge_magistral.engine import Engine

    e = Engine(LoadSettings(str(target), n_ctx=2048, n_threads=2, think_budget=48, speculate="draft",
                            draft_model=str(draft), **kw))
    e.verify_cost = VerifyCost(fixed=0.0)
    return e


def test_the_model_as_its_own_draft_is_always_right_and_changes_nothing(tiny_gguf_f32: Path, tiny_pair) -> None:
    _, off = tiny_pair
    e = draft_engine(tiny_gguf_f32, tiny_gguf_f32)
    try:
        limits = Limits(temperature=0.0, think_budget=0, max_tokens=120)
        ev_on, done = run(e, REPEAT, limits)
        assert ev_on == run(off, REPEAT, limits)[0]
        t = done.timings
        assert t.drafted_tokens > 50 and t.accepted_tokens == t.drafted_tokens
        plain, done = run(e, REPEAT, replace(limits, speculate=False))  # a request may decode plainly
        assert plain == ev_on and done.timings.drafted_tokens == 0
    finally:
        e.close()


def test_another_draft_is_mostly_wrong_and_changes_nothing(tiny_gguf_f32: Path, other_tiny: Path, tiny_pair) -> None:
    _, off = tiny_pair
    e = draft_engine(tiny_gguf_f32, other_tiny, n_slots=2)
    try:
        requests = [(REPEAT, Limits(temperature=0.0, think_budget=0, max_tokens=n)) for n in (60, 80)]
        together = [list(s) for s in e.submit_all(requests)]
        for got, (r, lim) in zip(together, requests):
            assert got[:-1] == run(off, r, lim)[0]
        drafted = sum(s[-1].timings.drafted_tokens for s in together)
        accepted = sum(s[-1].timings.accepted_tokens for s in together)
        assert drafted > 0 and accepted < drafted / 4
    finally:
        e.close()


def test_a_draft_with_another_vocabulary_is_refused(tiny_gguf_f32: Path, smollm2_gguf: Path) -> None:
    from edge_magistral.engine import Engine
    from edge_magistral.errors import BadInputError

    with pytest.raises(BadInputError, match="vocabulary"):
        Engine(LoadSettings(str(tiny_gguf_f32), n_ctx=512, n_threads=2, speculate="draft",
                            draft_model=str(smollm2_gguf)))


def test_guesses_that_do_not_pay_stop_and_a_costly_draft_still_probes() -> None:
    class Costly:
        cheap = False

        def __init__(self) -> None:
            self.tokens: list[int] = []

        def push(self, token: int) -> None:
            self.tokens.append(token)

        def propose(self, k: int) -> list[int]:
            return [7] * k  # always wrong below

        def guess_cost(self, t1: float | None) -> float:
            return 0.1

    s = Speculator([1, 2, 3], VerifyCost(fixed=0.1), draft=Costly())
    verified = []
    for i in range(200):
        guesses = s.next(i + 100, room=8)
        if guesses:
            s.verified(len(guesses), 0)
        verified.append(len(guesses))
    assert sum(verified[:10]) > 0  # the prior lets it try
    assert all(n <= 1 for n in verified[100:])  # then only a probe of one guess...
    assert 4 <= sum(verified[100:]) <= 100 // 16 + 1  # ...every 16 tokens
    dear = Costly()
    dear.guess_cost = lambda t1: 1.0  # a draft as slow as the model: no guess can pay
    s = Speculator([1, 2, 3], VerifyCost(fixed=0.1), draft=dear)
    assert sum(len(s.next(i + 100, room=8)) for i in range(200)) == 0
