"""The devices the installed llama.cpp sees, through ggml's C API (ctypes, no llama-cpp-python
import). Run as ``python -m edge_magistral.hardware --ggml-devices`` in a child process, since a
backend may abort or grab a GPU."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from edge_magistral.hardware.model import GGMLDevice
from edge_magistral.hardware.parsing import as_str, norm_bus

_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


class _Caps(ctypes.Structure):
    _fields_ = [
        ("async_", ctypes.c_bool),
        ("host_buffer", ctypes.c_bool),
        ("buffer_from_host_ptr", ctypes.c_bool),
        ("events", ctypes.c_bool),
        ("mmap_support", ctypes.c_bool),
    ]


class _Props(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("description", ctypes.c_char_p),
        ("memory_free", ctypes.c_size_t),
        ("memory_total", ctypes.c_size_t),
        ("type", ctypes.c_int),
        ("device_id", ctypes.c_char_p),
        ("caps", _Caps),
    ]


def llama_lib_dir() -> Path | None:
    """The folder holding libllama/libggml: ``LLAMA_CPP_LIB_PATH`` or ``llama_cpp/lib``."""
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _load(lib_dir: Path, stem: str) -> ctypes.CDLL:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        p = lib_dir / name
        if p.exists():
            return ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
    raise OSError(f"{stem} not found in {lib_dir}")


def ggml_devices_here() -> list[dict[str, Any]]:
    """The devices the installed llama.cpp sees, through ggml's C API (runs in this process)."""
    lib_dir = llama_lib_dir()
    if lib_dir is None:
        raise OSError("llama_cpp is not installed")
    base = _load(lib_dir, "ggml-base")
    ggml = _load(lib_dir, "ggml")
    vp = ctypes.c_void_p
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = vp
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn, res in (
        ("ggml_backend_dev_name", ctypes.c_char_p),
        ("ggml_backend_dev_description", ctypes.c_char_p),
        ("ggml_backend_dev_type", ctypes.c_int),
        ("ggml_backend_dev_backend_reg", vp),
    ):
        f = getattr(base, fn)
        f.restype, f.argtypes = res, [vp]
    base.ggml_backend_dev_memory.argtypes = [
        vp,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_get_props.argtypes = [vp, ctypes.POINTER(_Props)]
    base.ggml_backend_dev_get_props.restype = None
    base.ggml_backend_reg_name.argtypes = [vp]
    base.ggml_backend_reg_name.restype = ctypes.c_char_p
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all()  # builds with dynamic backends register them only here
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        props = _Props()
        base.ggml_backend_dev_get_props(dev, ctypes.byref(props))
        reg = base.ggml_backend_dev_backend_reg(dev)
        out.append(
            {
                "name": as_str(base.ggml_backend_dev_name(dev) or b""),
                "description": as_str(base.ggml_backend_dev_description(dev) or b""),
                "type": _DEV_TYPES.get(base.ggml_backend_dev_type(dev), "unknown"),
                "backend": as_str(base.ggml_backend_reg_name(reg) or b"") if reg else "",
                "free_bytes": int(free.value),
                "total_bytes": int(total.value),
                "device_id": as_str(props.device_id or b""),
            }
        )
    return out


def parse_ggml_devices(raw: list[dict[str, Any]] | None) -> list[GGMLDevice] | None:
    if raw is None:
        return None
    return [
        GGMLDevice(
            name=str(d["name"]),
            description=str(d.get("description", "")),
            type=str(d["type"]),
            backend=str(d.get("backend", "")),
            free_bytes=int(d["free_bytes"]),
            total_bytes=int(d["total_bytes"]),
            device_id=norm_bus(str(d.get("device_id", ""))),
        )
        for d in raw
    ]
