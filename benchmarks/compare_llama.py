"""Our engine against llama.cpp's own llama-bench, same file, same settings, one invocation (issue 7).

Rounds alternate the two sides (ours, theirs, theirs, ours, ours, …: ABBA, so a drift in the
machine's load hits both alike). Each round runs

- llama-bench -m M -p 512 -n 128 -fa 1 -b 2048 -ub 512 -r R -o json -t T -ngl N
- edge-magistral bench --model M --json --reps R --threads T --n-gpu-layers N (a subprocess:
  python -m edge_magistral; llama_cpp never shares a process with numpy here)

with the threads and GPU layers of our planner's choice unless given (our first run tells them,
and llama-bench then gets the same). Both tools measure pp as one 512-token batch from an empty
cache and tg as 128 single-token decodes; llama-bench warms up and reuses one context per test,
our bench loads the model afresh for every rep and also samples each generated token with the
engine's sampler (what a real turn pays).

Writes JSON: per test (pp512, tg128) our mean/sd, llama-bench's mean/sd over all samples, the median
of the per-round (paired) ratios, over the rounds no other process disturbed where there are
enough of them (each run records how much of the machine's CPU other processes took meanwhile,
from /proc/stat), and the ratio of the means; our TTFT, load time and memory; the model's
file size, quant and bytes read per token (for the bandwidth floor); the machine and its load.

    python benchmarks/compare_llama.py --model M --llama-bench .llama-tools/bin/llama-bench \
        [--n-gpu-layers N] [--threads N] [--reps 3] [--rounds 3] [--out benchmarks/out/compare_llama.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import bytes_per_token, cpu_name, gpu_info  # noqa: E402  (no numpy, no llama_cpp)

OUT = Path(__file__).resolve().parent / "out" / "compare_llama.json"
TESTS = ("pp", "tg")


# ------------------------------------------------------------------------ pure helpers (tested)

def llama_bench_cmd(exe: str, model: str, pp: int, tg: int, reps: int, threads: int | None,
                    ngl: int | None, n_batch: int = 2048, n_ubatch: int = 512) -> list[str]:
    cmd = [exe, "-m", model, "-p", str(pp), "-n", str(tg), "-fa", "1", "-b", str(n_batch),
           "-ub", str(n_ubatch), "-r", str(reps), "-o", "json"]
    if threads:
        cmd += ["-t", str(threads)]
    if ngl is not None:
        cmd += ["-ngl", str(ngl)]
    return cmd


def our_bench_cmd(python: str, model: str, pp: int, tg: int, reps: int, threads: int | None,
                  ngl: int | None, ttft: str, ctx: int | None) -> list[str]:
    cmd = [python, "-m", "edge_magistral", "bench", "--model", model, "--json", "--reps", str(reps),
           "--pp", str(pp), "--tg", str(tg), "--ttft", ttft]
    if threads:
        cmd += ["--threads", str(threads)]
    if ngl is not None:
        cmd += ["--n-gpu-layers", str(ngl)]
    if ctx:
        cmd += ["--ctx", str(ctx)]
    return cmd


def parse_json_out(text: str):
    """The first JSON value that starts a line of a tool's stdout (llama-bench -o json prints an
    array; log lines before it are skipped)."""
    dec, pos = json.JSONDecoder(), 0
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped[:1] in ("[", "{"):
            try:
                return dec.raw_decode(text, pos + len(line) - len(stripped))[0]
            except json.JSONDecodeError:
                pass
        pos += len(line)
    raise ValueError(f"no JSON in the output: {text[:300]!r}")


def llama_bench_samples(rows: list[dict]) -> dict[str, list[float]]:
    """llama-bench's JSON rows → {"pp": [t/s per rep], "tg": [...]} (pp rows have n_gen 0)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        test = "pp" if r.get("n_gen", 0) == 0 else "tg" if r.get("n_prompt", 0) == 0 else None
        if test:
            out.setdefault(test, []).extend(float(x) for x in (r.get("samples_ts") or [r["avg_ts"]]))
    return out


def our_samples(result: dict) -> dict[str, list[float]]:
    return {"pp": list(result["pp_tokens_per_s"]["values"]), "tg": list(result["tg_tokens_per_s"]["values"])}


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": [round(v, 3) for v in values]}


