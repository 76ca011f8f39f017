"""The speed of two source trees of this project side by side, one invocation (for refactors).

Rounds alternate the two trees (before, after, after, before, …: ABBA, so a drift in the
machine's load hits both alike). Each run is

    python -m edge_magistral bench --model M --json --reps R --threads T --pp 512 --tg 128 --ttft 1024

in a subprocess whose ``PYTHONPATH`` starts with the tree and whose working directory is the tree
(``python -m`` puts the working directory first on ``sys.path``), so each side imports its own
``edge_magistral`` with the same interpreter, llama.cpp and model. Before measuring, each side's
child must report ``edge_magistral.__file__`` inside its tree, else the run is refused (an
installed copy that shadows the tree would compare a tree with itself). Without ``--threads`` or
``--n-gpu-layers`` the first run's planner choice is passed on to every later run of both sides.

Writes JSON (default benchmarks/out/before_after.json): per test (pp, tg) both sides' mean/sd and
the ratio after ÷ before, the median of the per-round (paired) ratios over the rounds no other
process disturbed where there are at least two of them (else over all), the ratio of the means;
the TTFT, the machine, each tree's directory and git commit (and whether it had uncommitted
changes), and the model.

    python benchmarks/before_after.py --model M --before /path/to/old/tree [--after .] \\
        [--reps 3] [--rounds 3] [--threads 2] [--out benchmarks/out/before_after.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llama import (  # noqa: E402  (no numpy, no llama_cpp)
    compare,
    cpu_snapshot,
    order,
    others_busy,
    our_bench_cmd,
    our_samples,
    parse_json_out,
    summarize,
    system,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "before_after.json"
TESTS = ("pp", "tg")
SIDES = {"ours": "before", "llama": "after"}  # compare_llama's ABBA order, renamed: before runs first
WHERE = "import edge_magistral; print(edge_magistral.__file__)"


# ------------------------------------------------------------------------ pure helpers (tested)

def tree_env(tree: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` with ``tree`` first on PYTHONPATH."""
    rest = base.get("PYTHONPATH")
    return {**base, "PYTHONPATH": str(tree) + (os.pathsep + rest if rest else "")}


def check_module_file(tree: Path, module_file: str) -> str | None:
    """Why ``module_file`` (a child's ``edge_magistral.__file__``) is not the tree's own package,
    or None when it is."""
    want = (tree / "edge_magistral").resolve()
    got = Path(module_file.strip()).resolve()
    if got.parent != want:
        return f"PYTHONPATH={tree} imports edge_magistral from {got}, not from {want}"
    return None


def side_order(rounds: int) -> list[str]:
    """ABBA: before first in round 0, after first in round 1, …"""
    return [SIDES[s] for s in order(rounds)]


def paired(after: list[list[float]], before: list[list[float]], others: list[float] | None = None) -> dict:
    """Per-round samples of both sides → both summaries and the ratio after ÷ before (see
    compare_llama.compare: the median of the paired per-round ratios, over the quiet rounds when
    at least two were quiet)."""
    c = compare(after, before, others)
    return {"before": c.pop("llama"), "after": c.pop("ours"), **c}


def ttft_of(results: list[dict]) -> dict[str, dict | None]:
    """Each prompt length's TTFT over the runs of one side (None where it did not fit)."""
    values: dict[str, list[float] | None] = {}
    for r in results:
        for t in r.get("ttft", []):
            key = str(t["prompt_tokens"])
            if t["seconds"]:
                values[key] = (values.get(key) or []) + list(t["seconds"]["values"])
            else:
                values.setdefault(key, None)
    return {k: summarize(v) if v else None for k, v in values.items()}


# ------------------------------------------------------------------------------- the trees

def git_info(tree: Path) -> dict:
    """The tree's commit and whether it has uncommitted changes (None where it is no git tree)."""
    def git(*args: str) -> str | None:
        p = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def verify_tree(python: str, tree: Path, env: dict[str, str]) -> str:
    """The child's ``edge_magistral.__file__``; exits when it is not the tree's own."""
    p = subprocess.run([python, "-c", WHERE], capture_output=True, text=True, env=env, cwd=tree, timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"{tree}: edge_magistral does not import:\n{p.stderr[-2000:]}")
    why = check_module_file(tree, p.stdout.strip().splitlines()[-1])
    if why:
        raise SystemExit(f"refused: {why}")
    return p.stdout.strip().splitlines()[-1]


