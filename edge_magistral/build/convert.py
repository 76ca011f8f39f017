"""Checkpoint → GGUF (BF16 by default; F16 or F32 on request), tensor by tensor.

Peak memory stays near the largest tensor (plus its float32 widening), never the model's size:
tensor infos are declared up front, the header is written, then each tensor is read from the
safetensors file, converted, written and dropped. The output appears under its final name only
when complete (written as ``NAME.partial`` then renamed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_magistral.build.checkpoint import Checkpoint, ModelParams
from edge_magistral.build.safetensors_io import TensorRef, bf16_to_f32, f32_to_bf16, read_rows, read_tensor
from edge_magistral.chat import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT
from edge_magistral.errors import BadInputError, CorruptModelError
from edge_magistral.tekken import GGUF_PATTERN_KEY, TEKKEN_PATTERN

log = logging.getLogger(__name__)

OUT_TYPES = ("BF16", "F16", "F32")
Progress = Callable[[int], None]  # called with bytes of source data done


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its GGUF name and type, and the source it comes from."""

    name: str
    ref: TensorRef
    shape: tuple[int, ...]  # numpy (row-major) shape of the output
    gguf_type: str  # "BF16" | "F16" | "F32"
    permute_heads: int = 0  # >0: undo HF's rotary permutation with this many heads


def _hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo HF's rotate-half ordering of Q/K rows (llama.cpp expects Meta/Mistral's interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan_tensors(ckpt: Checkpoint, out_type: str) -> list[PlannedTensor]:
    """Map every source tensor to its GGUF name; refuse unknown or missing tensors up front."""
    import gguf

    p = ckpt.params
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, p.n_layers)
    planned = []
    for ref in ckpt.tensors:
        name = tmap.get_name(ref.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            if ref.name.endswith("rotary_emb.inv_freq"):
                continue
            raise BadInputError(f"{ckpt.path}: unexpected tensor {ref.name!r}; not a llama/Mistral checkpoint?")
        permute = 0
        if ckpt.kind == "hf" and ".attn_q." in name:
            permute = p.n_heads
        elif ckpt.kind == "hf" and ".attn_k." in name:
            permute = p.n_kv_heads
        # Norms and other 1-D tensors stay F32, as llama.cpp's own converter keeps them.
        gtype = "F32" if len(ref.shape) == 1 else out_type
        planned.append(PlannedTensor(name, ref, ref.shape, gtype, permute))
    _check_complete(ckpt, planned)
    return planned


def _check_complete(ckpt: Checkpoint, planned: list[PlannedTensor]) -> None:
    p = ckpt.params
    names = {t.name for t in planned}
    need = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(p.n_layers)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_gate", "ffn_down", "ffn_up",
                  "ffn_norm")
    ]
    if not p.tied_embeddings:
        need.append("output.weight")
    missing = [n for n in need if n not in names]
    if missing:
        raise CorruptModelError(f"{ckpt.path}: checkpoint lacks {len(missing)} tensors (first: {missing[0]}); "
                                "download it again")
    emb = next(t for t in planned if t.name == "token_embd.weight")
    if emb.shape != (p.vocab_size, p.dim):
        raise CorruptModelError(f"{ckpt.path}: token embeddings are {emb.shape}, params say "
                                f"({p.vocab_size}, {p.dim})")


def _gguf_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def _nbytes(t: PlannedTensor) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n * (4 if t.gguf_type == "F32" else 2)


_NP_OUT = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
CHUNK_ELEMENTS = 8 * 1024 * 1024  # rows converted at a time: bounds the float32 temporaries


def _convert_array(t: PlannedTensor, raw: np.ndarray) -> np.ndarray:
    """Source array (raw BF16 bits, F16 or F32) → the output type's array."""
    x = bf16_to_f32(raw) if t.ref.dtype == "BF16" else raw.astype(np.float32)
    if t.permute_heads:
        x = _hf_unpermute(x, t.permute_heads)
    if t.gguf_type == "BF16":
        return f32_to_bf16(x)
    return x.astype(_NP_OUT[t.gguf_type])


