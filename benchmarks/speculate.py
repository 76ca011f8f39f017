#!/usr/bin/env python3
"""Speculative decoding, measured side by side in one invocation (issue 13).

1. **Verify cost** (``cost``): at a context depth like a real turn's (default 512 and 4096 tokens
   in the KV cache), the time of one ``llama_decode`` of ``k + 1`` tokens with logits for every
   position (as the engine's ``_fill_batch`` asks them, through ``LoadedModel`` and ``Batch``, with
   the device top-k a default turn attaches) against one token, k = 0..16, median over reps:
   ``c(k) = t(k + 1) / t(1)``, the k+1-token step timed right after a one-token step (as a verify
   step follows plain decoding; ``c_steady`` times it after a step of its own size, when CUDA
   captures a graph of it, ``c_replay`` after two, when the captured graph is replayed). Decode time
   only (what the engine's ``VerifyCost`` sees; the host's sampling of each row is not in it).
2. **Acceptance** (``accept``): the model's own outputs for prompts that look like what reasoning
   does (quote a question, write code, make a table, list steps), greedy and at temperature 0.7,
   speculation off; then :class:`~edge_magistral.speculate.NgramDraft` is replayed over prompt +
   output and, at every position, the proposal is compared with the actual continuation: the
   acceptance profile, E(k) (tokens per verify step when k guesses are verified whenever there is
   a proposal) and the predicted speed-up ``tokens / sum of c(k_step)``; also the engine's own
   adaptive policy (a :class:`~edge_magistral.speculate.Speculator` fed the same tokens, verify
   cost fixed at the measured slope).
3. **End to end** (``e2e``): the engine's generation tokens/s with ``speculate="ngram"`` against
   ``"off"`` on the same prompts and seeds (the "off" runs are the ones step 2 reads; a fresh
   engine per mode and round, ABBA), and (``llama``) ``llama-bench`` tg128 on the same file.
4. **Projection**: the speed-up at a published acceptance rate for a real Magistral/Mistral Small
   target with a same-vocabulary draft (geometric acceptance, the draft's per-token cost relative to
   a target step given or measured with ``--draft-bench``), and with the acceptance of another
   run's outputs (``--acceptance FILE``: a CPU run's JSON, replayed at this run's costs).

    python benchmarks/speculate.py --model .cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --llama-bench .llama-tools/bin/llama-bench --threads 2 --out benchmarks/out/speculate.json
    # GPU, Magistral-shaped zero weights (only costs mean anything): see gpu_run.sh's speculate step

Writes JSON (``--out``) and a short text summary beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama_cpp  # noqa: E402,I001  first, before numpy (see edge_magistral/model.py)

from edge_magistral.speculate import DRAFT_MAX, NgramDraft, Speculator, VerifyCost, best_k  # noqa: E402
from engine_overhead import in_own_thread  # noqa: E402  (a thread per run: its OpenMP pool goes with it)

OUT = ROOT / "benchmarks" / "out" / "speculate.json"
K_MAX = 16
# A published acceptance for a real Mistral Small 24B target with a 0.5B same-vocabulary (Tekken)
# draft: alamios/Mistral-Small-3.1-DRAFT-0.5B, "60.7% accepted tokens in a coding test" (r/LocalLLaMA,
# thread 1jie6oo, 2025; the same thread reports 1.3-1.6x for the 24B model with that draft).
PUBLISHED = {"rate": 0.607, "pair": "Mistral Small 3.1 24B + alamios/Mistral-Small-3.1-DRAFT-0.5B",
             "source": "https://www.reddit.com/r/LocalLLaMA/comments/1jie6oo/mistral_small_draft_model/",
             "note": "accepted / drafted on a coding prompt (MLX 4-bit); read here as a per-guess rate"}
PROMPTS = (
    ("quote", "Here is a question from a student: \"A train leaves Paris at 9:00 travelling at 120 km/h, and a "
              "second train leaves Lyon, 460 km away, at 10:00 travelling at 100 km/h towards Paris. At what "
              "time do they meet?\" First quote the question exactly, then solve it step by step, restating "
              "each number you use."),
    ("code", "Write a Python function that reads a CSV file and returns its rows as a list of dictionaries, "
             "then write three unit tests for it with pytest, then show the function again with type hints."),
    ("table", "Make a markdown table of the eight planets of the solar system with the columns Name, Diameter "
              "(km), Number of moons and Distance from the Sun (million km), one row per planet."),
    ("steps", "List, as numbered steps, how to create a Python virtual environment, install the packages "
              "requests and numpy into it, freeze them to requirements.txt, and reinstall them on another "
              "machine. Give the exact shell command for each step."),
    ("rewrite", "Rewrite this paragraph with the grammar fixed, then list every change you made, quoting the "
                "old and the new words: \"Me and him goes to the library every days, because we was wanting "
                "to reads more books then our friends, which they does not like reading.\""),
    ("explain", "Explain what this code does, quoting each line before explaining it:\n\ndef fib(n):\n    a, b = "
                "0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nprint([fib(i) for i in "
                "range(10)])"),
)


# ------------------------------------------------------------------------ pure helpers (tested)

def ratios(times: dict[int, float]) -> dict[int, float]:
    """{k: seconds of a k+1-token step} → c(k) = t(k+1) / t(1)."""
    return {k: t / times[0] for k, t in sorted(times.items())}


def slope(c: dict[int, float], k_max: int = DRAFT_MAX) -> float:
    """The relative cost of one more guess, fitted through c(0) = 1 over k = 1..k_max (what the
    engine's VerifyCost estimates): sum k (c(k) - 1) / sum k^2."""
    ks = [k for k in c if 1 <= k <= k_max]
    return sum(k * (c[k] - 1.0) for k in ks) / sum(k * k for k in ks) if ks else 0.0


def matches(prompt: Sequence[int], output: Sequence[int], k_max: int = K_MAX,
            sizes: Sequence[int] | None = None) -> list[int]:
    """For each output position i (but the last): how many of the draft's k_max guesses made after
    output[i] (the prompt and output[:i + 1] as history, as the engine's Speculator sees them) equal
    output[i + 1:], in a row; -1 where the draft had no proposal."""
    draft = NgramDraft(prompt) if sizes is None else NgramDraft(prompt, sizes)
    out: list[int] = []
    for i, t in enumerate(output[:-1]):
        draft.push(t)
        guess = draft.propose(k_max)
        if not guess:
            out.append(-1)
            continue
        m = 0
        for g, actual in zip(guess, output[i + 1:]):
            if g != actual:
                break
            m += 1
        out.append(m)
    return out


@dataclass
class Walk:
    """Decoding one output with k guesses verified at every step that has a proposal."""

    tokens: int  # tokens produced
    steps: int  # decode steps
    drafted: int
    accepted: int
    cost: float  # sum of c(guesses of each step), in one-token steps

    @property
    def per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def speedup(self) -> float:
        return self.tokens / self.cost if self.cost else 0.0


def walk(m: Sequence[int], k: int, c: Callable[[int], float]) -> Walk:
    """Step through one output's match lengths ``m`` (from :func:`matches`) verifying k guesses;
    every output token after the first is produced once (``tokens`` = len(m))."""
    i = tokens = steps = drafted = accepted = 0
    cost = 0.0
    n = len(m)
    while i < n:
        kk = min(k, n - 1 - i) if m[i] >= 0 else 0  # no guesses past the output's last token
        a = min(max(m[i], 0), kk)
        steps, tokens, drafted, accepted = steps + 1, tokens + a + 1, drafted + kk, accepted + a
        cost += c(kk)
        i += a + 1
    return Walk(tokens, steps, drafted, accepted, cost)


def engine_walk(prompt: Sequence[int], output: Sequence[int], rel_cost: float, c: Callable[[int], float],
                sizes: Sequence[int] | None = None) -> Walk:
    """The engine's own policy on this output: a Speculator (running acceptance, best_k at the given
    relative cost) proposes after each token the step ends on; the guesses that equal the output
    are accepted, as the engine's sampler would (the same tokens come either way)."""
    kw = {} if sizes is None else {"sizes": sizes}
    spec = Speculator(prompt, VerifyCost(fixed=rel_cost), **kw)
    return policy_walk(prompt, output, spec, lambda k, run: c(k))


def shape_costs(cd: dict) -> Callable[[int, int], float]:
    """A step's cost in replayed one-token steps, by its guesses ``k`` and how many steps in a row
    had its shape (``run``): eager at 1, the CUDA graph captured at 2, replayed from 3 (as the cost
    part timed them; ``t_after_switch_1_ms`` is the one-token step right after another shape)."""
    base = cd["t_replay_ms"][0]

    def f(k: int, run: int) -> float:
        if run >= 3:
            t = cd["t_replay_ms"][k]
        elif run == 2:
            t = cd["t_switch_ms"][0] if k == 0 else cd["t_ms"][k]
        else:
            t = cd["t_after_switch_1_ms"] if k == 0 else cd["t_switch_ms"][k]
        return t / base
    return f


def policy_walk(prompt: Sequence[int], output: Sequence[int], spec: Speculator,
                cost: Callable[[int, int], float]) -> Walk:
    """Like :func:`engine_walk` for any Speculator (held or not), each step costed by its shape and
    the shapes before it (:func:`shape_costs`)."""
    i = tokens = steps = 0
    total, last, run = 0.0, -1, 0
    n = len(output)
    while i < n - 1:
        guesses = spec.next(output[i], room=n - 2 - i)  # the next token is known up to output[-1]
        a = 0
        for g, actual in zip(guesses, output[i + 1:]):
            if g != actual:
                break
            spec.accepted_token(actual)
            a += 1
        if guesses:
            spec.verified(len(guesses), a)
        k = len(guesses)
        run, last = (run + 1 if k == last else 1), k
        steps, tokens, total = steps + 1, tokens + a + 1, total + cost(k, run)
        i += a + 1
    return Walk(tokens, steps, spec.stats.drafted, spec.stats.accepted, total)


def shaped_projection(runs: Sequence[dict], cd: dict) -> dict:
    """The engine's two policies over real outputs (prompt lookup) at this depth's shape-aware
    costs: k chosen per step (the cost slope fixed at the eager c(k)'s) and the width held (its
    steady costs known, one VerifyCost across the outputs as in a running engine)."""
    cost = shape_costs(cd)
    held_cost = VerifyCost()
    held_cost.steady = {k + 1: v / cd["t_replay_ms"][0] for k, v in cd["t_replay_ms"].items()}
    out = {}
    for name, make in (("free", lambda r: Speculator(r["prompt"], VerifyCost(fixed=slope(cd["c"])))),
                       ("held", lambda r: Speculator(r["prompt"], held_cost, hold=True))):
        w = combine([policy_walk(r["prompt"], r["ids"], make(r), cost) for r in runs])
        out[name] = {**asdict(w), "speedup": round(w.speedup, 4), "tokens_per_step": round(w.per_step, 4),
                     "accepted_share": round(w.accepted / w.drafted, 4) if w.drafted else None}
    return out


def combine(walks: Sequence[Walk]) -> Walk:
    return Walk(*(sum(getattr(w, f) for w in walks) for f in ("tokens", "steps", "drafted", "accepted", "cost")))


def per_guess_rate(ms: Sequence[Sequence[int]], k: int = DRAFT_MAX) -> float:
    """What the Speculator's running rate converges to when k guesses are verified: accepted
    guesses over (accepted guesses + steps that ended on a rejected one)."""
    acc = rej = 0
    for m in ms:
        i, n = 0, len(m)
        while i < n:
            kk = min(k, n - 1 - i) if m[i] >= 0 else 0
            a = min(max(m[i], 0), kk)
            acc, rej = acc + a, rej + (a < kk)
            i += a + 1
    return acc / (acc + rej) if acc + rej else 0.0


def profile(ms: Sequence[Sequence[int]], k_max: int = K_MAX) -> dict:
    """Over all positions: the share with a proposal, and P(at least j guesses right | proposal)."""
    flat = [x for m in ms for x in m]
    props = [x for x in flat if x >= 0]
    return {"positions": len(flat), "with_proposal": len(props) / len(flat) if flat else 0.0,
            "p_at_least": [sum(1 for x in props if x >= j) / len(props) if props else 0.0
                           for j in range(1, k_max + 1)]}


def geometric(rate: float, c: Callable[[int], float], draft_cost: float = 0.0, k_max: int = K_MAX) -> dict:
    """A draft whose every guess is right with probability ``rate`` given the previous one was:
    E(k) = (1 - rate^(k+1)) / (1 - rate) tokens per step, a step costing c(k) + k * draft_cost."""
    rows = []
    for k in range(k_max + 1):
        e = sum(rate ** j for j in range(k + 1))
        rows.append({"k": k, "tokens_per_step": e, "speedup": e / (c(k) + k * draft_cost)})
    best = max(rows, key=lambda r: r["speedup"])
    return {"rate": rate, "draft_cost": draft_cost, "rows": rows, "best_k": best["k"], "best_speedup": best["speedup"]}


def curve(c: dict[int, float]) -> Callable[[int], float]:
    """c(k) as a function; beyond the measured k, extended linearly from the last two points."""
    top = max(c)

    def f(k: int) -> float:
        if k in c:
            return c[k]
        return c[top] + (k - top) * (c[top] - c[top - 1])
    return f


def acceptance_summary(runs: Sequence[dict], c: dict[int, float], k_max: int = K_MAX) -> dict:
    """The acceptance of a set of runs (each with prompt, ids, match) at the cost curve ``c``:
    overall and per run, E(k) and the predicted speed-up per k, the engine's best_k and policy."""
    f = curve(c)
    ms = [r["match"] for r in runs]
    rate = per_guess_rate(ms)
    rel = slope(c)
    by_k = []
    for k in range(k_max + 1):
        w = combine([walk(m, k, f) for m in ms])
        by_k.append({"k": k, "tokens_per_step": round(w.per_step, 4), "speedup": round(w.speedup, 4)})
    eng = combine([engine_walk(r["prompt"], r["ids"], rel, f) for r in runs])
    per_run = []
    for r in runs:
        best = max((walk(r["match"], k, f) for k in range(k_max + 1)), key=lambda w: w.speedup)
        ew = engine_walk(r["prompt"], r["ids"], rel, f)
        per_run.append({"name": r["name"], "temperature": r["temperature"], "tokens": len(r["ids"]),
                        "rate": round(per_guess_rate([r["match"]]), 4),
                        "e8": round(walk(r["match"], DRAFT_MAX, f).per_step, 3),
                        "best_speedup": round(best.speedup, 3), "engine_speedup": round(ew.speedup, 3)})
    best = max(by_k, key=lambda r: r["speedup"])
    return {"profile": profile(ms, k_max), "per_guess_rate": round(rate, 4), "cost_slope": round(rel, 4),
            "engine_best_k": best_k(rate, rel, k_max), "by_k": by_k, "best_k": best["k"],
            "best_speedup": best["speedup"],
            "engine_policy": {**asdict(eng), "tokens_per_step": round(eng.per_step, 4),
                              "speedup": round(eng.speedup, 4)},
            "per_run": per_run}


# ----------------------------------------------------------------------------- measurement

def _decode(model, batch, tokens: Sequence[int], pos: int, logits_rows: int) -> float:
    """One llama_decode of ``tokens`` at ``pos`` (sequence 0), logits for the last ``logits_rows``
    rows; seconds until the device finished."""
    n = batch.put(0, tokens, pos, 0)
    for row in range(n - logits_rows, n):
        batch.want_logits(row)
    batch.struct.n_tokens = n
    t0 = time.perf_counter()
    rc = llama_cpp.llama_decode(model.ctx, batch.struct)
    llama_cpp.llama_synchronize(model.ctx)
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"llama_decode failed ({rc})")
    return dt


