"""A plain numpy forward pass of a Mistral-native checkpoint, written from the architecture.

This is the yardstick the numerical-parity tests hold llama.cpp against, so it shares nothing
with llama.cpp or with the GGUF converter: it reads ``params.json`` and the BF16 tensors of
``consolidated.safetensors`` directly and computes, in float64:

    h = tok_embeddings[tokens]
    for each layer:
        x = rmsnorm(h) * attention_norm
        q, k, v = x @ wq.T, x @ wk.T, x @ wv.T           (per head: head_dim rows each)
        q, k = rope(q), rope(k)                           (Meta/Mistral interleaved pairs)
        a = softmax(q k^T / sqrt(head_dim) + causal mask) v   (GQA: query head h reads kv head h // n_rep)
        h = h + a @ wo.T
        x = rmsnorm(h) * ffn_norm
        h = h + w2(silu(w1 x) * w3 x)
    logits = (rmsnorm(h) * norm) @ output.T

RoPE as in Mistral's reference implementation: within each head the dims (2i, 2i+1) form a
complex number rotated by ``pos * theta ** (-2i / head_dim)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_magistral.build.safetensors_io import TensorRef, bf16_to_f32, read_header, read_tensor

# Rows of the vocabulary-sized matrices handled at a time, to keep memory small.
_VOCAB_CHUNK = 16384


class ReferenceModel:
    """A Mistral-native checkpoint held in float64 (all but the two vocabulary-sized matrices)."""

    def __init__(self, checkpoint_dir: str | Path):
        d = Path(checkpoint_dir)
        p = json.loads((d / "params.json").read_text(encoding="utf-8"))
        self.dim = int(p["dim"])
        self.n_layers = int(p["n_layers"])
        self.n_heads = int(p["n_heads"])
        self.n_kv_heads = int(p.get("n_kv_heads") or self.n_heads)
        self.head_dim = int(p.get("head_dim") or self.dim // self.n_heads)
        self.hidden_dim = int(p["hidden_dim"])
        self.rope_theta = float(p.get("rope_theta", 10000.0))
        self.eps = float(p["norm_eps"])
        self.vocab_size = int(p["vocab_size"])
        self.tied = bool(p.get("tied_embeddings", False))
        refs: dict[str, TensorRef] = {}
        for f in sorted(d.glob("consolidated*.safetensors")):
            refs.update({r.name: r for r in read_header(f)})
        self._refs = refs
        self.layers = []
        for i in range(self.n_layers):
            pre = f"layers.{i}."
            self.layers.append({
                k: self._f64(pre + name) for k, name in (
                    ("wq", "attention.wq.weight"), ("wk", "attention.wk.weight"),
                    ("wv", "attention.wv.weight"), ("wo", "attention.wo.weight"),
                    ("attn_norm", "attention_norm.weight"), ("w1", "feed_forward.w1.weight"),
                    ("w2", "feed_forward.w2.weight"), ("w3", "feed_forward.w3.weight"),
                    ("ffn_norm", "ffn_norm.weight"))
            })
        self.norm = self._f64("norm.weight")
        self._check_shapes()

    # -- weights -------------------------------------------------------------------------------

    def _f64(self, name: str) -> np.ndarray:
        return self._widen(read_tensor(self._refs[name])).astype(np.float64)

    @staticmethod
    def _widen(raw: np.ndarray) -> np.ndarray:
        return bf16_to_f32(raw) if raw.dtype == np.dtype("<u2") else raw.astype(np.float32)

    def _rows(self, name: str) -> np.ndarray:
        """A vocabulary-sized matrix, memory-mapped (raw on-disk dtype)."""
        from edge_magistral.build.safetensors_io import DTYPES

        r = self._refs[name]
        return np.memmap(r.file, dtype=DTYPES[r.dtype], mode="r", offset=r.offset, shape=r.shape)

    def _check_shapes(self) -> None:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        want = {"wq": (q, self.dim), "wk": (kv, self.dim), "wv": (kv, self.dim), "wo": (self.dim, q),
                "w1": (self.hidden_dim, self.dim), "w2": (self.dim, self.hidden_dim),
                "w3": (self.hidden_dim, self.dim), "attn_norm": (self.dim,), "ffn_norm": (self.dim,)}
        for i, layer in enumerate(self.layers):
            for k, shape in want.items():
                if layer[k].shape != shape:
                    raise ValueError(f"layer {i} {k}: shape {layer[k].shape}, expected {shape}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")

    # -- the forward pass ----------------------------------------------------------------------

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: (T, n_heads, head_dim); rotate each interleaved pair (2i, 2i+1) by pos * freq_i."""
        half = self.head_dim // 2
        freqs = self.rope_theta ** (-2.0 * np.arange(half, dtype=np.float64) / self.head_dim)
        angle = positions.astype(np.float64)[:, None] * freqs[None, :]  # (T, half)
        c = x[..., 0::2] + 1j * x[..., 1::2]  # (T, H, half) complex
        c = c * np.exp(1j * angle)[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = c.real
        out[..., 1::2] = c.imag
        return out

    def attention(self, x: np.ndarray, layer: dict[str, np.ndarray], positions: np.ndarray) -> np.ndarray:
        T = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.rope((x @ layer["wq"].T).reshape(T, H, D), positions)
        k = self.rope((x @ layer["wk"].T).reshape(T, KV, D), positions)
        v = (x @ layer["wv"].T).reshape(T, KV, D)
        rep = H // KV
        k = np.repeat(k, rep, axis=1)  # query head h uses kv head h // rep
        v = np.repeat(v, rep, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)  # (H, T, T)
        causal = np.triu(np.ones((T, T), dtype=bool), k=1)
        scores = np.where(causal[None], -np.inf, scores)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,shd->thd", p, v).reshape(T, H * D)
        return out @ layer["wo"].T

    def feed_forward(self, x: np.ndarray, layer: dict[str, np.ndarray]) -> np.ndarray:
        g = x @ layer["w1"].T
        silu = g / (1.0 + np.exp(-g))
        return (silu * (x @ layer["w3"].T)) @ layer["w2"].T

    def hidden(self, tokens: Sequence[int]) -> np.ndarray:
        """The final-normed hidden states, (T, dim) float64."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError("tokens must be a non-empty 1-D sequence of ids within the vocabulary")
        emb = self._rows("tok_embeddings.weight")
        h = self._widen(np.asarray(emb[ids])).astype(np.float64)
        positions = np.arange(ids.size)
        for layer in self.layers:
            h = h + self.attention(self.rmsnorm(h, layer["attn_norm"]), layer, positions)
            h = h + self.feed_forward(self.rmsnorm(h, layer["ffn_norm"]), layer)
        return self.rmsnorm(h, self.norm)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for every position, (T, vocab_size) float64."""
        h = self.hidden(tokens)
        out = self._rows("tok_embeddings.weight" if self.tied else "output.weight")
        logits = np.empty((h.shape[0], self.vocab_size), dtype=np.float64)
        for s in range(0, self.vocab_size, _VOCAB_CHUNK):
            w = self._widen(np.asarray(out[s:s + _VOCAB_CHUNK])).astype(np.float64)
            logits[:, s:s + w.shape[0]] = h @ w.T
        return logits


def reference_logits(checkpoint_dir: str | Path, tokens: Sequence[int]) -> np.ndarray:
    """Logits (T, vocab) of a Mistral-native checkpoint for ``tokens``, all positions."""
    return ReferenceModel(checkpoint_dir).logits(tokens)