def _tensor_data(t: PlannedTensor, fh: BinaryIO) -> np.ndarray:
    """One output tensor. BF16 → BF16 is a bit-exact pass-through; other casts run over row chunks
    into the output array, so peak memory stays near one output tensor (not several f32 copies)."""
    if t.ref.dtype == "BF16" and t.gguf_type == "BF16" and not t.permute_heads:
        return read_tensor(t.ref, fh)
    if t.permute_heads or len(t.shape) == 1:  # small tensors: whole at once
        return _convert_array(t, read_tensor(t.ref, fh))
    out = np.empty(t.shape, dtype=_NP_OUT[t.gguf_type])
    rows = max(1, CHUNK_ELEMENTS // (t.ref.n_elements // t.shape[0]))
    for r0 in range(0, t.shape[0], rows):
        r1 = min(t.shape[0], r0 + rows)
        out[r0:r1] = _convert_array(t, read_rows(t.ref, fh, r0, r1))
    return out


def file_type_of(out_type: str) -> int:
    import gguf

    return {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
            "BF16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]


def add_model_metadata(w, p: ModelParams, name: str, out_type: str) -> None:
    """Architecture metadata llama.cpp needs, plus the general facts other tools show."""
    import gguf

    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(p.max_seq_len)
    w.add_embedding_length(p.dim)
    w.add_block_count(p.n_layers)
    w.add_feed_forward_length(p.hidden_dim)
    w.add_head_count(p.n_heads)
    w.add_head_count_kv(p.n_kv_heads)
    w.add_key_length(p.head_dim)
    w.add_value_length(p.head_dim)
    w.add_rope_dimension_count(p.head_dim)
    w.add_rope_freq_base(p.rope_theta)
    w.add_layer_norm_rms_eps(p.norm_eps)
    w.add_vocab_size(p.vocab_size)
    w.add_file_type(file_type_of(out_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer_metadata(w, tokenizer_dir: Path, system_prompt: str | None = None) -> None:
    """Tekken vocabulary through gguf's MistralVocab, plus our pattern key and the chat template."""
    import gguf
    from gguf.vocab import MistralVocab

    vocab = MistralVocab(tokenizer_dir)
    if vocab.tokenizer_type.value != "tekken":
        raise BadInputError(f"{tokenizer_dir}: expected a Tekken tokenizer, found {vocab.tokenizer_type.value}")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    w.add_tokenizer_model(vocab.gguf_tokenizer_model)
    w.add_tokenizer_pre("tekken")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(vocab.extract_vocab_merges_from_model())
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_string(GGUF_PATTERN_KEY, vocab.tokenizer._model._pat_str or TEKKEN_PATTERN)
    template = CHAT_TEMPLATE
    if system_prompt and system_prompt.strip() != DEFAULT_SYSTEM_PROMPT.strip():
        template = template.replace(DEFAULT_SYSTEM_PROMPT.replace("\n", "\\n"),
                                    system_prompt.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n"))
    w.add_chat_template(template)
    w.add_key_value("tokenizer.ggml.add_space_prefix", False, gguf.GGUFValueType.BOOL)
    _ = gguf  # imported for the value type


def convert(ckpt: Checkpoint, out: Path, out_type: str = "BF16", name: str = "Magistral Small 1.1",
            progress: Progress | None = None) -> Path:
    """Write ``out`` (a GGUF of ``out_type``) from ``ckpt``; atomic, streaming."""
    import gguf

    if out_type not in OUT_TYPES:
        raise BadInputError(f"conversion writes {', '.join(OUT_TYPES)}; got {out_type!r}")
    planned = plan_tensors(ckpt, out_type)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        add_model_metadata(w, ckpt.params, name, out_type)
        add_tokenizer_metadata(w, ckpt.tokenizer_file.parent, ckpt.system_prompt)
        for t in planned:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t), raw_dtype=_gguf_type(t.gguf_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        handles: dict[Path, BinaryIO] = {}
        try:
            for t in planned:
                fh = handles.setdefault(t.ref.file, open(t.ref.file, "rb"))
                data = _tensor_data(t, fh)
                w.write_tensor_data(data)
                del data
                if progress:
                    progress(t.ref.n_bytes)
        finally:
            for fh in handles.values():
                fh.close()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