def cost_at_depth(model, batch, depth: int, k_max: int, reps: int, rng: random.Random) -> dict:
    """Fill ``depth`` tokens, then, k in a new random order every rep: a one-token step, a step of
    k+1 tokens right after it (``switch``: llama.cpp rebuilds its graph when the batch's shape
    changes, as it does when a verify step follows plain steps) and the same size again
    (``steady``: the graph reused), each at that depth and removed again. ``c`` = switch(k) /
    steady(0), what a verify step costs after plain decoding (used for every prediction)."""
    mem = llama_cpp.llama_get_memory(model.ctx)
    llama_cpp.llama_memory_clear(mem, True)
    vocab = min(model.n_vocab, 30000)
    fill = [rng.randrange(100, vocab) for _ in range(depth)]
    for at in range(0, depth, batch.size):
        _decode(model, batch, fill[at:at + batch.size], at, 1)

    def step(n: int) -> float:
        dt = _decode(model, batch, [rng.randrange(100, vocab) for _ in range(n)], depth, n)
        llama_cpp.llama_memory_seq_rm(mem, 0, depth, -1)
        return dt

    ks_all = range(k_max + 1)
    switch: dict[int, list[float]] = {k: [] for k in ks_all}
    steady: dict[int, list[float]] = {k: [] for k in ks_all}
    replay: dict[int, list[float]] = {k: [] for k in ks_all}
    eager1: list[float] = []
    for rep in range(reps + 1):  # rep 0 warms up every size (graph reservation, kernels)
        ks = list(ks_all)
        rng.shuffle(ks)
        for k in ks:
            e = step(1)
            a, b, r = step(k + 1), step(k + 1), step(k + 1)
            if rep:
                eager1.append(e)
                switch[k].append(a)
                steady[k].append(b)
                replay[k].append(r)
    t_sw = {k: statistics.median(v) for k, v in switch.items()}
    t_st = {k: statistics.median(v) for k, v in steady.items()}
    t_rp = {k: statistics.median(v) for k, v in replay.items()}
    return {"depth": depth, "reps": reps, "t_ms": {k: round(1e3 * v, 4) for k, v in t_st.items()},
            "t_switch_ms": {k: round(1e3 * v, 4) for k, v in t_sw.items()},
            "t_replay_ms": {k: round(1e3 * v, 4) for k, v in t_rp.items()},
            "t_after_switch_1_ms": round(1e3 * statistics.median(eager1), 4),
            "c": {k: round(v / t_rp[0], 4) for k, v in t_sw.items()},
            "c_steady": {k: round(v, 4) for k, v in ratios(t_st).items()},
            "c_replay": {k: round(v, 4) for k, v in ratios(t_rp).items()}}


