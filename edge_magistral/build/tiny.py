"""A tiny Magistral: Magistral Small 1.1's architecture and tokenizer with tiny sizes and random
weights, written exactly as the real repository ships it (params.json, consolidated.safetensors in
BF16, tekken.json, SYSTEM_PROMPT.txt). For tests and demos; seeded, so runs are reproducible.

Default sizes keep every matrix row a multiple of 256 so llama.cpp's K-quants apply to every
tensor as they do on the real model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_magistral.build.checkpoint import ModelParams
from edge_magistral.build.safetensors_io import f32_to_bf16, write_safetensors
from edge_magistral.chat import DEFAULT_SYSTEM_PROMPT
from edge_magistral.tekken import VOCAB_SIZE, write_magistral_tekken

# The real model, for reference and for shape-exact synthetic checkpoints.
MAGISTRAL_SMALL = ModelParams(
    dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32, n_kv_heads=8,
    rope_theta=1e9, norm_eps=1e-5, vocab_size=VOCAB_SIZE, max_seq_len=131072,
)
TINY = replace(MAGISTRAL_SMALL, dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2,
               max_seq_len=4096)


def native_tensor_shapes(p: ModelParams) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Mistral-native checkpoint, in file order."""
    q, kv = p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim
    shapes = [("tok_embeddings.weight", (p.vocab_size, p.dim))]
    for i in range(p.n_layers):
        pre = f"layers.{i}."
        shapes += [
            (pre + "attention.wq.weight", (q, p.dim)),
            (pre + "attention.wk.weight", (kv, p.dim)),
            (pre + "attention.wv.weight", (kv, p.dim)),
            (pre + "attention.wo.weight", (p.dim, q)),
            (pre + "attention_norm.weight", (p.dim,)),
            (pre + "feed_forward.w1.weight", (p.hidden_dim, p.dim)),
            (pre + "feed_forward.w2.weight", (p.dim, p.hidden_dim)),
            (pre + "feed_forward.w3.weight", (p.hidden_dim, p.dim)),
            (pre + "ffn_norm.weight", (p.dim,)),
        ]
    shapes += [("norm.weight", (p.dim,)), ("output.weight", (p.vocab_size, p.dim))]
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, index: int) -> np.ndarray:
    """One tensor's values: norms near 1, matrices scaled by 1/sqrt(fan_in) so activations stay O(1)."""
    rng = np.random.default_rng([seed, index])
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    std = 1.0 if name.startswith("tok_embeddings") else shape[1] ** -0.5
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def make_tiny_checkpoint(out: str | Path, params: ModelParams = TINY, seed: int = 0) -> Path:
    """Write a Mistral-native checkpoint with random BF16 weights; returns the directory.

    Tensors are generated and written one at a time, so any size (up to the real model's) can be
    made without holding it in memory.
    """
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    import json

    (d / "params.json").write_text(json.dumps(params.to_params_json(), indent=2) + "\n")
    write_magistral_tekken(d / "tekken.json")
    (d / "SYSTEM_PROMPT.txt").write_text(DEFAULT_SYSTEM_PROMPT, encoding="utf-8")
    items = [
        (name, "BF16", shape,
         (lambda name=name, shape=shape, i=i: f32_to_bf16(_random_tensor(name, shape, seed, i))))
        for i, (name, shape) in enumerate(native_tensor_shapes(params))
    ]
    write_safetensors(d / "consolidated.safetensors", items)
    return d
