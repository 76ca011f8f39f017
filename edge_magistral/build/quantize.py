"""Quantize a GGUF with llama.cpp's own quantizer, through the llama-cpp-python bindings.

Any llama.cpp file type is accepted by name (``Q4_K_M``, ``IQ4_XS``, ``Q8_0``…); unknown names are
refused before any work starts. An importance matrix (llama.cpp's GGUF ``imatrix`` format or the
legacy ``.dat``) can be passed. Output is written as ``NAME.partial`` and renamed when complete.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_magistral.errors import BackendError, BadInputError, CorruptModelError, StorageError
from edge_magistral.gguf_info import check_gguf

# Approximate bits per weight of each file type on Magistral's shapes, for disk-space checks.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.70, "Q5_K_S": 5.52,
    "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q4_1": 5.0, "IQ4_XS": 4.25,
    "IQ4_NL": 4.5, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35,
}
DEFAULT_BITS = 16.0  # unknown types: assume the worst we can produce

ProgressFn = Callable[[int, int, str], None]  # (tensor index, tensor count, tensor name)
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


@lru_cache(maxsize=1)
def file_types() -> dict[str, int]:
    """llama.cpp's file types by their usual name (Q4_K_M, F16, …), from the bindings."""
    import llama_cpp

    out = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_") and attr != "LLAMA_FTYPE_GUESSED":
            name = attr.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
            out[name] = int(getattr(llama_cpp, attr))
    return out


def parse_quants(spec: str | list[str]) -> list[str]:
    """Validate quant names (case-insensitive, comma-separated); refuse unknown ones up front."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    known = file_types()
    out = []
    for raw in names:
        name = raw.strip().upper()
        if not name:
            continue
        if name not in known:
            raise BadInputError(f"unknown quant {raw.strip()!r}; choose from: {', '.join(sorted(known))}")
        if name not in out:
            out.append(name)
    if not out:
        raise BadInputError("no quant given; e.g. --quants Q4_K_M,Q5_K_M,Q6_K,Q8_0")
    return out


def estimated_size(n_params: int, quant: str) -> int:
    return int(n_params * BITS_PER_WEIGHT.get(quant, DEFAULT_BITS) / 8) + 16 * 1024 * 1024


# ------------------------------------------------------------------------------------ imatrix

def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Per-tensor importance values, normalised as llama-quantize does (sums / counts)."""
    if not path.is_file():
        raise BadInputError(f"{path}: no such importance-matrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _imatrix_gguf(path) if magic == b"GGUF" else _imatrix_legacy(path)


def _imatrix_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    check_gguf(path)
    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data, dtype=np.float32).reshape(-1) for x in r.tensors}
    out = {}
    for name, sums in t.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = t.get(base + ".counts")
        if counts is None or sums.size % counts.size:
            raise CorruptModelError(f"{path}: imatrix entry {base!r} has no matching counts")
        per = sums.reshape(counts.size, -1)
        c = counts.reshape(-1, 1)
        out[base] = np.where(c > 0, per / np.where(c > 0, c, 1), 1.0).astype(np.float32).reshape(-1)
    if not out:
        raise CorruptModelError(f"{path}: no importance-matrix entries found")
    return out


def _imatrix_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    bad = CorruptModelError(f"{path}: not a valid imatrix file (GGUF or legacy .dat)")
    try:
        (n,), pos, out = struct.unpack_from("<i", data, 0), 4, {}
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, pos)
            name = data[pos + 4: pos + 4 + ln].decode()
            pos += 4 + ln
            ncall, nval = struct.unpack_from("<ii", data, pos)
            pos += 8
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            out[name] = vals / ncall if ncall > 0 else vals
    except (struct.error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not out:
        raise bad
    return out


def _imatrix_param(values: dict[str, np.ndarray]):
    """A NULL-terminated llama_model_imatrix_data array; returns it and the buffers it points into."""
    import llama_cpp

    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for i, (name, v) in enumerate(values.items()):
        if not np.all(np.isfinite(v)):
            raise CorruptModelError(f"imatrix entry {name!r} contains non-finite values")
        buf = np.ascontiguousarray(v, dtype=np.float32)
        keep.append(buf)
        arr[i].name = name.encode()
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    return arr, keep


# ----------------------------------------------------------------------------------- quantize

def quantize(src: Path, dst: Path, quant: str, nthread: int | None = None, imatrix: Path | None = None,
             progress: ProgressFn | None = None) -> Path:
    """Quantize ``src`` (an F32/F16/BF16 GGUF) to ``dst`` as ``quant``; atomic."""
    import llama_cpp

    from edge_magistral import llama_log

    ftype = file_types().get(quant.upper())
    if ftype is None:
        parse_quants(quant)  # raises with the list of valid names
    check_gguf(src)
    if not dst.parent.is_dir() or not os.access(dst.parent, os.W_OK):
        raise StorageError(f"{dst.parent}: output directory is missing or not writable")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread or (os.cpu_count() or 1)
    params.max_buf_size = 1 << 30  # bound the quantizer's working set to 1 GiB of rows
    keep = None
    if imatrix is not None:
        arr, keep = _imatrix_param(load_imatrix(imatrix))
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    tmp = dst.with_name(dst.name + ".partial")
    errors: list[str] = []

    def on_line(line: str) -> None:
        m = _TENSOR_LINE.match(line.strip())
        if m and progress:
            progress(int(m.group(1)), int(m.group(2)), m.group(3))
        if "error" in line.lower() or "failed" in line.lower():
            errors.append(line.strip())

    try:
        with llama_log.listen(on_line):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            why = errors[-1] if errors else f"llama_model_quantize returned {rc}"
            raise BackendError(f"quantizing {src.name} to {quant} failed: {why}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
        del keep
    return dst
