"""Streaming safetensors reading and writing, one tensor at a time.

The ``safetensors`` package cannot hand BF16 to numpy (numpy has no bfloat16) without torch, and
loading a 47 GB checkpoint whole is exactly what conversion must avoid. The format is a
little-endian u64 header length, a JSON header, then raw tensor bytes; this module reads the header
with bounds checks and reads each tensor with one seek + read, so peak memory is one tensor.
BF16 data comes back as ``uint16`` (its raw bits); :func:`bf16_to_f32` widens it exactly.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_magistral.errors import CorruptModelError

MAX_HEADER = 100 * 1024 * 1024

TensorSource = Callable[[], np.ndarray]

# safetensors dtype -> (numpy dtype used to hold the raw bytes, bytes per element)
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: enough to read it later without holding it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute offset of the first byte in ``file``
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> list[TensorRef]:
    """Parse and validate a safetensors header; raise CorruptModelError naming the file."""
    size = path.stat().st_size

    def bad(what: str) -> CorruptModelError:
        return CorruptModelError(f"{path}: {what}; the checkpoint is incomplete or corrupt, download it again")

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise bad(f"header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base = 8 + n
    refs = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry") from None
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {dtype}")
        ref = TensorRef(name, dtype, shape, path, base + int(start), int(end) - int(start))
        if ref.n_bytes != ref.n_elements * DTYPES[dtype].itemsize or start < 0:
            raise bad(f"tensor {name!r} byte range does not match its shape")
        if ref.offset + ref.n_bytes > size:
            raise bad(f"tensor {name!r} ends past the end of the file (truncated)")
        refs.append(ref)
    return refs


def read_tensor(ref: TensorRef, f: BinaryIO | None = None) -> np.ndarray:
    """Read one tensor's raw data (BF16 as uint16 bits) with a single seek and read."""
    own = f is None
    fh = open(ref.file, "rb") if own else f
    try:
        fh.seek(ref.offset)
        arr = np.fromfile(fh, dtype=DTYPES[ref.dtype], count=ref.n_elements)
    finally:
        if own:
            fh.close()
    if arr.size != ref.n_elements:
        raise CorruptModelError(f"{ref.file}: tensor {ref.name!r} is truncated; download the checkpoint again")
    return arr.reshape(ref.shape)


def read_rows(ref: TensorRef, f: BinaryIO, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a tensor (first axis), read without touching the rest."""
    row = ref.n_elements // ref.shape[0]
    dt = DTYPES[ref.dtype]
    f.seek(ref.offset + start * row * dt.itemsize)
    arr = np.fromfile(f, dtype=dt, count=(stop - start) * row)
    if arr.size != (stop - start) * row:
        raise CorruptModelError(f"{ref.file}: tensor {ref.name!r} is truncated; download the checkpoint again")
    return arr.reshape((stop - start, *ref.shape[1:]))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw BF16 bits to float32 exactly (BF16 is the top half of an IEEE float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to BF16 bits, nearest-even (as torch and gguf do); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def write_safetensors(path: Path, tensors: Iterable[tuple[str, str, tuple[int, ...], TensorSource]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: ``(name, dtype, shape, source)`` where ``source()`` yields
    the raw array when called. The file appears under its name only once complete."""
    items = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in items:
        n = DTYPES[dtype].itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, source in items:
            arr = np.ascontiguousarray(source(), dtype=DTYPES[dtype])
            if arr.shape != tuple(shape):
                raise ValueError(f"{name}: shape {arr.shape} != {shape}")
            arr.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