def measure_cost(settings, depths: Sequence[int], k_max: int, reps: int) -> list[dict]:
    from edge_magistral.batch import Batch
    from edge_magistral.generation import DEFAULT_LIMITS
    from edge_magistral.model import LoadedModel
    from edge_magistral.speculate import DRAFT_MAX
    from edge_magistral.turn import BACKEND_TOPK_MARGIN

    def run() -> list[dict]:
        model = LoadedModel(settings)
        try:
            model.set_backend_topk(0, DEFAULT_LIMITS.top_k + BACKEND_TOPK_MARGIN)  # what a default turn attaches
            batch = Batch(settings.n_batch)
            rng = random.Random(7)
            # with the device top-k llama.cpp allows the context DRAFT_MAX + 1 logits rows per
            # sequence (as the engine makes it; it never verifies more guesses), so k stops there
            k = min(k_max, DRAFT_MAX) if model.backend_sampling else k_max
            return [cost_at_depth(model, batch, d, k, reps, rng) for d in depths]
        finally:
            model.close()
    return in_own_thread(run)  # type: ignore[return-value]


@dataclass
class Job:
    name: str
    prompt: list[int]
    temperature: float
    seed: int


def jobs(engine, zero_weights: bool, temps: Sequence[float]) -> list[Job]:
    from edge_magistral.chat import Message

    out = []
    for i, (name, text) in enumerate(PROMPTS):
        ids = engine.raw_prompt_ids(text) if zero_weights else engine.prompt_ids([Message("user", text)])
        out += [Job(name, ids, t, 1000 + i) for t in temps]
    return out


