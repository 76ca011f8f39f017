"""Model facts from a GGUF header, and a bounded pre-check that runs before llama.cpp sees a file.

llama.cpp aborts the whole process on many malformed files, so :func:`check_gguf` walks the header
in pure Python with hard limits (string and array lengths, tensor counts, dimensions, offsets
within the file) and raises :class:`CorruptModelError` with a one-line reason. :func:`read_info`
builds the facts from that same parsed header (``gguf.GGUFReader`` makes a numpy object per
vocabulary string and takes ~12 s on a 131k Tekken vocabulary; this takes well under a second).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_magistral.errors import BadInputError, CorruptModelError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
MAX_STRING = 64 * 1024 * 1024  # the longest metadata string we accept (chat templates are KBs)
MAX_ARRAY = 16 * 1024 * 1024  # vocabularies are ~150k entries
MAX_TENSORS = 1_000_000
MAX_KV = 100_000
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

# value type id -> struct format of one scalar (8=string, 9=array handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}


@dataclass(frozen=True)
class TensorFacts:
    """One tensor as the header describes it."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int
    offset: int  # absolute offset in the file


@dataclass
class GGUFInfo:
    """What the runtime, the planner and ``inspect`` need to know about a GGUF file."""

    path: str
    file_size: int
    version: int
    architecture: str
    name: str
    file_type: int | None
    file_type_name: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length: int
    rope_theta: float | None
    rms_eps: float | None
    tokenizer_model: str
    tokenizer_pre: str
    special_tokens: dict[str, int]
    has_chat_template: bool
    n_params: int
    tensor_bytes: int
    bytes_per_layer: list[int]
    token_embd_bytes: int
    output_bytes: int  # output.weight + output_norm (what counts as the "output layer" on a GPU)
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    tensors: list[TensorFacts] = field(default_factory=list)

    def to_dict(self, with_tensors: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_tensors:
            d.pop("tensors")
        return d


# ------------------------------------------------------------------------------- header parser

@dataclass
class GGUFHeader:
    """A GGUF's parsed header: metadata (arrays kept only where asked), tensors, data start."""

    version: int
    metadata: dict[str, Any]  # scalars and strings; kept arrays of strings as list[bytes]; others: length
    tensors: list[TensorFacts]
    data_start: int


class _Cursor:
    """Bounded little-endian reads over a memory-mapped file: every length is checked first."""

    def __init__(self, buf: Any, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> CorruptModelError:
        return CorruptModelError(f"{self.path}: not a valid GGUF file ({what}); re-download or rebuild it")

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise self.fail(f"truncated while reading {what}")
        data = self.buf[self.pos:end]
        self.pos = end
        return data

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> bytes:
        n = self.unpack("<Q", what)
        if n > limit:
            raise self.fail(f"{what} claims a length of {n} bytes")
        return self.take(n, what)

    def text(self, what: str, limit: int = MAX_STRING) -> str:
        try:
            return self.string(what, limit).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == 8:
            return self.text(what)
        if vtype != 9:
            raise self.fail(f"{what} has unknown value type {vtype}")
        sub, n = self.unpack("<I", what), self.unpack("<Q", what)
        if n > MAX_ARRAY:
            raise self.fail(f"{what} claims {n} array elements")
        if sub in _SCALARS:  # fixed-size elements: skip in one bounded step
            self.take(n * struct.calcsize(_SCALARS[sub]), what)
            return n
        if sub != 8:
            raise self.fail(f"{what} is an array of type {sub}")
        if n * 8 > len(self.buf) - self.pos:  # each string needs at least its 8-byte length
            raise self.fail(f"truncated while reading {what} ({n} strings cannot fit)")
        items = [self.string(what) for _ in range(n)]
        return items if keep else n


def read_header(path: str | os.PathLike[str], keep_arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    """Parse and validate a GGUF header without trusting any length in it.

    Checks magic, version, counts, every key/value (bounded), unique keys and tensor names, at most
    4 dims with no overflow, known tensor types, alignment, and that every tensor's data lies
    within the file. Raises :class:`CorruptModelError` (or ModelNotFoundError) with one line.
    """
    p = Path(path)
    if p.is_dir():
        raise BadInputError(f"{p}: is a directory; expected a .gguf model file")
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CorruptModelError(f"{p}: empty file, not a GGUF model; re-download or rebuild it")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, str(p)), size, keep_arrays)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{p}: no such model file; check the path or run `edge-magistral build`") from None
    except PermissionError:
        raise ModelNotFoundError(f"{p}: cannot read the file (permission denied)") from None


def _parse(c: _Cursor, size: int, keep_arrays: frozenset[str]) -> GGUFHeader:
    if c.take(4, "magic") != GGUF_MAGIC:
        raise c.fail("bad magic: this is not a GGUF file")
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        raise c.fail(f"unsupported GGUF version {version}")
    n_tensors, n_kv = c.unpack("<Q", "tensor count"), c.unpack("<Q", "metadata count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise c.fail(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.text(f"metadata key #{i}", limit=65536)
        if key in meta:
            raise c.fail(f"duplicate metadata key {key!r}")
        meta[key] = c.value(c.unpack("<I", f"type of {key}"), key, key in keep_arrays)
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"bad alignment {alignment!r}")
    raw = [_tensor_info(c, i) for i in range(n_tensors)]
    data_start = -(-c.pos // alignment) * alignment
    tensors, names = [], set()
    for name, shape, ttype, offset, nbytes in raw:
        if name in names:
            raise c.fail(f"duplicate tensor {name!r}")
        names.add(name)
        if offset % alignment:
            raise c.fail(f"tensor {name!r} is misaligned")
        if data_start + offset + nbytes > size:
            raise c.fail(f"tensor {name!r} ends past the end of the file (truncated download?)")
        tensors.append(TensorFacts(name, ttype, tuple(shape), nbytes, data_start + offset))
    return GGUFHeader(version, meta, tensors, data_start)


def _tensor_info(c: _Cursor, i: int) -> tuple[str, list[int], str, int, int]:
    sizes = _type_sizes()
    name = c.text(f"tensor name #{i}", limit=65536)
    n_dims = c.unpack("<I", f"dims of {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
    shape = [c.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
    ttype = c.unpack("<I", f"type of {name}")
    offset = c.unpack("<Q", f"offset of {name}")
    if ttype not in sizes:
        raise c.fail(f"tensor {name!r} has unknown type {ttype}")
    n_el = 1
    for d in shape:
        if d <= 0 or d > 1 << 40:
            raise c.fail(f"tensor {name!r} has dimension {d}")
        n_el *= d
        if n_el > 1 << 44:
            raise c.fail(f"tensor {name!r} is implausibly large")
    type_name, block, type_size = sizes[ttype]
    if shape[0] % block:
        raise c.fail(f"tensor {name!r} row of {shape[0]} is not a multiple of its block {block}")
    return name, shape, type_name, offset, n_el // block * type_size


@functools.lru_cache(maxsize=1)
def _type_sizes() -> dict[int, tuple[str, int, int]]:
    import gguf

    return {int(t): (t.name, *v) for t, v in gguf.GGML_QUANT_SIZES.items()}


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Validate a GGUF file's structure before llama.cpp sees it (see :func:`read_header`)."""
    read_header(path)


# ------------------------------------------------------------------------------------------ facts

def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        part = name.split(".", 2)[1]
        if part.isdigit():
            return int(part)
    return None


def read_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF's facts from its validated header (fast: no tensor data is touched)."""
    p = Path(path)
    h = read_header(p, keep_arrays=frozenset({"tokenizer.ggml.tokens"}))
    meta = h.metadata
    arch = str(meta.get("general.architecture", "unknown"))

    def a(key: str, default: Any = 0) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        return default if v is None else v

    n_layers = int(a("block_count"))
    per_layer = [0] * n_layers
    tok_embd = out = n_params = 0
    types: dict[str, int] = {}
    for t in h.tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
        n_params += math.prod(t.shape)
        layer = _layer_of(t.name)
        if layer is not None and layer < n_layers:
            per_layer[layer] += t.n_bytes
        elif t.name.startswith("token_embd"):
            tok_embd += t.n_bytes
        else:
            out += t.n_bytes
    n_embd, n_head = int(a("embedding_length")), int(a("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []
    ftype = meta.get("general.file_type")
    special = {k: int(meta[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos", "unknown", "padding")
               if isinstance(meta.get(f"tokenizer.ggml.{k}_token_id"), int)}
    special.update(_named_control_tokens(tokens))
    return GGUFInfo(
        path=str(p),
        file_size=p.stat().st_size,
        version=h.version,
        architecture=arch,
        name=str(meta.get("general.name", "")),
        file_type=int(ftype) if isinstance(ftype, int) else None,
        file_type_name=_ftype_name(ftype),
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(a("attention.head_count_kv", n_head)),
        head_dim=int(a("attention.key_length", 0) or (n_embd // n_head if n_head else 0)),
        n_ff=int(a("feed_forward_length")),
        n_vocab=int(a("vocab_size", 0) or len(tokens)),
        context_length=int(a("context_length")),
        rope_theta=_opt_float(a("rope.freq_base", None)),
        rms_eps=_opt_float(a("attention.layer_norm_rms_epsilon", None)),
        tokenizer_model=str(meta.get("tokenizer.ggml.model", "")),
        tokenizer_pre=str(meta.get("tokenizer.ggml.pre", "")),
        special_tokens=special,
        has_chat_template="tokenizer.chat_template" in meta,
        n_params=n_params,
        tensor_bytes=sum(t.n_bytes for t in h.tensors),
        bytes_per_layer=per_layer,
        token_embd_bytes=tok_embd,
        output_bytes=out,
        tensor_types=types,
        tensors=h.tensors,
    )


_NAMED = {"[INST]": "inst", "[/INST]": "end_inst", "[THINK]": "think", "[/THINK]": "end_think",
          "[SYSTEM_PROMPT]": "system", "[/SYSTEM_PROMPT]": "end_system"}


def _named_control_tokens(tokens: list[bytes]) -> dict[str, int]:
    """Find [THINK]/[/THINK] and the instruction tokens among the first (control) tokens."""
    found = {}
    for i, tok in enumerate(tokens[:1000]):
        name = _NAMED.get(tok.decode("utf-8", "replace"))
        if name:
            found[name] = i
    return found


def _opt_float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


def _ftype_name(ftype: Any) -> str:
    import gguf

    if not isinstance(ftype, int):
        return "unknown"
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").replace("ALL_", "")
    except ValueError:
        return f"ftype {ftype}"


def expected_shapes(info: GGUFInfo) -> dict[str, tuple[int, ...]]:
    """The tensor shapes (ggml order: row length first) a llama-architecture model must have."""
    e, v, ff = info.n_embd, info.n_vocab, info.n_ff
    q, kv = info.n_head * info.head_dim, info.n_head_kv * info.head_dim
    shapes = {"token_embd.weight": (e, v), "output_norm.weight": (e,)}
    for i in range(info.n_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (e,), b + "attn_q.weight": (e, q), b + "attn_k.weight": (e, kv),
                       b + "attn_v.weight": (e, kv), b + "attn_output.weight": (q, e), b + "ffn_norm.weight": (e,),
                       b + "ffn_gate.weight": (e, ff), b + "ffn_up.weight": (e, ff), b + "ffn_down.weight": (ff, e)})
    return shapes


def check_model(info: GGUFInfo) -> None:
    """Architecture and shapes as llama.cpp will expect them, checked before it loads the file
    (it asserts — and aborts the process — on some inconsistencies)."""
    where = f"{info.path}: "
    if info.architecture != "llama":
        return  # other architectures: llama.cpp's own loader checks them
    if min(info.n_layers, info.n_embd, info.n_head, info.n_head_kv, info.head_dim, info.n_ff, info.n_vocab) <= 0:
        raise CorruptModelError(where + "missing or zero model dimensions in the metadata; rebuild the model")
    if info.n_head % info.n_head_kv:
        raise CorruptModelError(where + f"{info.n_head} heads are not a multiple of {info.n_head_kv} KV heads")
    have = {t.name: t.shape for t in info.tensors}
    for name, shape in expected_shapes(info).items():
        if name not in have:
            raise CorruptModelError(where + f"tensor {name} is missing; rebuild or re-download the model")
        if tuple(have[name]) != shape:
            raise CorruptModelError(where + f"tensor {name} is {list(have[name])}, expected {list(shape)}")
    if "output.weight" in have and tuple(have["output.weight"]) != (info.n_embd, info.n_vocab):
        raise CorruptModelError(where + f"tensor output.weight is {list(have['output.weight'])}")
