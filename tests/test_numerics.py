"""Numerical parity: llama.cpp on our GGUFs against a numpy forward pass written from the architecture,
and the quantized files against F16.

The figures themselves (with file sizes) come from ``python benchmarks/quant_error.py``.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from numerics_harness import (
    PROMPT_TOKENS,
    QUANT_MAIN_TENSOR_TYPE,
    QUANTS,
    error_sequences,
    gguf_header,
    llama_logits,
    relative_error,
)
from reference_forward import ReferenceModel

PARITY_TOLERANCE = 1e-3
N_GENERATE = 4


def _per_position(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.linalg.norm(a64 - b64, axis=-1) / np.linalg.norm(b64, axis=-1)


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint) -> ReferenceModel:
    return ReferenceModel(tiny_checkpoint)


@pytest.fixture(scope="module")
def reference_prompt_logits(reference_model) -> np.ndarray:
    return reference_model.logits(PROMPT_TOKENS)


# --- llama.cpp on the F32 GGUF == the numpy reference ------------------------------------------

@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_f32_gguf_matches_numpy_reference(tiny_gguf_f32, reference_prompt_logits, kv_cache):
    """Every position's logits agree within 1e-3 relative error, with an exact (F32) KV cache and with
    llama.cpp's default F16 one."""
    got = llama_logits(tiny_gguf_f32, [PROMPT_TOKENS], f32_kv=kv_cache == "f32").logits[0]
    ref = reference_prompt_logits
    assert got.shape == ref.shape == (len(PROMPT_TOKENS), 131072)
    assert np.isfinite(got).all()
    total = relative_error(got, ref)
    per_pos = _per_position(got, ref)
    assert total < PARITY_TOLERANCE, f"relative logit error {total:.3e} (per position: {np.round(per_pos, 6)})"
    assert per_pos.max() < PARITY_TOLERANCE, f"worst position {per_pos.argmax()}: {per_pos.max():.3e}"
    # Same predictions, not just close numbers.
    assert (got.argmax(axis=-1) == ref.argmax(axis=-1)).all()


class _RotateHalfReference(ReferenceModel):
    """The reference with HF/NeoX RoPE pairing (dims i and i + head_dim/2) instead of Mistral's."""

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        half = self.head_dim // 2
        perm = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)  # 0, h, 1, h+1, …
        out = np.empty_like(x)
        out[..., perm] = super().rope(x[..., perm], positions)
        return out


def test_parity_check_detects_a_wrong_rope_pairing(tiny_checkpoint, tiny_gguf_f32, reference_prompt_logits):
    """The checkpoint's Q/K rows are written to the GGUF unpermuted because llama.cpp's LLAMA rope pairs
    dims (2i, 2i+1) as Mistral does. A reference pairing them the HF way must clearly disagree with
    llama.cpp past position 0 (where RoPE is the identity), so the parity test above pins the layout."""
    wrong = _RotateHalfReference(tiny_checkpoint).logits(PROMPT_TOKENS)
    got = llama_logits(tiny_gguf_f32, [PROMPT_TOKENS]).logits[0]
    per_pos = _per_position(got, wrong)
    assert per_pos[0] < PARITY_TOLERANCE  # position 0: no rotation, so the pairing cannot matter
    assert relative_error(got, wrong) > 100 * relative_error(got, reference_prompt_logits)
    assert relative_error(got, wrong) > 10 * PARITY_TOLERANCE


# --- quantized files -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quant_runs(tiny_gguf_f16, tiny_gguf_quants):
    """For F16 and each quant: logits on the error sequences, plus a greedy continuation for the quants.

    Errors are kept, logits are dropped as soon as they are compared (each run is ~75 MB of logits).
    """
    seqs = error_sequences()
    base = llama_logits(tiny_gguf_f16, seqs).logits
    base_sq = [float(np.sum(b.astype(np.float64) ** 2)) for b in base]
    runs = {}
    for q in QUANTS:
        run = llama_logits(tiny_gguf_quants[q], seqs, n_generate=N_GENERATE)
        diff_sq = [float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(run.logits, base)]
        runs[q] = {
            "total": float(np.sqrt(sum(diff_sq) / sum(base_sq))),
            "per_sequence": [float(np.sqrt(d / n)) for d, n in zip(diff_sq, base_sq)],
            "generated": run.generated,
            "prompt_next": int(run.logits[0][-1].argmax()),
            "metadata": run.metadata,
        }
        del run
    return runs


@pytest.mark.parametrize("quant", QUANTS)
def test_quant_declares_its_file_type(tiny_gguf_quants, quant_runs, quant):
    import llama_cpp

    want = int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}"))
    assert quant_runs[quant]["metadata"]["general.file_type"] == str(want)  # as llama.cpp read it
    kv, tensor_types = gguf_header(tiny_gguf_quants[quant])
    assert kv["general.file_type"] == want
    # and the tensors really are quantized that way: all 2-D weights but a few K-quant upgrades
    n_matrices = sum(n for t, n in tensor_types.items() if t != "F32")
    assert n_matrices == 2 + 7 * 2  # token_embd, output, 7 matrices in each of the 2 layers
    assert tensor_types[QUANT_MAIN_TENSOR_TYPE[quant]] > n_matrices // 2, tensor_types


@pytest.mark.parametrize("quant", QUANTS)
def test_quant_loads_and_generates(quant_runs, quant):
    gen = quant_runs[quant]["generated"]
    assert len(gen) == N_GENERATE
    assert all(0 <= t < 131072 for t in gen)
    # greedy generation continues with the token the model's own logits rank first
    assert gen[0] == quant_runs[quant]["prompt_next"]


def test_quant_error_against_f16_is_ordered(quant_runs):
    """Q8_0 < Q6_K < Q5_K_M < Q4_K_M in relative logit error against F16, over all positions of all
    sequences together and on each sequence alone."""
    totals = [quant_runs[q]["total"] for q in QUANTS]
    table = ", ".join(f"{q} {e:.4f}" for q, e in zip(QUANTS, totals))
    print(f"\nrelative logit error vs F16: {table}")
    assert totals[0] > 0, "Q8_0 logits equal F16's exactly: nothing was quantized"
    assert all(a < b for a, b in pairwise(totals)), table
    n_seq = len(quant_runs[QUANTS[0]]["per_sequence"])
    for i in range(n_seq):
        per = [quant_runs[q]["per_sequence"][i] for q in QUANTS]
        assert all(a < b for a, b in pairwise(per)), f"sequence {i}: {per}"
