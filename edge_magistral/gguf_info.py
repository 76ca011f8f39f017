"""Model facts from a GGUF header, and a bounded pre-check that runs before llama.cpp sees a file.

llama.cpp aborts the whole process on many malformed files, so :func:`check_gguf` walks the header
in pure Python with hard limits (string and array lengths, tensor counts, dimensions, offsets
within the file) and raises :class:`CorruptModelError` with a one-line reason. :func:`read_info`
then reads the facts through ``gguf.GGUFReader`` (memory-mapped: nothing is loaded).
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from edge_magistral.errors import CorruptModelError, ModelNotFoundError

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


# --------------------------------------------------------------------------------------- pre-check

class _Cursor:
    """Bounded little-endian reads from a file: every read is checked against the file size."""

    def __init__(self, f: BinaryIO, size: int, path: str):
        self.f, self.size, self.path = f, size, path

    def fail(self, what: str) -> CorruptModelError:
        return CorruptModelError(f"{self.path}: not a valid GGUF file ({what}); re-download or rebuild it")

    def read(self, n: int, what: str) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise self.fail(f"truncated while reading {what}")
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail(f"truncated while reading {what}")
        return b

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.unpack("<Q", what)
        if n > limit:
            raise self.fail(f"{what} claims a length of {n} bytes")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            if depth > 2:
                raise self.fail(f"{what} nests arrays too deeply")
            sub = self.unpack("<I", what)
            n = self.unpack("<Q", what)
            if n > MAX_ARRAY:
                raise self.fail(f"{what} claims {n} array elements")
            if sub in _SCALARS:  # skip fixed-size arrays in one bounded seek
                nbytes = n * struct.calcsize(_SCALARS[sub])
                self.read_skip(nbytes, what)
                return n
            for _ in range(n):
                self.value(sub, what, depth + 1)
            return n
        raise self.fail(f"{what} has unknown value type {vtype}")

    def read_skip(self, n: int, what: str) -> None:
        if self.f.tell() + n > self.size:
            raise self.fail(f"truncated while reading {what}")
        self.f.seek(n, os.SEEK_CUR)


def _type_sizes() -> dict[int, tuple[int, int]]:
    import gguf

    return {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()}


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Validate a GGUF file's structure without trusting any length in it.

    Checks magic, version, counts, every key/value (bounded), at most 4 dims per tensor with no
    overflow, known tensor types, unique names, and that every tensor's data lies within the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"{p}: no such model file; check the path or run `edge-magistral build`")
    size = p.stat().st_size
    sizes = _type_sizes()
    with open(p, "rb") as f:
        c = _Cursor(f, size, str(p))
        if c.read(4, "magic") != GGUF_MAGIC:
            raise c.fail("bad magic: this is not a GGUF file")
        version = c.unpack("<I", "version")
        if version not in (2, 3):
            raise c.fail(f"unsupported GGUF version {version}")
        n_tensors = c.unpack("<Q", "tensor count")
        n_kv = c.unpack("<Q", "metadata count")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise c.fail(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
        keys: set[str] = set()
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}", limit=65536)
            if key in keys:
                raise c.fail(f"duplicate metadata key {key!r}")
            keys.add(key)
            vtype = c.unpack("<I", f"type of {key}")
            val = c.value(vtype, key)
            if key == "general.alignment":
                if not isinstance(val, int) or val <= 0 or val & (val - 1):
                    raise c.fail(f"bad alignment {val!r}")
                alignment = val
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}", limit=65536)
            if name in names:
                raise c.fail(f"duplicate tensor {name!r}")
            names.add(name)
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
            block, type_size = sizes[ttype]
            if shape[0] % block:
                raise c.fail(f"tensor {name!r} row of {shape[0]} is not a multiple of its block {block}")
            infos.append((name, offset, n_el // block * type_size))
        data_start = -(-f.tell() // alignment) * alignment
        for name, offset, nbytes in infos:
            if offset % alignment:
                raise c.fail(f"tensor {name!r} is misaligned")
            if data_start + offset + nbytes > size:
                raise c.fail(f"tensor {name!r} ends past the end of the file (truncated download?)")


# ------------------------------------------------------------------------------------------ facts

def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        part = name.split(".", 2)[1]
        if part.isdigit():
            return int(part)
    return None


def read_info(path: str | os.PathLike[str], check: bool = True) -> GGUFInfo:
    """Read a GGUF's facts (after the bounded pre-check unless ``check=False``)."""
    import gguf

    if check:
        check_gguf(path)
    p = Path(path)
    try:
        r = gguf.GGUFReader(str(p), "r")
    except (ValueError, OSError, struct.error, IndexError) as e:
        raise CorruptModelError(f"{p}: cannot read GGUF header ({e}); re-download or rebuild it") from None
    arch = _field(r, "general.architecture", "unknown")

    def a(key: str, default: Any = 0) -> Any:
        return _field(r, f"{arch}.{key}", default)

    tensors = [
        TensorFacts(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes),
                    int(t.data_offset))
        for t in r.tensors
    ]
    n_layers = int(a("block_count", 0))
    per_layer = [0] * n_layers
    tok_embd = out = 0
    types: dict[str, int] = {}
    n_params = 0
    for t in tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
        n = 1
        for d in t.shape:
            n *= d
        n_params += n
        layer = _layer_of(t.name)
        if layer is not None and layer < n_layers:
            per_layer[layer] += t.n_bytes
        elif t.name.startswith("token_embd"):
            tok_embd += t.n_bytes
        else:
            out += t.n_bytes
    n_embd = int(a("embedding_length", 0))
    n_head = int(a("attention.head_count", 0) or 0)
    head_dim = int(a("attention.key_length", 0) or (n_embd // n_head if n_head else 0))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(a("vocab_size", 0) or (len(tokens.data) if tokens is not None else 0))
    ftype = _field(r, "general.file_type")
    special = {}
    for key in ("bos", "eos", "unknown", "padding"):
        v = _field(r, f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            special[key] = int(v)
    special.update(_think_tokens(r, tokens))
    return GGUFInfo(
        path=str(p),
        file_size=p.stat().st_size,
        version=int(_field(r, "GGUF.version", 3) or 3),
        architecture=str(arch),
        name=str(_field(r, "general.name", "") or ""),
        file_type=int(ftype) if ftype is not None else None,
        file_type_name=_ftype_name(ftype),
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(a("attention.head_count_kv", n_head) or n_head),
        head_dim=head_dim,
        n_ff=int(a("feed_forward_length", 0) or 0),
        n_vocab=n_vocab,
        context_length=int(a("context_length", 0) or 0),
        rope_theta=_opt_float(a("rope.freq_base", None)),
        rms_eps=_opt_float(a("attention.layer_norm_rms_epsilon", None)),
        tokenizer_model=str(_field(r, "tokenizer.ggml.model", "") or ""),
        tokenizer_pre=str(_field(r, "tokenizer.ggml.pre", "") or ""),
        special_tokens=special,
        has_chat_template="tokenizer.chat_template" in r.fields,
        n_params=n_params,
        tensor_bytes=sum(t.n_bytes for t in tensors),
        bytes_per_layer=per_layer,
        token_embd_bytes=tok_embd,
        output_bytes=out,
        tensor_types=types,
        tensors=tensors,
    )


def _think_tokens(reader: Any, tokens: Any) -> dict[str, int]:
    """Find [THINK]/[/THINK] and the instruction tokens among the first (control) tokens."""
    if tokens is None:
        return {}
    wanted = {"[INST]": "inst", "[/INST]": "end_inst", "[THINK]": "think", "[/THINK]": "end_think",
              "[SYSTEM_PROMPT]": "system", "[/SYSTEM_PROMPT]": "end_system"}
    found = {}
    for i, idx in enumerate(tokens.data[:1000]):
        s = bytes(tokens.parts[idx]).decode("utf-8", "replace")
        if s in wanted:
            found[wanted[s]] = i
    return found


def _opt_float(v: Any) -> float | None:
    return float(v) if v is not None else None


def _ftype_name(ftype: Any) -> str:
    import gguf

    if ftype is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").replace("ALL_", "")
    except ValueError:
        return f"ftype {int(ftype)}"
