"""Aggregate generation of our continuous-batching engine against llama-batched-bench (issue 7).

Same model, same parallelism (npl), prompt (npp tokens per sequence, not shared: no -pps) and
generation length (ntg), one invocation, rounds alternating the two sides (ABBA).

llama-batched-bench (its definitions, which ours follow): all npl prompts of npp random tokens go
in one batch (split by n_batch), T_PP is that prefill, S_PP = npl×npp ÷ T_PP; then ntg steps each
decode one token for each of the npl sequences, T_TG is those steps, S_TG = npl×ntg ÷ T_TG. It
decodes random tokens and never samples. We run it as
``llama-batched-bench -m M -c C -b 2048 -ub 512 -fa on -npp P -ntg G -npl 1,2,4,8 -t T -ngl N
--output-format jsonl`` with C = max(npl) × (P + G rounded up to 256 cells): one KV stream per
sequence (its default, like ours).

Ours: one Engine with max(npl) slots per round (llama-batched-bench too allocates max(npl)
sequences for every npl), n_batch 2048, n_ubatch 512, flash attention; npl requests of npp random
token ids (ids below 1000 left out: the Tekken control tokens) are submitted at once (under the
engine's lock, so one step admits them all), each a raw completion with the engine's default
sampler, ``max_tokens = ntg + 1``, EOS banned (``Limits.ignore_eos``) and the watchdog's loop
detectors unable to fire (a real model fed random prompts repeats itself; the detectors still
run on every token). The first token is sampled from the prefill's logits, so ntg + 1 tokens
mean exactly ntg decode steps after the prefill, as llama-batched-bench's tg. From each stream's
Done timings:
T_PP = last first-token time − first submit, T_TG = last token − last first token (the end of the
prefill step); S_PP and S_TG as above. Every stream must generate exactly ntg + 1 tokens (checked).
Unlike llama-batched-bench, each step also samples npl tokens and runs the per-token logic
(watchdog, detokenizer) in Python: that is the cost measured.

Also npl = 1 through a one-slot Engine (the same limits; one KV stream, no prefix stream): what
the N-slot engine's extra streams and bookkeeping cost at one stream (N-slot/1-slot).

    python benchmarks/compare_batched.py --model M --llama-batched-bench .llama-tools/bin/llama-batched-bench \
        [--npl 1,2,4,8] [--npp 128] [--ntg 128] [--n-gpu-layers N] [--threads N] [--rounds 3] [--out JSON]
"""

from __future__ import annotations

# llama_cpp first: numpy or gguf loaded before llama_cpp makes a CUDA build segfault at model load;
# nothing imported here loads numpy
import llama_cpp  # isort: skip
from edge_magistral.engine import Engine  # isort: skip
from edge_magistral.generation import Done, Limits, LoadSettings  # isort: skip

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import cpu_name, gpu_info  # noqa: E402  (no numpy)
from compare_llama import QUIET, cpu_snapshot, order, others_busy, summarize  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "compare_batched.json"
CELLS = 256  # llama.cpp pads KV views to 256 cells; contexts here are multiples of it
FIRST_ID = 1000  # random prompt ids from here on: past Tekken's control tokens


# ------------------------------------------------------------------------ pure helpers (tested)

def per_seq_ctx(npp: int, ntg: int) -> int:
    """KV cells one sequence needs (prompt, generation, the extra sampled token), rounded up to 256."""
    return -(-(npp + ntg + 2) // CELLS) * CELLS


def batched_bench_cmd(exe: str, model: str, npl: list[int], npp: int, ntg: int, threads: int,
                      ngl: int, n_batch: int = 2048, n_ubatch: int = 512) -> list[str]:
    return [exe, "-m", model, "-c", str(max(npl) * per_seq_ctx(npp, ntg)), "-b", str(n_batch),
            "-ub", str(n_ubatch), "-fa", "on", "-npp", str(npp), "-ntg", str(ntg),
            "-npl", ",".join(map(str, npl)), "-t", str(threads), "-ngl", str(ngl), "--output-format", "jsonl"]


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|"
                  r"\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*$")