def generate(settings, speculate: str, zero_weights: bool, temps: Sequence[float], max_tokens: int) -> list[dict]:
    """Every job through a fresh one-slot engine with this speculation mode: ids, timings."""
    from dataclasses import replace

    from edge_magistral.engine import Engine
    from edge_magistral.generation import Done, Limits

    engine = Engine(replace(settings, speculate=speculate))
    try:
        runs = []
        warm = Limits(raw=True, max_tokens=8, seed=1, ignore_eos=True)
        list(engine.generate_ids(engine.raw_prompt_ids("Warm up."), warm))
        for job in jobs(engine, zero_weights, temps):
            limits = Limits(max_tokens=max_tokens, temperature=job.temperature, seed=job.seed,
                            raw=zero_weights, ignore_eos=zero_weights)
            done = [ev for ev in engine.generate_ids(job.prompt, limits) if isinstance(ev, Done)][-1]
            kept = list(engine._kept)  # one slot: what its KV holds = prompt + output (but the last token)
            tm = done.timings
            runs.append({"name": job.name, "temperature": job.temperature, "seed": job.seed,
                         "prompt": job.prompt, "ids": kept[len(job.prompt):],
                         "completion_tokens": done.usage.completion_tokens, "stop_reason": done.stop_reason,
                         "generation_s": tm.generation_s, "tokens_per_s": tm.tokens_per_s,
                         "drafted": tm.drafted_tokens, "accepted": tm.accepted_tokens})
        return runs
    finally:
        engine.close()


