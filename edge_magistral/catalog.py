"""The Magistral Small 1.1 quant files, computed from the architecture, so a box can be planned for
before anything is downloaded.

Sizes are not a table of guesses: each quant's tensor types follow the rules llama.cpp's quantizer
applies to a ``llama``-architecture model (``llama_tensor_get_type`` in llama-quant.cpp of the
vendored llama.cpp 0c1e57098), and each tensor's bytes follow from ggml's block sizes. The same
facts come from a local GGUF's header through :func:`from_gguf_info`, so the planner treats both
alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge_magistral.errors import BadInputError

if TYPE_CHECKING:
    from edge_magistral.gguf_info import GGUFInfo

# ggml type name -> (block size in elements, bytes per block); as gguf.GGML_QUANT_SIZES
TYPE_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q6_K": (256, 210),
    "Q5_K": (256, 176),
    "Q4_K": (256, 144),
    "Q3_K": (256, 110),
    "IQ4_XS": (256, 136),
    "IQ4_NL": (32, 18),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q2_K": (256, 84),
}

# best first: how the planner ranks quality when a profile does not list a quant
QUALITY_ORDER = [
    "BF16",
    "F16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q4_K_M",
    "Q4_K_S",
    "IQ4_XS",
    "IQ4_NL",
    "Q4_0",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
]

HF_REPO = "mistralai/Magistral-Small-2507-GGUF"


@dataclass(frozen=True)
class Architecture:
    """The hyper-parameters that decide memory (llama.cpp architecture ``llama``)."""

    n_layers: int = 40
    n_embd: int = 5120
    n_head: int = 32
    n_head_kv: int = 8
    head_dim: int = 128
    n_ff: int = 32768
    n_vocab: int = 131072
    context_length: int = 131072


MAGISTRAL_SMALL_1_1 = Architecture()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    type_name: str

    @property
    def n_bytes(self) -> int:
        return tensor_bytes(self.shape, self.type_name)


def tensor_bytes(shape: tuple[int, ...], type_name: str) -> int:
    block, size = TYPE_SIZES[type_name]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


@dataclass
class ModelCandidate:
    """One model file the planner may choose: its architecture and where its bytes are."""

    quant: str
    source: str  # "catalog" or "local"
    path: str  # local path, or the file name in the hub repo
    file_size: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length: int
    bytes_per_layer: list[int] = field(default_factory=list)
    token_embd_bytes: int = 0
    output_bytes: int = 0  # output.weight + output_norm: the "output layer" of n_gpu_layers
    largest_matrix_bytes: int = 0  # the biggest weight in a layer: what a GPU copies in to run it

    @property
    def weight_bytes(self) -> int:
        return sum(self.bytes_per_layer) + self.token_embd_bytes + self.output_bytes

    @property
    def bits_per_weight(self) -> float:
        n = self.n_layers * (
            2 * self.n_embd * self.n_head * self.head_dim
            + 2 * self.n_embd * self.n_head_kv * self.head_dim
            + 3 * self.n_embd * self.n_ff
        )
        n += 2 * self.n_vocab * self.n_embd
        return 8 * self.weight_bytes / n if n else 0.0

    @property
    def quality_rank(self) -> int:
        """0 is best; unknown quants rank last."""
        return QUALITY_ORDER.index(self.quant) if self.quant in QUALITY_ORDER else len(QUALITY_ORDER)


# ------------------------------------------------------------------ llama.cpp's quant type rules

_DEFAULT_TYPE = {
    "BF16": "BF16",
    "F16": "F16",
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_K_S": "Q5_K",
    "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K",
    "IQ4_XS": "IQ4_XS",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_0": "Q4_0",
}
CATALOG_QUANTS = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M"]


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_type(quant: str, kind: str, i: int, n: int, gqa: int) -> str:
    """Type of one repeating-layer matrix (``kind``: q, k, v, o, gate, up, down) for a quant."""
    t = _DEFAULT_TYPE[quant]
    if quant in ("BF16", "F16"):
        return t
    if kind == "v":
        if quant == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if quant == "Q3_K_L":
            return "Q5_K"
        if quant == "IQ4_XS" and gqa >= 4:
            return "Q5_K"
        if quant in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return "Q6_K"
        if quant == "Q4_K_S" and i < 4:
            return "Q5_K"
    elif kind == "down":
        if quant == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if quant == "Q3_K_L":
            return "Q5_K"
        if quant in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return "Q6_K"
        if quant == "IQ4_XS" and i < n // 8:  # without an imatrix
            return "Q5_K"
        if quant == "Q4_K_S" and i < n // 8:
            return "Q5_K"
    elif kind == "o":
        if quant == "Q3_K_M":
            return "Q4_K"
        if quant == "Q3_K_L":
            return "Q5_K"
    return t


def _fallback(t: str, row: int) -> str:
    """llama.cpp's fallback when a row does not divide into the type's blocks."""
    block = TYPE_SIZES[t][0]
    if row % block == 0:
        return t
    t2 = {
        "Q4_K": "Q5_0",
        "Q5_K": "Q5_1",
        "Q6_K": "Q8_0",
        "Q3_K": "Q4_0",
        "Q2_K": "Q4_0",
        "IQ4_XS": "IQ4_NL",
    }.get(t, t)
    return t2 if row % TYPE_SIZES[t2][0] == 0 else "F16"


def tensor_specs(arch: Architecture, quant: str) -> list[TensorSpec]:
    """Every tensor of a llama-architecture GGUF of this quant, in llama.cpp's file order."""
    if quant not in _DEFAULT_TYPE:
        raise BadInputError(f"unknown quant {quant!r}; known: {', '.join(_DEFAULT_TYPE)}")
    e, q, kv, n = arch.n_embd, arch.n_head * arch.head_dim, arch.n_head_kv * arch.head_dim, arch.n_layers
    gqa = arch.n_head // arch.n_head_kv
    default = _DEFAULT_TYPE[quant]
    quantized = quant not in ("BF16", "F16")
    out_type = default
    if quantized:  # the output matrix gets Q6_K (Q8_0 when the default is Q8_0 or the row does not fit)
        out_type = "Q8_0" if default == "Q8_0" or e % TYPE_SIZES[default][0] else "Q6_K"
    specs = [
        TensorSpec("token_embd.weight", (e, arch.n_vocab), _fallback(default, e) if quantized else default)
    ]
    shapes = {
        "q": ("attn_q", (e, q)),
        "k": ("attn_k", (e, kv)),
        "v": ("attn_v", (e, kv)),
        "o": ("attn_output", (q, e)),
        "gate": ("ffn_gate", (e, arch.n_ff)),
        "up": ("ffn_up", (e, arch.n_ff)),
        "down": ("ffn_down", (arch.n_ff, e)),
    }
    for i in range(n):
        specs.append(TensorSpec(f"blk.{i}.attn_norm.weight", (e,), "F32"))
        for kind in ("q", "k", "v", "o"):
            name, shape = shapes[kind]
            specs.append(
                TensorSpec(
                    f"blk.{i}.{name}.weight", shape, _fallback(_layer_type(quant, kind, i, n, gqa), shape[0])
                )
            )
        specs.append(TensorSpec(f"blk.{i}.ffn_norm.weight", (e,), "F32"))
        for kind in ("gate", "up", "down"):
            name, shape = shapes[kind]
            specs.append(
                TensorSpec(
                    f"blk.{i}.{name}.weight", shape, _fallback(_layer_type(quant, kind, i, n, gqa), shape[0])
                )
            )
    specs.append(TensorSpec("output_norm.weight", (e,), "F32"))
    specs.append(
        TensorSpec("output.weight", (e, arch.n_vocab), _fallback(out_type, e) if quantized else out_type)
    )
    return specs


