"""Markdown tables from the issue-7 JSON results: ours against llama.cpp's own tools.

Reads any mix of (files, or directories of *.json):
- compare_llama.py results (kind "compare_llama"): pp512/tg128 against llama-bench, per model/quant;
- compare_batched.py results (kind "compare_batched"): aggregate S_TG/S_PP against
  llama-batched-bench per parallelism;
- bandwidth.py results (kind "bandwidth"): copy bandwidth, for llama-bench tg128 as a percentage
  of the bandwidth floor (weights read per token ÷ bandwidth);
- plan-vs-GPU memory results (plan_vs_gpu.py: a list of scenarios with predicted_gpu and
  llama_cpp_gpu): predicted against measured GPU memory.

and writes one markdown document (stdout, or --out) with PASS/MISS against the targets:
pp ≥ 95% and tg ≥ 97% of llama-bench, aggregate generation at 2+ streams ≥ 90% of
llama-batched-bench, predicted memory within ±5% of measured.

    python benchmarks/results_md.py benchmarks/results/ [more.json ...] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"pp": 0.95, "tg": 0.97, "batched": 0.90, "memory": 0.05}
GIB = 1024 ** 3
MIB = 1024 ** 2


# ----------------------------------------------------------------------------- loading

def classify(obj) -> str | None:
    """Which result a loaded JSON value is (None: not one of ours)."""
    if isinstance(obj, dict) and obj.get("kind") in ("compare_llama", "compare_batched", "bandwidth"):
        return obj["kind"]
    if isinstance(obj, list) and obj and all(isinstance(r, dict) and "predicted_gpu" in r for r in obj):
        return "plan_vs_gpu"
    return None


def load(paths: list[str]) -> dict[str, list]:
    """{kind: [(file name, value), …]} from files and directories (not recursive)."""
    out: dict[str, list] = {"compare_llama": [], "compare_batched": [], "bandwidth": [], "plan_vs_gpu": []}
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    for f in files:
        try:
            obj = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        kind = classify(obj)
        if kind:
            out[kind].append((f.name, obj))
    return out


# ----------------------------------------------------------------------------- formatting

def verdict(value: float | None, target: float) -> str:
    return "n/a" if value is None else "PASS" if value >= target else "MISS"


def memory_verdict(error: float | None, tolerance: float = TARGETS["memory"]) -> str:
    return "n/a" if error is None else "PASS" if abs(error) <= tolerance else "MISS"


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def rate(s: dict | None) -> str:
    """A mean ± sd of tokens/s."""
    if not s:
        return "–"
    digits = 0 if s["mean"] >= 1000 else 1 if s["mean"] >= 10 else 2
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def size(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def seconds(s: dict | None) -> str:
    return "–" if not s else f"{s['mean']:.2f} s" if s["mean"] >= 0.1 else f"{1000 * s['mean']:.0f} ms"


def device_of(r: dict) -> str:
    """"gpu" when layers were offloaded on a box with an NVIDIA GPU, else "cpu"."""
    ngl = r.get("settings", {}).get("n_gpu_layers") or 0
    return "gpu" if ngl > 0 and (r.get("system") or {}).get("gpu") else "cpu"


def device_label(r: dict) -> str:
    s, sysinfo = r.get("settings", {}), r.get("system") or {}
    if device_of(r) == "gpu":
        gpus = (sysinfo.get("gpu") or {}).get("gpus") or [{}]
        return f"{gpus[0].get('name', 'GPU')} (ngl {s.get('n_gpu_layers')})"
    n = s.get("threads")
    return f"CPU, {n} thread{'' if n == 1 else 's'}"


def bandwidth_for(r: dict, bws: list[dict]) -> float | None:
    """The copy bandwidth (GB/s) of the device ``r`` ran on: a bandwidth result from the same
    host first, else any with that device."""
    dev = device_of(r)
    host = (r.get("system") or {}).get("host")
    ranked = sorted(bws, key=lambda b: b.get("host") != host)
    for b in ranked:
        v = (b.get(dev) or {}).get("copy_gbps")
        if v:
            return float(v)
    return None


# ----------------------------------------------------------------------------- the tables

def llama_rows(results: list[dict], bws: list[dict]) -> list[dict]:
    """One row per compare_llama result: the ratios, verdicts and % of the bandwidth floor."""
    rows = []
    for r in results:
        pp = next((v for k, v in r["tests"].items() if k.startswith("pp")), None)
        tg = next((v for k, v in r["tests"].items() if k.startswith("tg")), None)
        bw = bandwidth_for(r, bws)
        per_token = r.get("weights_read_bytes")
        floor = bw * 1e9 / per_token if bw and per_token else None
        ours = r.get("ours", {})
        mem = ours.get("gpu_bytes") if device_of(r) == "gpu" else ours.get("peak_rss_bytes")
        rows.append({
            "model": r.get("model_name", Path(r.get("model", "?")).name), "quant": r.get("quant", "?"),
            "device": device_label(r), "file_size": r.get("file_size"),
            "pp_name": next((k for k in r["tests"] if k.startswith("pp")), "pp"),
            "tg_name": next((k for k in r["tests"] if k.startswith("tg")), "tg"),
            "pp": pp, "tg": tg,
            "pp_verdict": verdict(pp and pp["ratio"], TARGETS["pp"]),
            "tg_verdict": verdict(tg and tg["ratio"], TARGETS["tg"]),
            "bandwidth_gbps": bw, "floor_tokens_per_s": floor,
            "llama_tg_of_floor": tg["llama"]["mean"] / floor if tg and floor else None,
            "ours_tg_of_floor": tg["ours"]["mean"] / floor if tg and floor else None,
            "ttft": ours.get("ttft_s") or {}, "load_s": ours.get("load_s"),
            "memory": mem["mean"] if mem else None,
            "memory_kind": "GPU" if device_of(r) == "gpu" else "peak RSS",
            "rounds": _rounds(tg),
        })
    return rows


def _rounds(test: dict | None) -> str:
    """"quiet/all" rounds behind a ratio (the rest had other processes busy on the machine)."""
    if not test or "ratio_rounds" not in test:
        return "–"
    return f"{test.get('quiet_rounds', '?')}/{len(test['ratio_rounds'])}"


def batched_rows(result: dict) -> list[dict]:
    rows = []
    for row in result["rows"]:
        tg, pp = row["speed_tg"], row["speed_pp"]
        rows.append({"npl": row["npl"], "tg": tg, "pp": pp, "rounds": _rounds(tg),
                     "verdict": verdict(tg["ratio"], TARGETS["batched"]) if row["npl"] >= 2 else "–",
                     "engine_tg": row.get("engine_speed_tg"), "batch_vs_engine": row.get("batch_vs_engine_tg"),
                     "engine_ratio": row.get("engine_ratio_tg")})
    return rows


def plan_rows(scenarios: list[dict]) -> list[dict]:
    rows = []
    for s in scenarios:
        pred = (s.get("predicted_gpu") or {}).get("total")
        meas = (s.get("llama_cpp_gpu") or {}).get("process_gpu_used")
        err = s.get("error_total_vs_process")
        if err is None and pred and meas:
            err = (pred - meas) / meas
        rows.append({"scenario": s.get("scenario"), "profile": s.get("profile"), "quant": s.get("quant"),
                     "n_ctx": s.get("n_ctx"), "kv": f"{s.get('type_k')}/{s.get('type_v')}",
                     "n_gpu_layers": s.get("n_gpu_layers"), "predicted": pred, "measured": meas, "error": err,
                     "verdict": memory_verdict(err) if s.get("fits", True) else "n/a"})
    return rows


def render(data: dict[str, list]) -> str:
    out = ["# Speed against llama.cpp's own tools (issue 7)", "",
           "Ours (edge-magistral's engine, llama-cpp-python 0.3.36) against llama-bench and llama-batched-bench "
           "built from the same vendored llama.cpp sources (benchmarks/build_llama_tools.sh), both sides measured "
           "in one invocation, rounds alternating (ABBA). Targets: pp512 ≥ 95% and tg128 ≥ 97% of llama-bench, "
           "aggregate generation at 2, 4, 8 streams ≥ 90% of llama-batched-bench, predicted GPU memory within ±5%.",
           ""]
    machines = _machines(data)
    if machines:
        out += ["## Machines", ""] + [f"- {m}" for m in machines] + [""]
    bws = [b for _, b in data["bandwidth"]]
    lr = llama_rows([r for _, r in data["compare_llama"]], bws)
    if lr:
        out += ["## Single stream: ours vs llama-bench", "",
                "| model | quant | device | file | pp ours t/s | pp llama-bench t/s | pp ratio | | "
                "tg ours t/s | tg llama-bench t/s | tg ratio | | llama-bench tg % of floor | ours % of floor | "
                "TTFT | load | memory (measured) | quiet rounds |",
                "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|"]
        for r in lr:
            ttft = ", ".join(f"{k}: {seconds(v)}" if v else f"{k}: skipped" for k, v in r["ttft"].items()) or "–"
            out.append(
                f"| {r['model']} | {r['quant']} | {r['device']} | {size(r['file_size'])} | "
                f"{rate(r['pp'] and r['pp']['ours'])} | "
                f"{rate(r['pp'] and r['pp']['llama'])} | {pct(r['pp'] and r['pp']['ratio'])} | {r['pp_verdict']} | "
                f"{rate(r['tg'] and r['tg']['ours'])} | {rate(r['tg'] and r['tg']['llama'])} | "
                f"{pct(r['tg'] and r['tg']['ratio'])} | {r['tg_verdict']} | {pct(r['llama_tg_of_floor'])} | "
                f"{pct(r['ours_tg_of_floor'])} | {ttft} | {seconds(r['load_s'])} | "
                f"{size(r['memory'])} {r['memory_kind'] if r['memory'] else ''} | {r['rounds']} |")
        out += ["", "pp/tg: mean ± sd over every rep of every round. Ratio: ours ÷ llama-bench, the median of the "
                "per-round ratios (each round runs both back to back), over the quiet rounds (other processes "
                "used < 15% of the CPUs during both runs) when at least two were quiet, else over all. "
                "Floor: the bandwidth ceiling, weights read per token (all tensors but the gathered token "
                "embedding; KV at tg128 depths left out, < 0.1%) ÷ measured copy bandwidth "
                "(benchmarks/bandwidth.py).", ""]
        for r in lr:
            if r["floor_tokens_per_s"]:
                out.append(f"- {r['model']} on {r['device']}: {r['bandwidth_gbps']:.1f} GB/s → at most "
                           f"{r['floor_tokens_per_s']:.1f} t/s")
        if any(r["floor_tokens_per_s"] for r in lr):
            out.append("")
    for _, res in data["compare_batched"]:
        s = res["settings"]
        where = f"GPU (ngl {s['n_gpu_layers']})" if s["n_gpu_layers"] else "CPU"
        bs = s.get("backend_sampling")
        on_device = bs == "on" or (bs == "auto" and s["n_gpu_layers"])
        topk = "" if bs is None else f", our top-k on the {'device' if on_device else 'host'}"
        out += [f"## Parallel streams: ours vs llama-batched-bench — {res['model_name']}, "
                f"{where}, {s['threads']} thread{'' if s['threads'] == 1 else 's'}{topk}", "",
                f"npp {s['npp']} (per sequence, not shared), ntg {s['ntg']}, {s['rounds']} rounds; "
                f"S_TG = npl × ntg ÷ T_TG and S_PP = npl × npp ÷ T_PP, as llama-batched-bench defines them. "
                f"EOS {s.get('eos', '')}.", "",
                "| npl | S_TG ours t/s | S_TG llama-batched-bench t/s | ratio | ≥ 90% | S_PP ours t/s | "
                "S_PP llama-batched-bench t/s | ratio | quiet rounds |",
                "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        brs = batched_rows(res)
        for r in brs:
            out.append(f"| {r['npl']} | {rate(r['tg']['ours'])} | {rate(r['tg']['llama'])} | {pct(r['tg']['ratio'])} | "
                       f"{r['verdict']} | {rate(r['pp']['ours'])} | {rate(r['pp']['llama'])} | "
                       f"{pct(r['pp']['ratio'])} | {r['rounds']} |")
        # results from before the one engine compared two engines (BatchEngine, Engine); now slots
        one, many = ("a one-slot engine", "the N-slot engine") if s.get("engines") else \
            ("the single-sequence Engine", "the BatchEngine")
        for r in brs:
            if r["engine_tg"]:
                out += ["", f"npl 1 through {one}: {rate(r['engine_tg'])} t/s "
                        f"({pct(r['engine_ratio'])} of llama-batched-bench; {many} at one stream is "
                        f"{pct(r['batch_vs_engine'])} of it)."]
        out.append("")
    for name, scenarios in data["plan_vs_gpu"]:
        out += [f"## GPU memory: planned vs measured ({name})", "",
                "| scenario | profile | quant | context | KV | GPU layers | predicted | measured | error | ±5% |",
                "|---|---|---|---:|---|---:|---:|---:|---:|---|"]
        for r in plan_rows(scenarios):
            out.append(f"| {r['scenario']} | {r['profile']} | {r['quant']} | {r['n_ctx']} | {r['kv']} | "
                       f"{r['n_gpu_layers']} | {size(r['predicted'])} | {size(r['measured'])} | "
                       f"{pct(r['error'], 2)} | {r['verdict']} |")
        out.append("")
    if bws:
        out += ["## Memory bandwidth", "", "| host | device | copy GB/s (read + write) | read GB/s | method |",
                "|---|---|---:|---:|---|"]
        for b in bws:
            for dev in ("gpu", "cpu"):
                d = b.get(dev)
                if d and "copy_gbps" in d:
                    what = d.get("name") if dev == "gpu" else f"{b.get('cpu_name')}, {d.get('threads')} threads"
                    out.append(f"| {b.get('host')} | {what} | {d['copy_gbps']:.1f} | {d.get('read_gbps', 0):.1f} | "
                               f"{d.get('method', '')} |")
        out.append("")
    cmds = _commands(data)
    if cmds:
        out += ["## Commands", "", "```"] + cmds + ["```", ""]
    return "\n".join(out)


def _machines(data: dict[str, list]) -> list[str]:
    seen: dict[str, str] = {}
    for kind in ("compare_llama", "compare_batched"):
        for _, r in data[kind]:
            s = r.get("system") or {}
            gpus = (s.get("gpu") or {}).get("gpus") or []
            gpu = "; ".join(f"{g.get('name')} (driver {g.get('driver')}, {g.get('memory')})" for g in gpus)
            lb = r.get("llama_bench") or {}
            text = (f"{s.get('host')}: {s.get('cpu_name')}, {s.get('cpu_count')} cores"
                    + (f"; {gpu}" if gpu else "")
                    + (f"; llama.cpp build {lb['build_commit']}" if lb.get("build_commit") else ""))
            seen.setdefault(s.get("host") or text, text)
    return list(seen.values())


def _commands(data: dict[str, list]) -> list[str]:
    cmds: list[str] = []
    for kind in ("compare_llama", "compare_batched"):
        for _, r in data[kind]:
            cmds.append(r.get("command", ""))
            if kind == "compare_llama":
                firsts = {run["side"]: run["cmd"] for run in reversed(r.get("runs", []))}
                cmds += [f"  # {side}: {c}" for side, c in sorted(firsts.items())]
            else:
                cmds.append(f"  # llama: {r.get('llama_batched_bench_command', '')}")
    return cmds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="JSON files or directories of them")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    ap.add_argument("--preamble", type=Path, default=None, help="markdown put before the generated tables")
    a = ap.parse_args()
    text = render(load(a.paths))
    if a.preamble:
        text = a.preamble.read_text().rstrip() + "\n\n" + text
    if a.out:
        a.out.write_text(text)
        print(f"wrote {a.out}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
