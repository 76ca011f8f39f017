#!/usr/bin/env python3
"""Peak memory of converting a checkpoint to GGUF, next to the checkpoint's and its largest tensor's size.

Conversion streams tensor by tensor, so its peak RSS should track the largest tensor (plus the
interpreter and tokenizer), not the model. This writes a synthetic Magistral-architecture
checkpoint of >= 2 GB (real Tekken vocabulary, random BF16 weights), converts it in a child process
for BF16 and for F16 output, and records each child's peak RSS (VmHWM: ru_maxrss would inherit the
parent's high-water mark across exec) together with a baseline child that only writes the
metadata (tokenizer included), which every conversion holds anyway.

    python benchmarks/build_memory.py [--layers 28] [--keep DIR]   # writes benchmarks/out/build_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from edge_magistral.build.checkpoint import open_checkpoint
from edge_magistral.build.tiny import TINY, make_tiny_checkpoint

OUT = Path(__file__).parent / "out" / "build_memory.json"

_CHILD_CONVERT = """
import sys
from pathlib import Path
from edge_magistral.build.checkpoint import open_checkpoint
from edge_magistral.build.convert import convert
convert(open_checkpoint(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""

_CHILD_BASELINE = """
import sys
import gguf
from pathlib import Path
from edge_magistral.build.checkpoint import open_checkpoint
from edge_magistral.build.convert import add_model_metadata, add_tokenizer_metadata
ckpt = open_checkpoint(sys.argv[1])
w = gguf.GGUFWriter(Path(sys.argv[2]), arch="llama")
add_model_metadata(w, ckpt.params, "baseline", "BF16")
add_tokenizer_metadata(w, ckpt.path, None)
w.write_header_to_file()
w.write_kv_data_to_file()
w.close()
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def child_peak_kib(code: str, *args: str) -> tuple[int, float]:
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]), time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    params = replace(TINY, dim=1024, n_layers=args.layers, head_dim=128, n_heads=8, n_kv_heads=2,
                     hidden_dim=8192)
    work = args.keep or Path(tempfile.mkdtemp(prefix="build-memory-"))
    try:
        t = time.monotonic()
        ckpt_dir = make_tiny_checkpoint(work / "ckpt", params, seed=1)
        made_s = time.monotonic() - t
        ckpt = open_checkpoint(ckpt_dir)
        largest = max(ckpt.tensors, key=lambda r: r.n_bytes)
        base_kib, _ = child_peak_kib(_CHILD_BASELINE, str(ckpt_dir), str(work / "baseline.gguf"))
        runs = {}
        for out_type in ("BF16", "F16"):
            kib, secs = child_peak_kib(_CHILD_CONVERT, str(ckpt_dir), str(work / f"m-{out_type}.gguf"), out_type)
            runs[out_type] = {"peak_rss_bytes": kib * 1024, "seconds": round(secs, 1),
                              "above_baseline_bytes": (kib - base_kib) * 1024}
            (work / f"m-{out_type}.gguf").unlink()
        result = {
            "checkpoint_bytes": ckpt.n_bytes,
            "n_params": ckpt.n_params,
            "largest_tensor": {"name": largest.name, "bytes": largest.n_bytes},
            "baseline_peak_rss_bytes": base_kib * 1024,
            "conversions": runs,
            "make_checkpoint_seconds": round(made_s, 1),
            "params": params.to_params_json(),
            "bench_own_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mib = 1024 * 1024
    print(f"checkpoint {result['checkpoint_bytes'] / mib:,.0f} MiB; largest tensor {largest.name} "
          f"{largest.n_bytes / mib:,.0f} MiB; baseline (tokenizer + interpreter) {base_kib / 1024:,.0f} MiB")
    for t, r in runs.items():
        above = r["above_baseline_bytes"]
        print(f"{t:5} peak RSS {r['peak_rss_bytes'] / mib:,.0f} MiB = baseline + {above / mib:,.0f} MiB "
              f"({above / largest.n_bytes:.2f}x the largest tensor, "
              f"{r['peak_rss_bytes'] / result['checkpoint_bytes']:.2f}x the checkpoint) in {r['seconds']} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