HEADER_BYTES = 6 * 1024 * 1024  # metadata: the 131k-token vocabulary, merges, token types


def candidate_from_specs(
    arch: Architecture, quant: str, specs: list[TensorSpec], path: str, source: str = "catalog"
) -> ModelCandidate:
    per_layer = [0] * arch.n_layers
    tok = out = 0
    for s in specs:
        if s.name.startswith("blk."):
            per_layer[int(s.name.split(".")[1])] += s.n_bytes
        elif s.name.startswith("token_embd"):
            tok += s.n_bytes
        else:
            out += s.n_bytes
    return ModelCandidate(
        quant=quant,
        source=source,
        path=path,
        file_size=sum(s.n_bytes for s in specs) + HEADER_BYTES,
        n_layers=arch.n_layers,
        n_embd=arch.n_embd,
        n_head=arch.n_head,
        n_head_kv=arch.n_head_kv,
        head_dim=arch.head_dim,
        n_ff=arch.n_ff,
        n_vocab=arch.n_vocab,
        context_length=arch.context_length,
        bytes_per_layer=per_layer,
        token_embd_bytes=tok,
        output_bytes=out,
        largest_matrix_bytes=max((s.n_bytes for s in specs if s.name.startswith("blk.")), default=0),
    )


def catalog(
    quants: list[str] | None = None, arch: Architecture = MAGISTRAL_SMALL_1_1
) -> list[ModelCandidate]:
    """The catalog of Magistral Small 1.1 quants (best quality first)."""
    names = quants or CATALOG_QUANTS
    return [
        candidate_from_specs(arch, q, tensor_specs(arch, q), f"Magistral-Small-2507-{q}.gguf") for q in names
    ]


def from_gguf_info(info: GGUFInfo) -> ModelCandidate:
    """A local GGUF as a planner candidate (facts from its header)."""
    if info.architecture != "llama" or not info.n_layers or not info.n_embd:
        raise BadInputError(
            f"{info.path}: architecture {info.architecture!r} with {info.n_layers} layers is not a "
            "llama-architecture model this planner knows; use a Magistral GGUF"
        )
    return ModelCandidate(
        quant=info.file_type_name,
        source="local",
        path=info.path,
        file_size=info.file_size,
        n_layers=info.n_layers,
        n_embd=info.n_embd,
        n_head=info.n_head,
        n_head_kv=info.n_head_kv,
        head_dim=info.head_dim,
        n_ff=info.n_ff,
        n_vocab=info.n_vocab,
        context_length=info.context_length,
        bytes_per_layer=list(info.bytes_per_layer),
        token_embd_bytes=info.token_embd_bytes,
        output_bytes=info.output_bytes,
        largest_matrix_bytes=max((t.n_bytes for t in info.tensors if t.name.startswith("blk.")), default=0),
    )