QUIET = 0.15  # a round is quiet when other processes kept less than this share of the box's CPUs busy


def compare(ours: list[list[float]], theirs: list[list[float]], others: list[float] | None = None) -> dict:
    """Per-round sample lists of both sides → both summaries and the ratio ours ÷ theirs.

    Rounds ran back to back, so their ratios are paired: ``ratio`` is the median of the per-round
    ratios over the quiet rounds (``others``: per round, the largest share of the box's CPUs other
    processes used during either side's run; quiet below QUIET) when at least two were quiet, else
    over all rounds. ``ratio_of_means`` compares the means of all samples."""
    o = summarize([v for r in ours for v in r])
    t = summarize([v for r in theirs for v in r])
    paired = [statistics.fmean(a) / statistics.fmean(b) for a, b in zip(ours, theirs) if a and b]
    quiet = [x for x, busy in zip(paired, others or []) if busy < QUIET]
    use_quiet = len(quiet) >= 2
    return {"ours": o, "llama": t, "ratio": statistics.median(quiet if use_quiet else paired) if paired else None,
            "ratio_basis": f"median of {len(quiet)} quiet rounds" if use_quiet else f"median of {len(paired)} rounds",
            "ratio_of_means": o["mean"] / t["mean"], "ratio_rounds": [round(x, 4) for x in paired],
            "others_busy_rounds": [round(x, 3) for x in others or []], "quiet_rounds": len(quiet)}


# -------------------------------------------------------------- what else ran on the machine

def cpu_snapshot() -> tuple[float, float, float]:
    """(wall seconds, CPU seconds the whole machine was busy, CPU seconds of this process and its
    waited-for children): two snapshots tell how much CPU other processes took meanwhile."""
    import resource

    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(v[:3]) + sum(v[5:8])) / tick  # user nice system (idle iowait) irq softirq steal
    except (OSError, ValueError):
        busy = float("nan")
    own = sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for k in ("ru_utime", "ru_stime"))
    return time.monotonic(), busy, own


def others_busy(before: tuple[float, float, float], after: tuple[float, float, float], ncpu: int) -> float:
    """The share of the machine's CPUs (0..1) that other processes kept busy between two snapshots."""
    wall = after[0] - before[0]
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other / (wall * ncpu)) if wall > 0 else 0.0


def order(rounds: int) -> list[str]:
    """ABBA: ours first in round 0, theirs first in round 1, … ("ours", "llama" per slot)."""
    seq: list[str] = []
    for i in range(rounds):
        seq += ["ours", "llama"] if i % 2 == 0 else ["llama", "ours"]
    return seq


# ----------------------------------------------------------------------------------- machine

def system() -> dict:
    return {"host": platform.node(), "machine": platform.machine(), "cpu_name": cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "gpu": gpu_info()}


