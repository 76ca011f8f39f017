#!/usr/bin/env python3
"""Logit error of each quantization of the tiny Magistral, and llama.cpp's parity with a numpy reference.

Builds the tiny checkpoint (random weights, seeded), converts it to F32 and F16 GGUFs, quantizes the
F16 to Q8_0, Q6_K, Q5_K_M and Q4_K_M with llama.cpp's quantizer, and measures relative logit error
``||a - b|| / ||b||`` over every position of a fixed set of token sequences:

- F32 GGUF in llama.cpp vs the numpy reference forward pass (tests/reference_forward.py), with an
  F32 KV cache and with llama.cpp's default F16 one;
- F16 GGUF vs the numpy reference;
- each quant vs the F16 GGUF's logits.

Writes benchmarks/out/quant_error.json (or --out) and prints a table. Same measurement as
tests/test_numerics.py. Usage: python benchmarks/quant_error.py [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from numerics_harness import (
    PROMPT_TOKENS,
    QUANTS,
    error_sequences,
    llama_logits,
)
from reference_forward import ReferenceModel


def _errors(runs: list[np.ndarray], base: list[np.ndarray]) -> tuple[float, list[float], float]:
    """(error over everything, per sequence, worst single position)."""
    d = [float(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2)) for a, b in zip(runs, base)]
    n = [float(np.sum(b.astype(np.float64) ** 2)) for b in base]
    worst = max(float(np.max(np.linalg.norm(a.astype(np.float64) - b, axis=-1) / np.linalg.norm(b, axis=-1)))
                for a, b in zip(runs, base))
    return float(np.sqrt(sum(d) / sum(n))), [float(np.sqrt(x / y)) for x, y in zip(d, n)], worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, help="where to build the model files (default: a temporary dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "quant_error.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import llama_cpp

    from edge_magistral import __version__
    from edge_magistral.build.checkpoint import open_checkpoint
    from edge_magistral.build.convert import convert
    from edge_magistral.build.quantize import quantize
    from edge_magistral.build.tiny import TINY, make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="quant-error-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        ckpt = make_tiny_checkpoint(work / "tiny-checkpoint")
        files = {ft: convert(open_checkpoint(ckpt), work / f"tiny-{ft}.gguf", ft) for ft in ("F32", "F16")}
        for q in QUANTS:
            files[q] = quantize(files["F16"], work / f"tiny-{q}.gguf", q, nthread=args.threads)
        build_s = time.time() - t0

        seqs = error_sequences()
        ref = ReferenceModel(ckpt)
        ref_logits = [ref.logits(s) for s in seqs]
        parity = {}
        for label, path, f32_kv in (("F32 (F32 KV cache)", files["F32"], True),
                                    ("F32 (F16 KV cache)", files["F32"], False),
                                    ("F16 (F32 KV cache)", files["F16"], True)):
            logits = llama_logits(path, seqs, f32_kv=f32_kv, n_threads=args.threads).logits
            total, per_seq, worst = _errors(logits, ref_logits)
            parity[label] = {"rel_error": total, "per_sequence": per_seq, "worst_position": worst}
        del ref_logits

        base = llama_logits(files["F16"], seqs, n_threads=args.threads).logits
        quants = {}
        for q in QUANTS:
            logits = llama_logits(files[q], seqs, n_threads=args.threads).logits
            total, per_seq, worst = _errors(logits, base)
            quants[q] = {"rel_error_vs_f16": total, "per_sequence": per_seq, "worst_position": worst,
                         "file_bytes": files[q].stat().st_size}
            del logits
        sizes = {k: p.stat().st_size for k, p in files.items()}

    result = {
        "what": "relative logit error ||a-b||/||b|| of the tiny Magistral (random weights, seed 0)",
        "model": {"dim": TINY.dim, "n_layers": TINY.n_layers, "n_heads": TINY.n_heads,
                  "n_kv_heads": TINY.n_kv_heads, "head_dim": TINY.head_dim, "hidden_dim": TINY.hidden_dim,
                  "vocab_size": TINY.vocab_size, "rope_theta": TINY.rope_theta},
        "sequences": {"count": len(seqs), "positions": sum(len(s) for s in seqs),
                      "prompt_tokens": PROMPT_TOKENS},
        "parity_vs_numpy_reference": parity,
        "quant_vs_f16": quants,
        "file_bytes": sizes,
        "versions": {"edge_magistral": __version__, "llama_cpp_python": llama_cpp.__version__,
                     "python": platform.python_version(), "numpy": np.__version__},
        "build_seconds": round(build_s, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{len(seqs)} sequences, {result['sequences']['positions']} positions; relative logit error")
    print(f"{'llama.cpp vs numpy reference':<34}{'error':>11}{'worst pos':>11}")
    for label, r in parity.items():
        print(f"  {label:<32}{r['rel_error']:>11.2e}{r['worst_position']:>11.2e}")
    print(f"{'quant vs F16':<22}{'error':>11}{'worst pos':>11}{'file MiB':>11}")
    for q, r in quants.items():
        print(f"  {q:<20}{r['rel_error_vs_f16']:>11.4f}{r['worst_position']:>11.4f}{r['file_bytes'] / 2**20:>11.1f}")
    print(f"  {'F16':<20}{'':>22}{sizes['F16'] / 2**20:>11.1f}")
    print(f"  {'F32':<20}{'':>22}{sizes['F32'] / 2**20:>11.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