def llama_bench_tg(exe: str, model: str, threads: int | None, ngl: int, reps: int) -> dict:
    from compare_llama import llama_bench_cmd, llama_bench_samples, parse_json_out

    cmd = llama_bench_cmd(exe, model, 0, 128, reps, threads, ngl)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{p.stderr[-2000:]}")
    tg = llama_bench_samples(parse_json_out(p.stdout))["tg"]
    return {"cmd": shlex.join(cmd), "tokens_per_s": tg, "mean": statistics.fmean(tg)}


def rate_of(runs: Sequence[dict]) -> float:
    """Generation tokens/s over a set of runs: tokens after the first over their generation time."""
    toks = sum(max(0, r["completion_tokens"] - 1) for r in runs)
    secs = sum(r["generation_s"] for r in runs)
    return toks / secs if secs else 0.0


# ----------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the GGUF to measure (not with --recompute)")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary: tg128 on the same file")
    ap.add_argument("--draft-bench", default=None, help="a draft-shaped GGUF: llama-bench tg128 gives its cost")
    ap.add_argument("--draft-cost", type=float, default=None,
                    help="a draft token's time over a target step (default: measured with --draft-bench, else 0.1)")
    ap.add_argument("--parts", default="cost,accept,e2e,llama")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--backend-sampling", choices=("auto", "on", "off"), default="auto",
                    help="the device top-k (auto: on when the output layer is on a GPU); llama.cpp's default "
                         "context allows one output row per sequence with it, so verify steps need it off")
    ap.add_argument("--depths", default="512,4096")
    ap.add_argument("--reps", type=int, default=5, help="cost: timed steps per k and depth")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temps", default="0,0.7")
    ap.add_argument("--rounds", type=int, default=2, help="e2e: off/ngram rounds (ABBA)")
    ap.add_argument("--bench-reps", type=int, default=3)
    ap.add_argument("--zero-weights", action="store_true",
                    help="a shaped model with zero weights: raw prompts, EOS ignored (only costs mean anything)")
    ap.add_argument("--acceptance", type=Path, default=None, help="another run's JSON: its outputs' acceptance")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--recompute", type=Path, default=None,
                    help="measure nothing: recompute this result's projections (e.g. with --acceptance) into --out")
    return ap.parse_args()