def run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[str, str, float]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout, p.stderr, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-bench", required=True, help="path of the llama-bench binary")
    ap.add_argument("--n-gpu-layers", type=int, default=None, help="default: our planner's, passed on to llama-bench")
    ap.add_argument("--threads", type=int, default=None, help="default: our planner's, passed on to llama-bench")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per round (llama-bench -r, our --reps)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both tools")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--ttft", default="1024,8192", help="our TTFT prompt lengths")
    ap.add_argument("--ctx", type=int, default=None, help="our context (default: our bench's)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs our bench")
    ap.add_argument("--timeout", type=int, default=1800, help="per tool run, seconds")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    model = str(Path(a.model).resolve())
    exe = str(Path(a.llama_bench).resolve())
    threads, ngl = a.threads, a.n_gpu_layers
    ours: list[list[dict]] = []
    samples = {"ours": {t: [] for t in TESTS}, "llama": {t: [] for t in TESTS}}
    llama_rows: list[dict] = []
    runs: list[dict] = []
    t_start = time.time()
    busy: list[float] = []
    for i, side in enumerate(order(a.rounds)):
        load = os.getloadavg()
        snap = cpu_snapshot()
        if side == "ours":
            cmd = our_bench_cmd(a.python, model, a.pp, a.tg, a.reps, threads, ngl, a.ttft, a.ctx)
            out, _, dt = run(cmd, a.timeout)
            r = parse_json_out(out)
            ours.append(r)
            threads = threads or r["settings"]["n_threads"]  # llama-bench gets what our planner chose
            ngl = r["settings"]["n_gpu_layers"] if ngl is None else ngl
            got = our_samples(r)
        else:
            cmd = llama_bench_cmd(exe, model, a.pp, a.tg, a.reps, threads, ngl)
            out, _, dt = run(cmd, a.timeout)
            rows = parse_json_out(out)
            llama_rows += rows
            got = llama_bench_samples(rows)
        for t in TESTS:
            samples[side][t].append(got.get(t, []))
        busy.append(others_busy(snap, cpu_snapshot(), os.cpu_count() or 1))
        runs.append({"i": i, "side": side, "cmd": shlex.join(cmd), "seconds": round(dt, 1),
                     "loadavg_before": [round(x, 2) for x in load], "others_busy": round(busy[-1], 3),
                     **{f"{t}_tokens_per_s": [round(x, 2) for x in got.get(t, [])] for t in TESTS}})
        print(f"[{i + 1}/{2 * a.rounds}] {side:5s} pp {statistics.fmean(got['pp']):9.1f} t/s  "
              f"tg {statistics.fmean(got['tg']):8.2f} t/s  ({dt:.0f}s, load {load[0]:.2f}, "
              f"others {100 * busy[-1]:.0f}% of the CPUs)", flush=True)
    last = ours[-1]
    per_round = [max(busy[2 * k], busy[2 * k + 1]) for k in range(a.rounds)]

    def stat_of(key: str):
        vals = [v for r in ours if r.get(key) for v in r[key]["values"]]
        return summarize(vals) if vals else None

    ttft: dict[str, dict | None] = {}
    for r in ours:
        for t in r["ttft"]:
            if t["seconds"]:
                ttft.setdefault(str(t["prompt_tokens"]), {"values": []})["values"] += t["seconds"]["values"]
            else:
                ttft.setdefault(str(t["prompt_tokens"]), None)
    lb = llama_rows[0] if llama_rows else {}
    result = {
        "kind": "compare_llama",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "seconds": round(time.time() - t_start, 1),
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": model, "model_name": Path(model).name,
        **{k: v for k, v in bytes_per_token(model).items() if k != "model"},
        "settings": {"threads": threads, "n_gpu_layers": ngl, "n_batch": 2048, "n_ubatch": 512, "flash_attn": True,
                     "pp": a.pp, "tg": a.tg, "reps": a.reps, "rounds": a.rounds,
                     "ours": last["settings"], "llama_bench_n_gpu_layers": lb.get("n_gpu_layers"),
                     "llama_bench_n_threads": lb.get("n_threads")},
        "tests": {f"pp{a.pp}": compare(samples["ours"]["pp"], samples["llama"]["pp"], per_round),
                  f"tg{a.tg}": compare(samples["ours"]["tg"], samples["llama"]["tg"], per_round)},
        "ours": {"load_s": stat_of("load_s"), "peak_rss_bytes": stat_of("peak_rss_bytes"),
                 "gpu_bytes": stat_of("gpu_bytes"),
                 "ttft_s": {k: summarize(v["values"]) if v else None for k, v in ttft.items()},
                 "notes": last.get("notes", []), "system_info": last.get("system_info")},
        "llama_bench": {k: lb.get(k) for k in ("build_commit", "cpu_info", "gpu_info", "backends", "model_type",
                                               "model_size", "model_n_params", "n_threads", "n_gpu_layers",
                                               "flash_attn", "type_k", "type_v", "poll")},
        "system": system(),
        "loadavg_end": list(os.getloadavg()),
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    for name, c in result["tests"].items():
        print(f"{name}: ours {c['ours']['mean']:.2f} ± {c['ours']['sd']:.2f}, llama-bench "
              f"{c['llama']['mean']:.2f} ± {c['llama']['sd']:.2f} t/s → {100 * c['ratio']:.1f}% "
              f"({c['ratio_basis']}; ratio of the means {100 * c['ratio_of_means']:.1f}%)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
