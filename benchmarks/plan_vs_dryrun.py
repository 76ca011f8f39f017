"""The planner's memory prediction against llama.cpp's dry run (no_alloc), over a wide grid, on CPU.

Writes every row and the worst/mean errors to benchmarks/out/plan_vs_dryrun.json.

    python benchmarks/plan_vs_dryrun.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_magistral.catalog import MAGISTRAL_SMALL_1_1, tensor_specs  # noqa: E402
from edge_magistral.dryrun import DryRunRequest, compare  # noqa: E402
from edge_magistral.shaped_gguf import write_shaped_gguf  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "plan_vs_dryrun.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    args = ap.parse_args()
    quants = (
        ["Q4_K_M", "Q8_0"] if args.quick else ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M"]
    )
    ctxs = [4096, 32768] if args.quick else [1024, 4096, 8192, 16384, 32768, 40960, 65536, 131072]
    with tempfile.TemporaryDirectory() as d:
        arch = MAGISTRAL_SMALL_1_1
        files = {q: write_shaped_gguf(Path(d) / f"{q}.gguf", arch, tensor_specs(arch, q), q) for q in quants}
        reqs = []
        for q, ctx, kv, ub in itertools.product(quants, ctxs, ["f16", "q8_0", "q4_0"], [256, 512]):
            reqs.append(DryRunRequest(str(files[q]), ctx, 0, kv, kv, True, 512, ub))
        for q, ctx in itertools.product(quants, ctxs):
            reqs.append(DryRunRequest(str(files[q]), ctx, 0, "f16", "f16", False))
        with ThreadPoolExecutor(max_workers=2) as ex:
            results = list(ex.map(compare, reqs))
    rows = [
        {
            "quant": Path(c.request.model_path).stem,
            "n_ctx": c.request.n_ctx,
            "kv": c.request.type_k,
            "flash_attn": c.request.flash_attn,
            "n_ubatch": c.request.n_ubatch,
            "predicted": c.predicted,
            "llama_cpp": c.llama_cpp,
            "error": c.errors(),
        }
        for c in results
    ]
    summary = {}
    for k in ("weights", "kv_cache", "compute", "total"):
        e = [abs(r["error"][k]) for r in rows]
        summary[k] = {"max_abs_pct": round(100 * max(e), 3), "mean_abs_pct": round(100 * sum(e) / len(e), 3)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"n": len(rows), "summary": summary, "rows": rows}, indent=1))
    print(json.dumps({"n": len(rows), "summary": summary}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