def run_bench(cmd: list[str], tree: Path, env: dict[str, str], timeout: int) -> tuple[dict, float]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=timeout)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"(in {tree}) {shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return parse_json_out(p.stdout), dt


# ----------------------------------------------------------------------------------- the run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--before", type=Path, required=True, help="the source tree before the change")
    ap.add_argument("--after", type=Path, default=ROOT, help="the source tree after it (default: this one)")
    ap.add_argument("--threads", type=int, default=None, help="default: the planner's, from the first run")
    ap.add_argument("--n-gpu-layers", type=int, default=None, help="default: the planner's, from the first run")
    ap.add_argument("--reps", type=int, default=3, help="loads per run (our bench's --reps)")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds (each runs both trees)")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--ttft", default="1024", help="TTFT prompt lengths")
    ap.add_argument("--ctx", type=int, default=None, help="the context (default: the bench's)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter both sides run in")
    ap.add_argument("--timeout", type=int, default=1800, help="per run, seconds")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    model = str(Path(a.model).resolve())
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    envs = {side: tree_env(tree, dict(os.environ)) for side, tree in trees.items()}
    module_files = {side: verify_tree(a.python, tree, envs[side]) for side, tree in trees.items()}
    threads, ngl = a.threads, a.n_gpu_layers
    samples: dict[str, dict[str, list[list[float]]]] = {s: {t: [] for t in TESTS} for s in trees}
    results: dict[str, list[dict]] = {s: [] for s in trees}
    runs, busy = [], []
    t_start = time.time()
    for i, side in enumerate(side_order(a.rounds)):
        load = os.getloadavg()
        snap = cpu_snapshot()
        cmd = our_bench_cmd(a.python, model, a.pp, a.tg, a.reps, threads, ngl, a.ttft, a.ctx)
        r, dt = run_bench(cmd, trees[side], envs[side], a.timeout)
        threads = threads or r["settings"]["n_threads"]  # both sides get the first run's choice
        ngl = r["settings"]["n_gpu_layers"] if ngl is None else ngl
        results[side].append(r)
        got = our_samples(r)
        for t in TESTS:
            samples[side][t].append(got[t])
        busy.append(others_busy(snap, cpu_snapshot(), os.cpu_count() or 1))
        runs.append({"i": i, "side": side, "cmd": shlex.join(cmd), "seconds": round(dt, 1),
                     "loadavg_before": [round(x, 2) for x in load], "others_busy": round(busy[-1], 3),
                     **{f"{t}_tokens_per_s": [round(x, 2) for x in got[t]] for t in TESTS}})
        print(f"[{i + 1}/{2 * a.rounds}] {side:6s} pp {statistics.fmean(got['pp']):9.1f} t/s  "
              f"tg {statistics.fmean(got['tg']):8.2f} t/s  ({dt:.0f}s, load {load[0]:.2f}, "
              f"others {100 * busy[-1]:.0f}% of the CPUs)", flush=True)
    per_round = [max(busy[2 * k], busy[2 * k + 1]) for k in range(a.rounds)]
    sizes = {"pp": a.pp, "tg": a.tg}
    result = {
        "kind": "before_after",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "seconds": round(time.time() - t_start, 1),
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": model, "model_name": Path(model).name,
        "trees": {s: {"dir": str(trees[s]), "module_file": module_files[s], **git_info(trees[s])} for s in trees},
        "settings": {"threads": threads, "n_gpu_layers": ngl, "pp": a.pp, "tg": a.tg, "ttft": a.ttft,
                     "reps": a.reps, "rounds": a.rounds, "ctx": a.ctx,
                     "bench": {s: results[s][-1]["settings"] for s in trees}},
        "tests": {f"{t}{sizes[t]}": paired(samples["after"][t], samples["before"][t], per_round) for t in TESTS},
        "ttft_s": {s: ttft_of(results[s]) for s in trees},
        "load_s": {s: summarize([v for r in results[s] for v in r["load_s"]["values"]]) for s in trees},
        "system": system(),
        "loadavg_end": list(os.getloadavg()),
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    for name, c in result["tests"].items():
        print(f"{name}: before {c['before']['mean']:.2f} ± {c['before']['sd']:.2f}, after "
              f"{c['after']['mean']:.2f} ± {c['after']['sd']:.2f} t/s → after/before {c['ratio']:.3f} "
              f"({c['ratio_basis']}; ratio of the means {c['ratio_of_means']:.3f})")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