def settings_for(a: argparse.Namespace):
    from edge_magistral.generation import LoadSettings

    depth = max(int(d) for d in a.depths.split(","))
    n_ctx = max(depth + K_MAX + 64, 2048 if a.zero_weights else 4096)
    backend = {"auto": None, "on": True, "off": False}[a.backend_sampling]
    return LoadSettings(a.model, n_ctx=n_ctx, n_gpu_layers=a.n_gpu_layers, n_threads=a.threads,
                        backend_sampling=backend)


def end_to_end(a: argparse.Namespace, settings, temps: Sequence[float]) -> tuple[dict, list[dict]]:
    runs: dict[str, list[list[dict]]] = {"off": [], "ngram": []}
    for i in range(a.rounds):
        for mode in (("off", "ngram") if i % 2 == 0 else ("ngram", "off")):
            got = in_own_thread(lambda m=mode: generate(settings, m, a.zero_weights, temps, a.max_tokens))
            runs[mode].append(got)  # type: ignore[arg-type]
            print(f"  {mode:5s} round {i}: {rate_of(got):.2f} t/s", flush=True)  # type: ignore[arg-type]
    off, ngram = best_of(runs["off"]), best_of(runs["ngram"])
    same = [a_["ids"] == b["ids"] for a_, b in zip(off, ngram)]
    per_job = [n["tokens_per_s"] / o["tokens_per_s"] for o, n in zip(off, ngram) if o["tokens_per_s"]]
    drafted = sum(r["drafted"] for r in ngram)
    accepted = sum(r["accepted"] for r in ngram)
    return {"basis": f"each prompt's fastest of {a.rounds} rounds per mode (a shared machine stalls at times)",
            "off_tokens_per_s": rate_of(off), "ngram_tokens_per_s": rate_of(ngram),
            "ratio_ngram_off": rate_of(ngram) / rate_of(off), "median_prompt_ratio": statistics.median(per_job),
            "rounds_tokens_per_s": {m: [round(rate_of(r), 2) for r in rs] for m, rs in runs.items()},
            "drafted": drafted, "accepted": accepted, "same_output": same,
            "per_run": [{"name": o["name"], "temperature": o["temperature"], "tokens": o["completion_tokens"],
                         "off": round(o["tokens_per_s"], 2), "ngram": round(n["tokens_per_s"], 2),
                         "drafted": n["drafted"], "accepted": n["accepted"], "same": o["ids"] == n["ids"],
                         "first_difference": first_difference(o["ids"], n["ids"])}
                        for o, n in zip(off, ngram)]}, off


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first output position where two runs differ (None: the same tokens)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def best_of(rounds: Sequence[Sequence[dict]]) -> list[dict]:
    """Per job, the round that generated fastest (the same job, seed and tokens in every round)."""
    return [min(same_job, key=lambda r: r["generation_s"] / max(1, r["completion_tokens"] - 1))
            for same_job in zip(*rounds)]


