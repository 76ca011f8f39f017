#!/usr/bin/env python3
"""Speculative decoding end to end at a set acceptance rate (issue 13).

A Magistral-shaped GGUF with zero weights (``gpu_run.sh direct``) costs per step what the real
model costs, but its own output says nothing about acceptance. So here the guesses are scripted:
each proposal the engine asks for is replaced by the plain run's own next tokens, each kept with
probability ``rate`` while the ones before it were kept (the per-guess, geometric acceptance that
published figures describe) and the first one dropped replaced by a wrong token, as are the rest.
The guess source still does its work (a draft model's decodes cost what they cost); only its
tokens are replaced. Everything else is the engine as shipped: the choice of k or of the held
width, the verify steps, sampling every row, removing rejected guesses from the KV cache. Turns
are sampled with a seed per prompt (temperature 0.7), so a speculative run must give exactly the
plain run's tokens (``same_output``); greedy would not do: a zero-weight model's greedy output is
one token repeated, which the watchdog stops as a loop.

Modes, each a fresh engine per round (rounds alternate the order), the same prompts:
  off          plain decoding, the baseline; llama-bench tg128 on the same file beside it
  ngram-held   model-free guesses, the width held (speculate_hold, the default on a GPU)
  ngram-free   the same, k chosen step by step (the batch's shape changes)
  draft-held   a draft model's guesses (``--draft``), the width held
  draft-free   the same, k chosen step by step
Each (mode, rate) starts with one untimed turn, so the engine's measured costs and held width
are those of an engine that has been running (a service), then times ``--prompts`` turns.

    python benchmarks/speculate_at_rate.py --model M.gguf --n-gpu-layers 99 --draft D.gguf \\
        --llama-bench llama-bench --rates 0.6,0.7,0.8 --out benchmarks/out/speculate_at_rate.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama_cpp  # noqa: E402,F401,I001  first, before numpy (see edge_magistral/model.py)

from engine_overhead import in_own_thread  # noqa: E402  (a thread per run: its OpenMP pool goes with it)
from speculate import PROMPTS, llama_bench_tg  # noqa: E402

MODES = ("off", "ngram-held", "ngram-free", "draft-held", "draft-free")


class Scripted:
    """A guess source whose proposals are the known continuation ``script`` (prompt + output),
    each guess right with probability ``rate`` given the ones before it were, then wrong."""

    def __init__(self, inner, script: Sequence[int], at: int, rate: float, rng: random.Random, n_vocab: int):
        self.inner, self.script, self.at = inner, script, at
        self.rate, self.rng, self.n_vocab = rate, rng, n_vocab
        self.cheap = inner.cheap

    def push(self, token: int) -> None:
        self.inner.push(token)
        self.at += 1

    def propose(self, k: int) -> list[int]:
        self.inner.propose(k)  # the source's own work (a draft model's decodes), its tokens unused
        out, right = [], True
        for i in range(k):
            true = self.script[self.at + i] if self.at + i < len(self.script) else 0
            right = right and self.at + i < len(self.script) and self.rng.random() < self.rate
            out.append(true if right else (true + 1) % self.n_vocab)
        return out

    def guess_cost(self, t1: float | None) -> float:
        return self.inner.guess_cost(t1)

    def release(self) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None:
            release()


def mode_settings(settings, mode: str, draft: str | None, draft_ngl: int):
    if mode == "off":
        return replace(settings, speculate="off")
    source, how = mode.split("-")
    s = replace(settings, speculate=source, speculate_hold=how == "held")
    return replace(s, draft_model=draft, draft_gpu_layers=draft_ngl) if source == "draft" else s


def run_mode(settings, mode: str, rates: Sequence[float], prompts: Sequence[list[int]], scripts: dict,
             max_tokens: int, a: argparse.Namespace) -> dict:
    """One engine in ``mode``: per rate, an untimed turn, then every prompt; tokens/s and counts."""
    from edge_magistral.engine import Engine
    from edge_magistral.generation import Done, Limits

    engine = Engine(mode_settings(settings, mode, a.draft, a.n_gpu_layers))
    out: dict = {}
    try:
        # seeded sampling: the same tokens with and without guesses, and no loop for the watchdog to
        # stop (a zero-weight model's greedy output is one token repeated)
        limits = Limits(max_tokens=max_tokens, temperature=0.7, raw=True, ignore_eos=True)
        for rate in rates if mode != "off" else [None]:
            if rate is not None:
                rng, orig = random.Random(1), type(engine)._speculator

                def scripted(prompt, lim, orig=orig, rate=rate, rng=rng):
                    spec = orig(engine, prompt, lim)
                    if spec is not None:
                        spec.draft = Scripted(spec.draft, scripts[tuple(prompt)], len(prompt), rate, rng,
                                              engine.n_vocab)
                    return spec
                engine._speculator = scripted
            runs = []
            for i, prompt in enumerate([prompts[0], *prompts]):
                seeded = replace(limits, seed=1000 + max(i - 1, 0))
                done = [ev for ev in engine.generate_ids(prompt, seeded) if isinstance(ev, Done)][-1]
                ids = list(engine._kept)  # prompt + output but its last token
                if i:  # the first is the untimed turn
                    runs.append({"ids": ids, "s": done.timings.generation_s, "tokens": done.usage.completion_tokens,
                                 "drafted": done.timings.drafted_tokens, "accepted": done.timings.accepted_tokens})
            out[str(rate)] = {"tokens_per_s": sum(r["tokens"] for r in runs) / sum(r["s"] for r in runs),
                              "tokens": sum(r["tokens"] for r in runs),
                              "drafted": sum(r["drafted"] for r in runs), "accepted": sum(r["accepted"] for r in runs),
                              "ids": [r["ids"] for r in runs], "held_width": engine.verify_cost.width}
        return out
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft", default=None, help="a draft GGUF with the same vocabulary (the draft modes)")
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rates", default="0.6,0.7,0.8")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "speculate_at_rate.json")
    ap.add_argument("--predict", type=Path, default=None,
                    help="speculate.py's JSON with a cost part: only add what its costs predict to --out")
    a = ap.parse_args()
    if a.predict:
        res = json.loads(a.out.read_text())
        res["predicted_over_off"] = predict(a.predict, [float(r) for r in a.rates.split(",")])
        res["predicted_from"] = str(a.predict)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["predicted_over_off"], indent=1))
        return
    from edge_magistral.generation import LoadSettings
    from edge_magistral.model import LoadedModel

    rates = [float(r) for r in a.rates.split(",")]
    modes = [m for m in a.modes.split(",") if a.draft or not m.startswith("draft")]
    settings = LoadSettings(a.model, n_ctx=2048, n_gpu_layers=a.n_gpu_layers, n_threads=a.threads)
    probe = in_own_thread(lambda: LoadedModel(replace(settings, n_gpu_layers=0)))  # its tokenizer only
    prompts = [probe.raw_prompt_ids(text) for _, text in PROMPTS[:a.prompts]]
    in_own_thread(probe.close)
    t0 = time.time()
    # the plain runs' outputs are the scripts the guesses come from (seeded: every run makes them)
    first = in_own_thread(lambda: run_mode(settings, "off", rates, prompts, {}, a.max_tokens, a))
    scripts = {tuple(p): ids for p, ids in zip(prompts, first["None"]["ids"])}
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    lb = None
    for r in range(a.rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            got = in_own_thread(lambda m=m: run_mode(settings, m, rates, prompts, scripts, a.max_tokens, a))
            rounds[m].append(got)
            print(f"round {r} {m:10s} " + "  ".join(f"{k}: {v['tokens_per_s']:.1f} t/s" for k, v in got.items()),
                  flush=True)
        lb = lb or (llama_bench_tg(a.llama_bench, a.model, a.threads, a.n_gpu_layers, 3) if a.llama_bench else None)
        save(summarize(rounds, scripts, prompts, rates), lb, a, t0)  # after every round: a cut run keeps them


def save(res: dict, lb: dict | None, a: argparse.Namespace, t0: float) -> None:
    if lb:
        res["llama_bench_tg128"] = lb
        for row in res["rows"]:
            row["over_llama_bench"] = round(row["tokens_per_s"] / lb["mean"], 4)
    res.update({"command": shlex.join([sys.executable, *sys.argv]), "seconds": round(time.time() - t0, 1),
                "settings": {k: str(v) for k, v in vars(a).items()}})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res), flush=True)
    a.out.with_suffix(".txt").write_text(table(res) + "\n")


def predict(costs: Path, rates: Sequence[float], n: int = 160, outputs: int = 20) -> dict:
    """What the shape-aware cost model of ``speculate.py`` (its cost part's JSON) predicts for these
    runs: both policies walked over ``outputs`` random outputs of ``n`` tokens with scripted guesses,
    at each measured depth; to set beside the measured ratios (``over_off``)."""
    from speculate import Speculator, VerifyCost, combine, policy_walk, shape_costs, slope

    out: dict = {}
    for cd in json.loads(costs.read_text())["cost"]:
        for key in ("t_ms", "t_switch_ms", "t_replay_ms", "c"):
            cd[key] = {int(k): v for k, v in cd[key].items()}
        cost, row = shape_costs(cd), {}
        for rate in rates:
            rng = random.Random(1)
            held = VerifyCost()
            held.steady = {k + 1: v / cd["t_replay_ms"][0] for k, v in cd["t_replay_ms"].items()}
            for name in ("free", "held"):
                walks = []
                for _ in range(outputs):
                    prompt, output = [1, 2, 3], [rng.randrange(1000, 2000) for _ in range(n)]
                    vc = held if name == "held" else VerifyCost(fixed=slope(cd["c"]))
                    spec = Speculator(prompt, vc, hold=name == "held")
                    spec.draft = Scripted(spec.draft, prompt + output, len(prompt), rate, rng, 4000)
                    walks.append(policy_walk(prompt, output, spec, cost))
                row[f"ngram-{name} {rate}"] = round(combine(walks).speedup, 4)
        out[str(cd["depth"])] = row
    return out


def summarize(rounds: dict, scripts: dict, prompts: Sequence[list[int]], rates: Sequence[float]) -> dict:
    """Each (mode, rate): the best round's tokens/s (a shared machine stalls at times), its ratio
    to the best plain round, the acceptance reached and whether the tokens were the plain run's."""
    base = max(r["None"]["tokens_per_s"] for r in rounds["off"]) if rounds.get("off") else None
    rows = []
    for mode, rs in rounds.items():
        for key in rs[0]:
            best = max((r[key] for r in rs), key=lambda v: v["tokens_per_s"])
            same = all(ids == scripts[tuple(p)] for r in rs for ids, p in zip(r[key]["ids"], prompts))
            rows.append({"mode": mode, "rate": None if key == "None" else float(key),
                         "tokens_per_s": round(best["tokens_per_s"], 2),
                         "rounds_tokens_per_s": [round(r[key]["tokens_per_s"], 2) for r in rs],
                         "over_off": round(best["tokens_per_s"] / base, 4) if base else None,
                         "tokens": best["tokens"], "drafted": best["drafted"], "accepted": best["accepted"],
                         "accepted_share": round(best["accepted"] / best["drafted"], 4) if best["drafted"] else None,
                         "held_width_after": best["held_width"], "same_output": same})
    return {"rates": list(rates), "rows": rows,
            "median_round_spread": statistics.median(
                [max(r["rounds_tokens_per_s"]) / min(r["rounds_tokens_per_s"]) for r in rows])}


def table(res: dict) -> str:
    lines = ["| mode | rate | t/s | ÷ off | ÷ llama-bench tg128 | tokens | accepted/drafted | width after "
             "| same tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['mode']} | {r['rate'] if r['rate'] is not None else '–'} | {r['tokens_per_s']} | "
                     f"{r['over_off']} | {r.get('over_llama_bench', '–')} | {r['tokens']} | "
                     f"{r['accepted']}/{r['drafted']} | "
                     f"{r['held_width_after']} | {r['same_output']} |")
    if "llama_bench_tg128" in res:
        lines.append(f"\nllama-bench tg128: {res['llama_bench_tg128']['mean']:.2f} t/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
