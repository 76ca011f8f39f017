#!/usr/bin/env python3
"""Engine speed against a bare llama-cpp-python ``Llama.generate`` loop, side by side in one run.

Both load the same model with the same settings (a one-slot Engine; the bare loop drives that
engine's own ``Llama`` while the engine is idle) and sample with the same sampler (top-k 40,
top-p 0.95, temperature 0.7, fixed seed) from the same prompt. Every run loads the model afresh
and decodes on a thread that ends with it: a fresh context needs no KV clearing, and on a CPU
build with OpenMP a thread that has decoded keeps its OpenMP pool while it lives, which slowed
decodes on any other thread ~1.5x on 2 cores (so no run may leave one behind for the next). Each
run first decodes a few tokens from the prompt (warm-up); the measured turn then starts from the
prompt in the KV cache either way. The engine adds its per-token work (native sampler call,
incremental detokenizer, watchdog, events) and its decoding thread. Generation speed excludes
the first token (prefill). Runs alternate baseline/engine to share the machine's noise. Also
reports the watchdog's own cost per token in microseconds.

    python benchmarks/engine_overhead.py --model M.gguf [--lengths 128,8192] [--n-gpu-layers 99]
    # writes benchmarks/out/engine_overhead.json (or --out)

Target: engine >= 97% of the bare loop at every length, and no fall with output length.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_magistral.chat import Message  # noqa: E402
from edge_magistral.engine import Engine  # noqa: E402  (loads llama_cpp before numpy)
from edge_magistral.generation import Done, Limits, LoadSettings  # noqa: E402
from edge_magistral.gguf_info import read_info  # noqa: E402
from edge_magistral.watchdog import per_token_cost_us  # noqa: E402

OUT = Path(__file__).parent / "out" / "engine_overhead.json"
SEED = 1234
PROMPT = [Message("user", "Write a very long story about a lighthouse keeper.")]
WARM_UP = 4  # tokens decoded before each measured run


def in_own_thread(fn):
    """fn() on a thread that ends with it (its OpenMP pool goes with it); re-raises its error."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=target, name="bare-loop")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def bare_generate(engine: Engine, prompt: list[int], n: int) -> float:
    """tokens/s of a bare Llama.generate loop over the engine's model (first token excluded)."""
    llm = engine.llm
    gen = llm.generate(prompt, top_k=40, top_p=0.95, min_p=0.0, temp=0.7, repeat_penalty=1.0)
    t_first = None
    count = 0
    for _ in gen:
        count += 1
        if count == 1:
            t_first = time.perf_counter()
        if count >= n:
            break
    gen.close()
    return (count - 1) / (time.perf_counter() - t_first)


def run_baseline(settings: LoadSettings, n: int) -> float:
    """A fresh load; the bare loop on a thread of its own (the engine's thread stays idle)."""
    engine = Engine(settings)
    try:
        prompt = engine.prompt_ids(PROMPT)

        def loop() -> float:
            bare_generate(engine, prompt, WARM_UP)
            return bare_generate(engine, prompt, n)  # llama-cpp-python keeps the prompt's KV
        return in_own_thread(loop)
    finally:
        engine.close()


def run_engine(settings: LoadSettings, n: int) -> tuple[float, int, float]:
    """A fresh load: the engine's tokens/s (its own timing: first token excluded), the tokens it
    generated and its load time."""
    engine = Engine(settings)
    try:
        prompt = engine.prompt_ids(PROMPT)
        list(engine.generate_ids(prompt, Limits(think_budget=0, max_tokens=WARM_UP)))
        limits = Limits(think_budget=0, max_tokens=n, temperature=0.7, top_p=0.95, top_k=40, seed=SEED)
        done = [ev for ev in engine.generate_ids(prompt, limits) if isinstance(ev, Done)][0]
        return done.timings.tokens_per_s, done.usage.completion_tokens, engine.load_s
    finally:
        engine.close()  # its decoding thread ends here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", default="128,8192")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    settings = LoadSettings(args.model, n_ctx=max(lengths) + 512, n_gpu_layers=args.n_gpu_layers,
                            n_threads=args.threads, flash_attn=True)
    rows, loads = [], []
    for n in lengths:
        base, eng, counts = [], [], []
        for _ in range(args.repeats):
            base.append(run_baseline(settings, n))
            tps, count, load_s = run_engine(settings, n)
            eng.append(tps)
            counts.append(count)
            loads.append(load_s)
        b, e = statistics.median(base), statistics.median(eng)
        rows.append({"tokens": n, "baseline_tps": b, "engine_tps": e, "ratio": e / b,
                     "baseline_runs": base, "engine_runs": eng, "engine_tokens": counts})
        print(f"{n:>6} tokens: bare generate {b:8.1f} t/s, engine {e:8.1f} t/s, ratio {e / b:.3f}"
              f"  (engine generated {counts})", flush=True)
    ids = [int(x) for x in random.Random(SEED).choices(range(1000, read_info(args.model).n_vocab), k=20000)]
    wd_us = per_token_cost_us(ids)  # varied ids: every token takes the full path, no loop ends it
    print(f"watchdog: {wd_us:.2f} us/token")
    result = {"model": args.model, "n_gpu_layers": args.n_gpu_layers, "threads": args.threads or os.cpu_count(),
              "rows": rows, "watchdog_us_per_token": wd_us, "load_s": statistics.median(loads),
              "fresh_load_per_run": True, "system_info": _system_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


if __name__ == "__main__":
    main()