def projections(result: dict, a: argparse.Namespace) -> dict:
    """Predicted speed-ups at each measured depth: published rate (+ draft cost), other acceptance."""
    out = {}
    draft_cost = result.get("draft_cost", 0.1)
    for cd in result.get("cost", []):
        c = {int(k): v for k, v in cd["c"].items()}
        f, km = curve(c), max(c)  # no k past the measured ones (the device top-k stops at DRAFT_MAX)
        p = {"published": geometric(PUBLISHED["rate"], f, draft_cost, km),
             "published_ngram_free": geometric(PUBLISHED["rate"], f, 0.0, km),
             "rates": {str(r): geometric(r, f, draft_cost, km)["best_speedup"] for r in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)}}
        if "accept_runs" in result:
            p["own_outputs"] = acceptance_summary(result["accept_runs"], c, km)
        if a.acceptance:
            other = json.loads(a.acceptance.read_text())
            p["acceptance_of"] = {"file": str(a.acceptance), **acceptance_summary(other["accept_runs"], c, km)}
        runs = result.get("accept_runs") or (
            json.loads(a.acceptance.read_text())["accept_runs"] if a.acceptance else [])
        if "t_replay_ms" in cd and runs:
            p["shaped"] = shaped_projection(runs, cd)
        out[str(cd["depth"])] = p
    return out


def main() -> None:
    a = parse_args()
    if a.recompute:
        res = json.loads(a.recompute.read_text())
        for cd in res.get("cost", []):  # JSON made the k keys strings
            for key in ("t_ms", "t_switch_ms", "t_replay_ms", "c", "c_steady", "c_replay"):
                if key in cd:
                    cd[key] = {int(k): v for k, v in cd[key].items()}
        if a.draft_cost is not None:
            res["draft_cost"] = a.draft_cost
        res["projection"] = projections(res, a)
        res["recomputed"] = shlex.join([sys.executable, *sys.argv])
        return finish(res, a)
    if not a.model:
        raise SystemExit("--model is needed (or --recompute FILE)")
    parts = set(a.parts.split(","))
    temps = [float(t) for t in a.temps.split(",")]
    settings = settings_for(a)
    from compare_llama import system  # no numpy, no llama_cpp of its own

    t0 = time.time()
    res: dict = {"kind": "speculate", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": a.model,
                 "command": shlex.join([sys.executable, *sys.argv]), "settings": asdict(settings),
                 "zero_weights": a.zero_weights, "uptime_before": os.popen("uptime").read().strip(),
                 "loadavg_before": os.getloadavg(), "system": system(), "published": PUBLISHED}
    lb: list[dict] = []
    bench = "llama" in parts and a.llama_bench
    if bench:
        attempt(res, a, "llama_bench", lambda: lb.append(
            llama_bench_tg(a.llama_bench, a.model, a.threads, a.n_gpu_layers, a.bench_reps)))
    if "cost" in parts:
        attempt(res, a, "cost", lambda: cost_part(res, settings, a))
    if "e2e" in parts or "accept" in parts:
        attempt(res, a, "e2e", lambda: e2e_part(res, settings, a, temps, "accept" in parts))
    if bench:
        attempt(res, a, "llama_bench", lambda: lb.append(
            llama_bench_tg(a.llama_bench, a.model, a.threads, a.n_gpu_layers, a.bench_reps)))
        if lb:
            res["llama_bench_tg128"] = {"runs": lb, "mean": statistics.fmean(x for r in lb for x in r["tokens_per_s"])}
    if a.draft_bench and a.llama_bench:
        attempt(res, a, "draft_bench", lambda: draft_part(res, a))
    if a.draft_cost is not None:
        res["draft_cost"] = a.draft_cost
    res["projection"] = projections(res, a)
    res["seconds"] = round(time.time() - t0, 1)
    res["uptime_after"] = os.popen("uptime").read().strip()
    finish(res, a)


def finish(res: dict, a: argparse.Namespace) -> None:
    write(res, a.out)
    text = summary(res)
    a.out.with_suffix(".txt").write_text(text)
    print(text)
    print(f"wrote {a.out}")


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


