"""Top-k on the device (llama.cpp's backend sampling) must not change a single token: the host
chain then bans and re-ranks only the device's candidates, with room for every banned id. On this
CPU-only build "the device" is llama.cpp's CPU backend, which runs the same graph op; the GPU
figures are in benchmarks/. Also: ``ignore_eos`` really bans end-of-sequence."""

from __future__ import annotations

import ctypes
from dataclasses import replace
from pathlib import Path

import llama_cpp  # noqa: I001
import pytest

from edge_magistral.chat import Message
from edge_magistral.engine import Engine  # before anything that imports numpy
from edge_magistral.generation import AnswerText, Done, Limits, LoadSettings, ThinkingText, WatchdogAction
from edge_magistral.turn import BACKEND_TOPK_MARGIN, Turn

ASK = [Message("user", "Tell me a long story about the sea, please.")]
CASES = {
    # a thinking turn cut by budget forcing: [THINK]/[/THINK]/</s> get banned along the way
    "thinking": Limits(think_budget=64, max_tokens=400, seed=11, force_thinking=True),
    "answer": Limits(think_budget=0, max_tokens=60, seed=5, top_k=7, top_p=0.8, min_p=0.05),
    "greedy": Limits(raw=True, max_tokens=40, temperature=0.0),
    "ignore_eos": Limits(think_budget=0, max_tokens=60, seed=9, ignore_eos=True),
}


def settings(model: Path, backend: bool) -> LoadSettings:
    return LoadSettings(str(model), n_ctx=1024, n_threads=2, flash_attn=False, n_batch=128, backend_sampling=backend)


def transcript(events) -> tuple[str, list[str], Done]:
    text, actions, done = [], [], None
    for ev in events:
        if isinstance(ev, ThinkingText | AnswerText):
            text.append(ev.text)
        elif isinstance(ev, WatchdogAction):
            actions.append(f"{ev.action}:{ev.reason}")
        elif isinstance(ev, Done):
            done = ev
    assert done is not None
    return "".join(text), actions, done


@pytest.fixture(scope="module")
def reference(tiny_gguf_quants: dict[str, Path]) -> dict[str, tuple]:
    e = Engine(settings(tiny_gguf_quants["Q8_0"], backend=False))
    try:
        assert not e.backend_sampling
        return {name: transcript(e.generate(ASK, lim)) for name, lim in CASES.items()}
    finally:
        e.close()


def test_device_top_k_gives_the_same_tokens_as_the_host(tiny_gguf_quants, reference) -> None:
    e = Engine(settings(tiny_gguf_quants["Q8_0"], backend=True))
    try:
        assert e.backend_sampling
        for name, lim in CASES.items():
            text, actions, done = transcript(e.generate(ASK, lim))
            ref_text, ref_actions, ref_done = reference[name]
            assert text and text == ref_text, name
            assert actions == ref_actions and done.usage == ref_done.usage, name
        assert any(a.startswith("force_close") for a in reference["thinking"][1])  # the bans were exercised
    finally:
        e.close()


def test_batched_streams_with_device_top_k_equal_the_host_engine(tiny_gguf_quants, reference) -> None:
    b = Engine(replace(settings(tiny_gguf_quants["Q8_0"], backend=True), n_slots=2))
    try:
        names = ["answer", "greedy", "ignore_eos"]
        streams = [b.submit(ASK if not CASES[n].raw else b.prompt_ids(ASK), CASES[n]) for n in names]
        for name, stream in zip(names, streams):
            assert transcript(stream)[0] == reference[name][0], name
    finally:
        b.close()


def test_which_turns_can_sample_on_the_device(tiny_gguf_quants) -> None:
    e = Engine(settings(tiny_gguf_quants["Q8_0"], backend=True))
    try:
        prompt = e.prompt_ids(ASK)
        assert Turn(e, prompt, Limits(top_k=40)).backend_k() == 40 + BACKEND_TOPK_MARGIN
        # greedy needs 1 + margin; it shares the default's k (no graph re-reservation between them)
        assert Turn(e, prompt, Limits(raw=True, temperature=0)).backend_k() == 40 + BACKEND_TOPK_MARGIN
        assert Turn(e, prompt, Limits(top_k=100)).backend_k() == 100 + BACKEND_TOPK_MARGIN
        assert Turn(e, prompt, Limits(top_k=0)).backend_k() is None  # top-p over the whole vocabulary
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        assert Turn(e, prompt, Limits(json_schema=schema)).backend_k() is None  # a grammar needs every id
    finally:
        e.close()


def test_auto_samples_on_the_device_only_when_the_logits_are_on_a_gpu(tiny_gguf_quants) -> None:
    gpu_build = bool(llama_cpp.llama_supports_gpu_offload())
    for ngl, on_device in ((99, gpu_build), (2, False)):  # the tiny model has 2 layers + the output layer
        e = Engine(LoadSettings(str(tiny_gguf_quants["Q8_0"]), n_ctx=256, n_threads=2, n_gpu_layers=ngl))
        try:
            assert e.backend_sampling is on_device, ngl
            e.set_backend_topk(0, 48)
            assert (e.backend_topk(0) is not None) is on_device  # nothing attached when the host samples
        finally:
            e.close()


def test_ignore_eos_bans_end_of_sequence(tiny_gguf_quants) -> None:
    e = Engine(settings(tiny_gguf_quants["Q8_0"], backend=False))
    try:
        lc = llama_cpp
        for ignore, expect_eos in ((False, True), (True, False)):
            turn = Turn(e, e.prompt_ids(ASK), Limits(raw=True, temperature=0.0, ignore_eos=ignore))
            turn.prefill()
            for t in e.encode_text("Once upon a time"):  # past the watchdog's own early </s> ban
                turn.token(t)
            data = (lc.llama_token_data * 3)()
            other = e.encode_text(" sea")[0]
            for i, (tok, logit) in enumerate(((e.eos_id, 10.0), (other, 5.0), (other + 1, 1.0))):
                data[i].id, data[i].logit, data[i].p = tok, logit, 0.0
            arr = lc.llama_token_data_array(data=data, size=3, selected=-1, sorted=False)
            lc.llama_sampler_apply(turn.sampler(), ctypes.byref(arr))
            assert (data[arr.selected].id == e.eos_id) is expect_eos
            turn.release()
    finally:
        e.close()
