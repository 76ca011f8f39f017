"""Continuous batching on the tiny random-weight Magistral: concurrent streams give the same
tokens as the one-slot engine, requests join mid-flight and queue beyond the slots, a
cancel frees its slot, and the system prompt is taken from the prefix cache, not re-evaluated.

Flash attention is off here: llama.cpp's CPU flash-attention kernel takes another path for a short
prompt suffix, so even the one-slot engine's own prompt cache changes its last bits with it
on (measured); without it, token equality is exact and a fair test of the batching itself."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edge_magistral.batch import PrefixCache
from edge_magistral.chat import Message
from edge_magistral.engine import Engine  # before anything that imports numpy
from edge_magistral.generation import AnswerText, Done, Limits, LoadSettings, ThinkingText
from edge_magistral.tekken import END_SYSTEM

SLOTS = 3


@pytest.fixture(scope="module")
def settings(tiny_gguf_quants: dict[str, Path]) -> LoadSettings:
    return LoadSettings(str(tiny_gguf_quants["Q8_0"]), n_ctx=512, n_threads=2, flash_attn=False, n_batch=128)


@pytest.fixture(scope="module")
def single(settings: LoadSettings):
    e = Engine(settings)
    yield e
    e.close()


@pytest.fixture(scope="module")
def batch(settings: LoadSettings):
    b = Engine(replace(settings, n_slots=SLOTS))
    yield b
    b.close()


def texts(events) -> tuple[str, Done]:
    """The streamed text (thinking and answer, in order) and the Done event."""
    out, done = [], None
    for ev in events:
        if isinstance(ev, ThinkingText | AnswerText):
            out.append(ev.text)
        elif isinstance(ev, Done):
            done = ev
    assert done is not None
    return "".join(out), done


def ask(i: int) -> list[Message]:
    return [Message("user", f"Question {i}: " + "how many legs has a spider? " * (i % 3 + 1))]


CHAT = Limits(think_budget=0, max_tokens=40, seed=3)  # sampled (temperature 0.7), seeded
GREEDY = Limits(raw=True, max_tokens=40, temperature=0.0)


def reference(single: Engine, prompt: list[int], limits: Limits) -> tuple[str, Done]:
    return texts(single.generate_ids(prompt, limits))


def test_concurrent_streams_equal_the_single_sequence_engine(single, batch) -> None:
    cases = [(single.prompt_ids(ask(i)), CHAT if i % 2 else GREEDY) for i in range(SLOTS)]
    before = batch.stats.max_active
    streams = batch.submit_all(cases)  # admitted in one step
    got = [texts(s) for s in streams]
    for (p, lim), (text, done) in zip(cases, got):
        ref_text, ref_done = reference(single, p, lim)
        assert text == ref_text and text
        assert done.usage == ref_done.usage and done.stop_reason == ref_done.stop_reason
    assert max(before, batch.stats.max_active) == SLOTS  # they really were decoded together


def test_a_request_joins_mid_flight(single, batch) -> None:
    first_p, late_p = single.prompt_ids(ask(10)), single.prompt_ids(ask(11))
    first = batch.submit(first_p, CHAT)
    seen = []
    for ev in first:
        seen.append(ev)
        if sum(isinstance(e, AnswerText) for e in seen) == 5:
            break
    late = batch.submit(late_p, CHAT)
    first_text, first_done = texts(seen + list(first))
    late_text, _ = texts(late)
    assert first_done.usage.answer_tokens > 5 + 5  # still generating when the late one joined
    assert first_text == reference(single, first_p, CHAT)[0]
    assert late_text == reference(single, late_p, CHAT)[0]


def test_cancel_frees_the_slot_and_the_others_continue(single, batch) -> None:
    long = Limits(think_budget=0, max_tokens=400, seed=5)
    prompts = [single.prompt_ids(ask(20 + i)) for i in range(SLOTS)]
    victim, *others = batch.submit_all([(p, long if i == 0 else CHAT) for i, p in enumerate(prompts)])
    n = 0
    for ev in victim:
        n += isinstance(ev, AnswerText)
        if n == 3:
            batch.cancel(victim)
    assert victim.done.finish_reason == "cancelled" and victim.done.usage.answer_tokens < 40
    for p, s in zip(prompts[1:], others):
        assert texts(s)[0] == reference(single, p, CHAT)[0]
    after = batch.submit(prompts[0], CHAT)  # the freed slot takes a new request
    assert texts(after)[0] == reference(single, prompts[0], CHAT)[0]
    assert batch.busy_seqs() == []  # a slot is free before its client sees the end
    import llama_cpp

    mem = llama_cpp.llama_get_memory(batch.ctx)
    assert all(llama_cpp.llama_memory_seq_pos_max(mem, seq) == -1 for seq in range(1, SLOTS + 1))  # KV freed


def test_an_ended_slot_below_the_others_is_filled_by_moving_the_highest(single, batch) -> None:
    """Busy sequence ids stay 1..k (llama.cpp puts only consecutive ids of a multi-stream KV cache
    in one ubatch): when the lowest ends first, the highest slot's KV moves into its stream, and
    its text is unchanged by the move."""
    short, long = Limits(think_budget=0, max_tokens=8, seed=5, ignore_eos=True), \
        Limits(think_budget=0, max_tokens=120, seed=5, ignore_eos=True)
    prompts = [single.prompt_ids(ask(50 + i)) for i in range(SLOTS)]
    moves = batch.stats.moves
    streams = batch.submit_all([(p, short if i == 0 else long) for i, p in enumerate(prompts)])
    texts(streams[0])  # the first (sequence 1) ends while the others decode
    seen = batch.busy_seqs()
    got = [texts(s)[0] for s in streams[1:]]
    assert seen == list(range(1, len(seen) + 1))  # no hole below a busy slot
    assert batch.stats.moves > moves
    for p, text in zip(prompts[1:], got):
        assert text == reference(single, p, long)[0]


def test_the_system_prompt_is_taken_from_the_prefix_cache(single, settings) -> None:
    b = Engine(replace(settings, n_slots=2))
    try:
        p1, p2 = single.prompt_ids(ask(30)), single.prompt_ids(ask(31))
        system_len = p1.index(END_SYSTEM) + 1
        assert system_len > 100 and p2[:system_len] == p1[:system_len]
        _, d1 = texts(b.submit(p1, CHAT))
        evaluated = b.stats.prompt_tokens_evaluated
        text2, d2 = texts(b.submit(p2, CHAT))
        prompt2 = d2.usage.prompt_tokens + 2  # + the [THINK][/THINK] a zero think budget appends
        assert d1.timings.cached_prompt_tokens == 0
        assert d2.timings.cached_prompt_tokens >= system_len
        assert b.stats.prompt_tokens_evaluated - evaluated == prompt2 - d2.timings.cached_prompt_tokens
        assert text2 == reference(single, p2, CHAT)[0]  # the copied KV is as good as evaluated KV
    finally:
        b.close()


def test_more_streams_than_slots_wait_their_turn(single, batch) -> None:
    prompts = [single.prompt_ids(ask(40 + i)) for i in range(SLOTS + 3)]
    streams = [batch.submit(p, CHAT) for p in prompts]
    for p, s in zip(prompts, streams):
        assert texts(s)[0] == reference(single, p, CHAT)[0]
    assert batch.stats.max_active <= SLOTS


def test_close_ends_queued_and_running_streams(settings) -> None:
    b = Engine(settings)
    running = b.submit([1, 3, 1000, 1001, 4], Limits(raw=True, max_tokens=400, temperature=0.0))
    queued = b.submit([1, 3, 1002, 4], Limits(raw=True, max_tokens=10, temperature=0.0))
    next(running)
    b.close()
    assert texts(running)[1].finish_reason in ("cancelled", "stop")
    assert texts(queued)[1].finish_reason == "cancelled"


def test_prefix_cache_keeps_what_recent_prompts_share() -> None:
    c = PrefixCache(limit=100, system_end=18)
    assert c.offer([1, 17, 5, 18, 3, 7, 4]) == 4  # the first prompt: its system prompt
    assert c.reusable([1, 17, 5, 18, 3, 8, 4]) == 4
    assert c.offer([1, 17, 5, 18, 3, 8, 4]) == 5  # what the two latest prompts share
    assert c.offer([1, 17, 5, 18, 3, 9, 4]) == 0  # already held
    assert c.offer([1, 17, 6, 18, 3, 4]) == 4  # a new system prompt takes over at once
    assert c.reusable([1, 17, 6]) == 2  # one token is always left to evaluate