def attempt(res: dict, a: argparse.Namespace, name: str, fn: Callable[[], object]) -> None:
    """One part; a failure is recorded (the other parts still run) and what exists is written."""
    try:
        fn()
    except Exception as e:  # a part that fails on one machine must not lose the others' figures
        res.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
        print(f"{name} failed: {e}", flush=True)
    write(res, a.out)


def cost_part(res: dict, settings, a: argparse.Namespace) -> None:
    res["cost"] = measure_cost(settings, [int(d) for d in a.depths.split(",")], K_MAX, a.reps)
    for cd in res["cost"]:
        print(f"cost depth {cd['depth']}: t1 {cd['t_ms'][0]:.3f} ms, c(k) "
              + " ".join(f"{k}:{v:.2f}" for k, v in cd["c"].items()), flush=True)
        print(f"  replayed (3rd step of a shape): t1 {cd['t_replay_ms'][0]:.3f} ms, c(k) "
              + " ".join(f"{k}:{v:.2f}" for k, v in cd["c_replay"].items()), flush=True)


def e2e_part(res: dict, settings, a: argparse.Namespace, temps: Sequence[float], accept: bool) -> None:
    res["e2e"], off = end_to_end(a, settings, temps)
    if accept and not a.zero_weights:
        res["accept_runs"] = [{"name": r["name"], "temperature": r["temperature"], "prompt": r["prompt"],
                               "ids": r["ids"], "match": matches(r["prompt"], r["ids"])} for r in off]


def draft_part(res: dict, a: argparse.Namespace) -> None:
    d = llama_bench_tg(a.llama_bench, a.draft_bench, a.threads, a.n_gpu_layers, a.bench_reps)
    res["draft_bench_tg128"] = d
    if "llama_bench_tg128" in res:
        res["draft_cost"] = res["llama_bench_tg128"]["mean"] / d["mean"]


def summary(res: dict) -> str:
    """A short text of the figures that answer the issue."""
    lines = [f"{Path(res['model']).name}  ({res['uptime_before']})"]
    for cd in res.get("cost", []):
        c = cd["c"]
        lines.append(f"verify cost, depth {cd['depth']}: t(1) {cd['t_ms'][0]:.3f} ms; c(k) = "
                     + ", ".join(f"{k}:{c[k]:.2f}" for k in (1, 2, 4, 8, 12, 16) if k in c))
    lb = res.get("llama_bench_tg128", {}).get("mean")
    e = res.get("e2e")
    if e:
        off, ng = e["off_tokens_per_s"], e["ngram_tokens_per_s"]
        rate = e["accepted"] / e["drafted"] if e["drafted"] else 0.0
        lines.append(f"engine tg: off {off:.2f} t/s, ngram {ng:.2f} t/s, ngram/off {e['ratio_ngram_off']:.3f} "
                     f"(drafted {e['drafted']}, accepted {e['accepted']} = {rate:.1%}); "
                     f"same output {sum(e['same_output'])}/{len(e['same_output'])}")
        if lb:
            lines.append(f"llama-bench tg128 {lb:.2f} t/s: off/llama-bench {off / lb:.3f}, "
                         f"ngram/llama-bench {ng / lb:.3f}")
    if "draft_cost" in res:
        lines.append(f"draft token cost / target step: {res['draft_cost']:.3f}")
    for depth, p in res.get("projection", {}).items():
        pub = p["published"]
        lines.append(f"depth {depth}: published rate {pub['rate']}: best k {pub['best_k']}, x{pub['best_speedup']:.2f} "
                     f"(with draft cost), x{p['published_ngram_free']['best_speedup']:.2f} (free guesses)")
        for name, w in p.get("shaped", {}).items():
            lines.append(f"  n-gram, shape-aware costs, k {'held' if name == 'held' else 'per step'}: "
                         f"x{w['speedup']:.3f} ({w['tokens_per_step']:.2f} tokens a step, "
                         f"{w['accepted']}/{w['drafted']} guesses accepted)")
        for key in ("own_outputs", "acceptance_of"):
            if key in p:
                s = p[key]
                lines.append(f"  n-gram on {key}: per-guess rate {s['per_guess_rate']:.3f}, with proposal "
                             f"{s['profile']['with_proposal']:.2f}, best k {s['best_k']} x{s['best_speedup']:.3f}, "
                             f"engine best_k {s['engine_best_k']}, engine policy x{s['engine_policy']['speedup']:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