def parse_batched_bench(text: str) -> list[dict]:
    """llama-batched-bench's results: its jsonl lines (--output-format jsonl), else its markdown
    table (|PP|TG|B|N_KV|T_PP s|S_PP t/s|T_TG s|S_TG t/s|T s|S t/s|)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            r = json.loads(line)
            rows.append({k: r[k] for k in ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg")})
        elif m := _ROW.match(line):
            v = m.groups()
            rows.append({"pp": int(v[0]), "tg": int(v[1]), "pl": int(v[2]), "n_kv": int(v[3]),
                         "t_pp": float(v[4]), "speed_pp": float(v[5]), "t_tg": float(v[6]), "speed_tg": float(v[7])})
    return rows


def rates(streams: list[tuple[float, float, float, int]], npp: int, ntg: int) -> dict:
    """Our S_PP and S_TG from each stream's (submit time, ttft_s, generation_s, tokens generated),
    by llama-batched-bench's definitions (see the module docstring)."""
    npl = len(streams)
    first = [t0 + ttft for t0, ttft, _, _ in streams]
    last = [f + gen for f, (_, _, gen, _) in zip(first, streams)]
    t_pp = max(first) - min(t0 for t0, _, _, _ in streams)
    t_tg = max(last) - max(first)
    return {"pl": npl, "t_pp": t_pp, "speed_pp": npl * npp / t_pp, "t_tg": t_tg, "speed_tg": npl * ntg / t_tg,
            "tokens": [n for *_, n in streams], "complete": all(n == ntg + 1 for *_, n in streams)}


def paired_ratio(ours: list[float], theirs: list[float], others: list[float] | None = None) -> dict:
    """Round-paired ratios ours ÷ theirs: the median over the quiet rounds when at least two were
    quiet (``others``: per round, the share of the CPUs other processes used), else over all."""
    paired = [a / b for a, b in zip(ours, theirs)]
    quiet = [x for x, busy in zip(paired, others or []) if busy < QUIET]
    use_quiet = len(quiet) >= 2
    return {"ratio": statistics.median(quiet if use_quiet else paired) if paired else None,
            "ratio_basis": f"median of {len(quiet)} quiet rounds" if use_quiet else f"median of {len(paired)} rounds",
            "ratio_of_means": statistics.fmean(ours) / statistics.fmean(theirs) if ours and theirs else None,
            "ratio_rounds": [round(x, 4) for x in paired], "quiet_rounds": len(quiet)}


