"""GGUF files with a real model's tensor shapes and types but no real weights.

Checking memory against llama.cpp needs files whose header is exactly a Magistral quant's; the
weights themselves do not matter. The tensor data here is a sparse hole (zeros that take no disk),
so a "14 GB" Q4_K_M costs a few megabytes; a dry run never reads it, and a real load on a GPU
reads zeros (a valid, silent model). ``fill="random"`` writes real F32/F16 data instead, for
models that go through llama.cpp's quantizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge_magistral.catalog import Architecture, TensorSpec

CONTROL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]
FTYPE_IDS = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ4_XS": 30,
    "BF16": 32,
}


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: llama.cpp's BPE vocab needs a token for every byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    """A Tekken-like layout: control tokens first, then bytes, then filler words."""
    n_control = min(1000, max(len(CONTROL_TOKENS), n_vocab - 256 - 16))
    tokens = [CONTROL_TOKENS[i] if i < len(CONTROL_TOKENS) else f"<SPECIAL_{i}>" for i in range(n_control)]
    types = [3] * n_control  # CONTROL
    tokens += _byte_tokens()
    types += [1] * 256
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(f"w{i}")
        types.append(1)
        i += 1
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab {n_vocab} is too small for the control and byte tokens")
    return tokens, types


def write_shaped_gguf(
    path: str | os.PathLike[str],
    arch: Architecture,
    specs: list[TensorSpec],
    quant: str,
    fill: str = "sparse",
    seed: int = 0,
    vocab_from: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a llama-architecture GGUF with these tensors; see the module docstring for ``fill``."""
    import gguf

    p = Path(path)
    w = gguf.GGUFWriter(str(p), "llama")
    _add_metadata(w, arch, quant, vocab_from)
    rng = np.random.default_rng(seed)
    for s in specs:
        np_shape = tuple(reversed(s.shape))
        if fill == "random":
            if s.type_name not in ("F32", "F16"):
                raise ValueError(f"fill='random' needs F32/F16 tensors, {s.name} is {s.type_name}")
            dtype = np.float32 if s.type_name == "F32" else np.float16
            data = (rng.standard_normal(np_shape, dtype=np.float32) * 0.02).astype(dtype)
            if s.name.endswith("norm.weight"):
                data[:] = 1
            w.add_tensor(s.name, data)
        else:
            w.add_tensor_info(
                s.name,
                np_shape,
                np.dtype(np.float32),
                s.n_bytes,
                raw_dtype=gguf.GGMLQuantizationType[s.type_name],
            )
    if fill == "random":
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return p
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    fout.flush()
    start = gguf.GGUFWriter.ggml_pad(fout.tell(), w.data_alignment)
    total = sum(gguf.GGUFWriter.ggml_pad(s.n_bytes, w.data_alignment) for s in specs)
    w.close()
    os.truncate(p, start + total)  # a hole: the data reads as zeros and takes no disk
    return p


def _donor_vocab(path: str | os.PathLike[str]) -> tuple[list[bytes], list[int], list[bytes]]:
    """Tokens, types and merges of a real GGUF (e.g. one the build made with the Tekken vocabulary)."""
    from edge_magistral.gguf_info import read_header

    keys = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})
    meta = read_header(path, keep_arrays=keys).metadata
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise ValueError(f"{path}: no token list and merges to copy")
    types = [3 if i < 1000 else 1 for i in range(len(tokens))]  # CONTROL, NORMAL (Tekken's layout)
    return tokens, types, merges


def _add_metadata(w, arch: Architecture, quant: str,  # noqa: ANN001 (gguf.GGUFWriter)
                  vocab_from: str | os.PathLike[str] | None = None) -> None:
    w.add_name(f"shaped-llama-{arch.n_layers}L-{quant}")
    w.add_file_type(FTYPE_IDS.get(quant, 1))
    w.add_context_length(arch.context_length)
    w.add_embedding_length(arch.n_embd)
    w.add_block_count(arch.n_layers)
    w.add_feed_forward_length(arch.n_ff)
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_head_kv)
    w.add_key_length(arch.head_dim)
    w.add_value_length(arch.head_dim)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_rope_freq_base(1e9)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(arch.n_vocab)
    if vocab_from is not None:
        tokens, types, merges = _donor_vocab(vocab_from)
        if len(tokens) != arch.n_vocab:
            raise ValueError(f"{vocab_from}: {len(tokens)} tokens, the architecture has {arch.n_vocab}")
    else:
        (tokens, types), merges = vocab(arch.n_vocab), ["w 0", "w 1", "w 2"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("tekken")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
