"""Aggregate generation speed with 1, 2, 4, 8 concurrent streams (an Engine with that many slots)
against one stream through a one-slot Engine, same model, settings and prompts, side by side in
one run.

Aggregate tokens/s for N streams = all tokens generated ÷ (last token of any stream − first token
of any stream): prefill is left out, as llama-batched-bench's S_TG does. At 1 stream both sides are
one-slot engines (the same code): that row shows the noise between two loads. Writes
benchmarks/out/parallel_decode.json.

    python benchmarks/parallel_decode.py --model tiny-Q8_0.gguf [--n-gpu-layers 99] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

# edge_magistral.engine first (it loads llama_cpp): numpy or gguf loaded before llama_cpp makes a
# CUDA build segfault at model load; nothing above imports numpy
from edge_magistral.engine import Engine  # isort: skip
from edge_magistral.chat import Message
from edge_magistral.generation import Done, Limits, LoadSettings

OUT = Path(__file__).resolve().parent / "out" / "parallel_decode.json"


def limits(tokens: int, seed: int) -> Limits:
    """An answer without thinking, sampled and seeded; an early EOS ends a stream early (the
    figures count the tokens actually generated)."""
    return Limits(think_budget=0, max_tokens=tokens, seed=seed)


def prompts(engine: Engine, n: int) -> list[list[int]]:
    return [engine.prompt_ids([Message("user", f"Stream {i}: write a long story about the sea.")]) for i in range(n)]


def single_stream(settings: LoadSettings, tokens: int, repeat: int) -> dict:
    e = Engine(replace(settings, n_slots=1))
    try:
        list(e.generate_ids(prompts(e, 1)[0], limits(8, 0)))  # warm-up
        runs = [[ev for ev in e.generate_ids(prompts(e, 1)[0], limits(tokens, 1)) if isinstance(ev, Done)][0]
                for _ in range(repeat)]
        best = max(runs, key=lambda d: d.timings.tokens_per_s)
        return {"tokens": best.usage.completion_tokens, "tokens_per_s": best.timings.tokens_per_s,
                "runs_tokens_per_s": [round(d.timings.tokens_per_s, 1) for d in runs]}
    finally:
        e.close()


def parallel(settings: LoadSettings, n: int, tokens: int, repeat: int) -> dict:
    b = Engine(replace(settings, n_slots=n))
    try:
        list(b.submit(prompts(b, 1)[0], limits(8, 0)))  # warm-up
        runs = [_parallel_run(b, n, tokens) for _ in range(repeat)]
        best = max(runs, key=lambda r: r["aggregate_tokens_per_s"])
        best["runs_tokens_per_s"] = [round(r["aggregate_tokens_per_s"], 1) for r in runs]
        return best
    finally:
        b.close()


def _parallel_run(b: Engine, n: int, tokens: int) -> dict:
    ids = prompts(b, n)
    t_submit = time.monotonic()
    streams = [b.submit(p, limits(tokens, i + 1)) for i, p in enumerate(ids)]
    done = [[ev for ev in s if isinstance(ev, Done)][0] for s in streams]
    first = min(t_submit + d.timings.ttft_s for d in done)
    last = max(t_submit + d.timings.ttft_s + d.timings.generation_s for d in done)
    generated = sum(d.usage.completion_tokens for d in done)
    return {"streams": n, "tokens": generated, "seconds": last - first,
            "aggregate_tokens_per_s": (generated - n) / (last - first),  # first tokens excluded
            "per_stream_tokens_per_s": [round(d.timings.tokens_per_s, 1) for d in done],
            "max_active": b.stats.max_active}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per stream")
    ap.add_argument("--ctx", type=int, default=1024, help="context per stream")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per setting; the best counts (shared machines)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    settings = LoadSettings(a.model, n_ctx=a.ctx, n_gpu_layers=a.n_gpu_layers, n_threads=a.threads)
    base = single_stream(settings, a.tokens, a.repeat)
    print(f"1-slot engine: {base['tokens_per_s']:.1f} t/s")
    rows = []
    for n in (int(x) for x in a.streams.split(",")):
        r = parallel(settings, n, a.tokens, a.repeat)
        r["vs_single_stream"] = r["aggregate_tokens_per_s"] / base["tokens_per_s"]
        rows.append(r)
        print(f"{n} streams: {r['aggregate_tokens_per_s']:.1f} t/s aggregate ({r['vs_single_stream']:.2f}x)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "model": a.model, "n_gpu_layers": a.n_gpu_layers, "tokens_per_stream": a.tokens, "ctx_per_stream": a.ctx,
        "threads": settings.n_threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "single_stream": base, "parallel": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