def table(ours: dict[int, list[dict]], theirs: dict[int, list[dict]], engine1: list[dict] | None = None,
          others: list[float] | None = None) -> list[dict]:
    """Per npl: both sides' S_TG and S_PP over the rounds and their round-paired ratios; at npl 1
    also the one-slot engine against both (``batch_vs_engine_tg``: N-slot/1-slot)."""
    rows = []
    for pl in sorted(set(ours) | set(theirs)):
        o, t = ours.get(pl, []), theirs.get(pl, [])
        row: dict = {"npl": pl}
        for key in ("speed_tg", "speed_pp"):
            so, st = [r[key] for r in o], [r[key] for r in t]
            row[key] = {"ours": summarize(so) if so else None, "llama": summarize(st) if st else None,
                        **paired_ratio(so, st, others)}
        if pl == 1 and engine1:
            se = [r["speed_tg"] for r in engine1]
            row["engine_speed_tg"] = summarize(se)
            row["engine_speed_pp"] = summarize([r["speed_pp"] for r in engine1])
            row["batch_vs_engine_tg"] = paired_ratio([r["speed_tg"] for r in o], se, others)["ratio"]
            row["engine_ratio_tg"] = paired_ratio(se, [r["speed_tg"] for r in t], others)["ratio"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- our engine

def limits(ntg: int, seed: int) -> Limits:
    return Limits(raw=True, think_budget=0, max_tokens=ntg + 1, seed=seed, ignore_eos=True)


def random_prompt(rng: random.Random, n_vocab: int, n: int) -> list[int]:
    lo = FIRST_ID if n_vocab > 4 * FIRST_ID else 0
    return [rng.randrange(lo, n_vocab) for _ in range(n)]


def done_of(events) -> Done:
    done = [ev for ev in events if isinstance(ev, Done)]
    if not done:
        raise RuntimeError("a stream ended without Done")
    return done[0]


def batch_run(b: Engine, npl: int, npp: int, ntg: int, rng: random.Random, tries: int = 3) -> dict:
    for attempt in range(tries):
        prompts = [random_prompt(rng, b.n_vocab, npp) for _ in range(npl)]
        seed = rng.randrange(1 << 30)
        t0 = time.monotonic()  # one step admits all npl requests
        streams = b.submit_all([(p, limits(ntg, seed + i)) for i, p in enumerate(prompts)])
        done = [done_of(s) for s in streams]
        r = rates([(t0, d.timings.ttft_s, d.timings.generation_s, d.usage.completion_tokens) for d in done],
                  npp, ntg)
        r["stop_reasons"] = sorted({d.stop_reason for d in done})
        r["cached_prompt_tokens"] = sum(d.timings.cached_prompt_tokens for d in done)
        r["attempts"] = attempt + 1
        if r["complete"]:
            return r
    raise RuntimeError(f"npl {npl}: streams stopped before {ntg + 1} tokens in {tries} tries: {r}")


def engine_run(e: Engine, npp: int, ntg: int, rng: random.Random, tries: int = 3) -> dict:
    for attempt in range(tries):
        t0 = time.monotonic()
        d = done_of(e.generate_ids(random_prompt(rng, e.n_vocab, npp), limits(ntg, rng.randrange(1 << 30))))
        r = rates([(t0, d.timings.ttft_s, d.timings.generation_s, d.usage.completion_tokens)], npp, ntg)
        r.update(stop_reasons=[d.stop_reason], cached_prompt_tokens=d.timings.cached_prompt_tokens,
                 attempts=attempt + 1)
        if r["complete"]:
            return r
    raise RuntimeError(f"1-slot engine: the stream stopped before {ntg + 1} tokens in {tries} tries: {r}")


def no_loop_stop(engine) -> None:
    """A benchmark must generate its ntg tokens: random prompts make a real model (SmolLM2) repeat
    itself, and the watchdog's loop detectors would end the stream. Their thresholds are set so they
    never fire; they still run on every token (their cost is measured)."""
    config = engine.watchdog_config

    def patched(limits: Limits, max_tokens: int):
        return dataclasses.replace(config(limits, max_tokens), loop_min_span=1 << 30,
                                   novelty_min_answer=0.0, novelty_min_thinking=0.0)
    engine.watchdog_config = patched


def warm_up(engine, rng: random.Random) -> None:
    """Like llama-batched-bench's 16-token warm-up decode."""
    list(engine.generate_ids(random_prompt(rng, engine.n_vocab, 16), limits(1, 0)))


def one_slot(settings: LoadSettings, npp: int, ntg: int, rng: random.Random) -> dict:
    """npl 1 through a one-slot engine (its own load: one KV stream, no prefix stream)."""
    e = Engine(dataclasses.replace(settings, n_slots=1))
    try:
        no_loop_stop(e)
        warm_up(e, rng)
        return engine_run(e, npp, ntg, rng)
    finally:
        e.close()  # its decoding thread ends here, with its OpenMP pool (see ours_round)


def ours_round(settings: LoadSettings, npls: list[int], npp: int, ntg: int, rng: random.Random,
               engine1: bool) -> tuple[dict[int, dict], dict | None, dict]:
    """One round of ours: the one-slot engine at npl 1 (unless ``engine1`` is off), then one
    engine of max(npl) slots at every npl. Each engine decodes on a thread of its own that ends
    at close: on a CPU build with OpenMP a thread that has decoded keeps its OpenMP pool while it
    lives, and decodes on any other thread then ran ~1.5x slower on a 2-core box (measured:
    6.4 -> 10.2 ms/token for SmolLM2), so nothing here decodes on the main thread."""
    e1 = one_slot(settings, npp, ntg, rng) if engine1 else None
    b = Engine(dataclasses.replace(settings, n_slots=max(npls)))
    try:
        info = {"n_ctx_total": llama_cpp.llama_n_ctx(b.ctx), "n_slots": b.n_slots}
        no_loop_stop(b)
        warm_up(b, rng)
        got = {pl: batch_run(b, pl, npp, ntg, rng) for pl in npls}
        info["max_active"] = b.stats.max_active
        info["prompt_tokens_reused"] = b.stats.prompt_tokens_reused
    finally:
        b.close()
    return got, e1, info


# ----------------------------------------------------------------------------------- the run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-batched-bench", required=True, help="path of the llama-batched-bench binary")
    ap.add_argument("--npl", default="1,2,4,8")
    ap.add_argument("--npp", type=int, default=128)
    ap.add_argument("--ntg", type=int, default=128)
    ap.add_argument("--n-gpu-layers", type=int, default=None, help="default: 99 with an NVIDIA GPU, else 0")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-engine", action="store_true", help="skip npl=1 through a one-slot engine")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--backend-sampling", choices=["auto", "on", "off"], default="auto",
                    help="our top-k on the device holding the logits (auto: when they are on a GPU)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    model = str(Path(a.model).resolve())
    exe = str(Path(a.llama_batched_bench).resolve())
    npls = sorted({int(x) for x in a.npl.split(",") if x.strip()})
    threads = a.threads or os.cpu_count() or 1
    ngl = a.n_gpu_layers if a.n_gpu_layers is not None else (99 if shutil.which("nvidia-smi") and gpu_info() else 0)
    settings = LoadSettings(model, n_ctx=per_seq_ctx(a.npp, a.ntg), n_gpu_layers=ngl, n_threads=threads,
                            n_threads_batch=threads, n_batch=2048, n_ubatch=512, flash_attn=True,
                            backend_sampling={"auto": None, "on": True, "off": False}[a.backend_sampling])
    rng = random.Random(a.seed)
    cmd = batched_bench_cmd(exe, model, npls, a.npp, a.ntg, threads, ngl)
    ours: dict[int, list[dict]] = {}
    theirs: dict[int, list[dict]] = {}
    engine1: list[dict] = []
    runs, our_info = [], {}
    t_start = time.time()
    busy: list[float] = []
    for i, side in enumerate(order(a.rounds)):
        load = os.getloadavg()
        snap = cpu_snapshot()
        t0 = time.monotonic()
        if side == "llama":
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            rows = parse_batched_bench(p.stdout + "\n" + p.stderr)
            if p.returncode != 0 or not rows:
                raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{(p.stderr + p.stdout)[-3000:]}")
            got = {r["pl"]: r for r in rows if r["pp"] == a.npp and r["tg"] == a.ntg}
            for pl, r in got.items():
                theirs.setdefault(pl, []).append(r)
        else:
            got, e1, our_info = ours_round(settings, npls, a.npp, a.ntg, rng, not a.no_engine)
            for pl, r in got.items():
                ours.setdefault(pl, []).append(r)
            if e1:
                engine1.append(e1)
        dt = time.monotonic() - t0
        busy.append(others_busy(snap, cpu_snapshot(), os.cpu_count() or 1))
        runs.append({"i": i, "side": side, "seconds": round(dt, 1), "loadavg_before": [round(x, 2) for x in load],
                     "others_busy": round(busy[-1], 3),
                     "speed_tg": {pl: round(r["speed_tg"], 2) for pl, r in got.items()},
                     "speed_pp": {pl: round(r["speed_pp"], 2) for pl, r in got.items()},
                     **({"engine_speed_tg": round(e1["speed_tg"], 2)} if side == "ours" and e1 else {})})
        print(f"[{i + 1}/{2 * a.rounds}] {side:5s} S_TG " +
              "  ".join(f"{pl}:{r['speed_tg']:.1f}" for pl, r in sorted(got.items())) +
              (f"  (1-slot: {e1['speed_tg']:.1f})" if side == "ours" and e1 else "") +
              f"  ({dt:.0f}s, load {load[0]:.2f}, others {100 * busy[-1]:.0f}% of the CPUs)", flush=True)
    per_round = [max(busy[2 * k], busy[2 * k + 1]) for k in range(a.rounds)]
    rows = table(ours, theirs, engine1, per_round)
    result = {
        "kind": "compare_batched",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "seconds": round(time.time() - t_start, 1),
        "command": shlex.join([sys.executable, *sys.argv]),
        "llama_batched_bench_command": shlex.join(cmd),
        "model": model, "model_name": Path(model).name,
        "settings": {"npl": npls, "npp": a.npp, "ntg": a.ntg, "is_pp_shared": False, "threads": threads,
                     "n_gpu_layers": ngl, "n_batch": 2048, "n_ubatch": 512, "flash_attn": True,
                     "ctx_per_seq": settings.n_ctx, "rounds": a.rounds,
                     "backend_sampling": a.backend_sampling, "eos": "banned (Limits.ignore_eos)",
                     "engines": "N-slot/1-slot", "ours": our_info},
        "rows": rows,
        "others_busy_rounds": [round(x, 3) for x in per_round],
        "raw": {"ours": ours, "llama": theirs, "engine_npl1": engine1},
        "system": {"host": platform.node(), "cpu_name": cpu_name(), "cpu_count": os.cpu_count(), "gpu": gpu_info()},
        "loadavg_end": list(os.getloadavg()),
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    for r in rows:
        tg = r["speed_tg"]
        extra = (f"; 1-slot engine {r['engine_speed_tg']['mean']:.1f} t/s "
                 f"(N-slot/1-slot {100 * r['batch_vs_engine_tg']:.1f}%)"
                 if "engine_speed_tg" in r else "")
        print(f"npl {r['npl']}: S_TG ours {tg['ours']['mean']:.1f}, llama-batched-bench {tg['llama']['mean']:.1f} t/s "
              f"→ {100 * tg['ratio']:.1f}% ({tg['ratio_basis']}){extra}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
