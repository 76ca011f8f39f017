"""The numerical-parity measurement, shared by tests/test_numerics.py and benchmarks/quant_error.py.

Runs token sequences through llama.cpp (llama-cpp-python) and collects the logits of every
position; compares logit arrays by relative Frobenius error ``||a - b|| / ||b||``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from edge_magistral.tekken import BOS, END_INST, INST, THINK

# BOS [INST] "The quick brown fox jumps over the lazy dog. Le renard brun saute." [/INST] [THINK]
# (the 17 text ids are mistral-common's Tekken encoding of that sentence).
PROMPT_TOKENS: list[int] = [
    BOS, INST,
    1784, 7586, 22980, 94137, 72993, 2136, 1278, 42757, 10575, 1046, 2301, 5107, 1580, 102404, 1887, 2654, 1046,
    END_INST, THINK,
]

QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")  # in the order their error must grow
# The bulk of each quant's tensors (the K-quant mixes keep some tensors at a higher type).
QUANT_MAIN_TENSOR_TYPE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K"}

N_CTX = 64
GGML_TYPE_F32 = 0  # for an F32 KV cache: nothing but the weights' own precision in the way


def error_sequences(n_random: int = 4, length: int = 32, seed: int = 20251129) -> list[list[int]]:
    """The prompt plus ``n_random`` seeded sequences (BOS + ordinary tokens from the whole vocabulary)."""
    rng = np.random.default_rng(seed)
    seqs = [list(PROMPT_TOKENS)]
    for _ in range(n_random):
        seqs.append([BOS] + [int(t) for t in rng.integers(1000, 131072, length - 1)])
    return seqs


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


@dataclass
class LlamaRun:
    """Logits of each sequence (float32, one (T, vocab) array per sequence) and a greedy continuation."""

    path: Path
    logits: list[np.ndarray]
    generated: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def llama_logits(path: Path, seqs: Sequence[Sequence[int]], f32_kv: bool = True, n_generate: int = 0,
                 n_threads: int = 2) -> LlamaRun:
    """Evaluate each sequence from an empty cache in llama.cpp and return the logits of all positions.

    With ``n_generate`` > 0, also greedily generate that many tokens after the first sequence.
    """
    from llama_cpp import Llama

    from edge_magistral import llama_log

    llama_log.install()  # llama-cpp-python's own log callback can raise on Tekken metadata bytes
    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
    llm = Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=n_threads,
                n_threads_batch=n_threads, verbose=False, **kv)
    try:
        out = []
        for s in seqs:
            if len(s) + n_generate > N_CTX:
                raise ValueError(f"sequence of {len(s)} tokens does not fit n_ctx={N_CTX}")
            llm.reset()
            llm.eval(list(s))
            out.append(np.array(llm.scores[: len(s)], dtype=np.float32))
        generated: list[int] = []
        if n_generate:
            llm.reset()
            generated = [int(t) for t in islice(llm.generate(list(seqs[0]), temp=0.0, reset=True), n_generate)]
        return LlamaRun(Path(path), out, generated, dict(llm.metadata))
    finally:
        llm.close()


def gguf_header(path: Path) -> tuple[dict[str, Any], Counter[str]]:
    """(metadata by key, tensor count per ggml type name) of a GGUF file, via the project's parser."""
    from edge_magistral.gguf_info import read_header

    h = read_header(path)
    return h.metadata, Counter(t.type_name for t in h.tensors)
