"""llama.cpp's RPC backend (ggml-rpc) through ctypes: register remote workers in a head, serve this
box's devices in a worker.

llama-cpp-python 0.3.36 has no binding for it (``Llama(rpc_servers=...)`` was removed in 0.3.10
and is silently ignored) and its default build has no RPC backend. The library is
``llama_cpp/lib/libggml-rpc.so`` (or ``$EDGE_MAGISTRAL_RPC_LIB``), from either:

- an RPC build of llama-cpp-python: ``CMAKE_ARGS="-DGGML_RPC=on" pip install ...``;
- ``scripts/build_rpc_backend.py``: compiles only ggml-rpc, from the source of the installed
  llama-cpp-python version, against its ``libggml-base`` (seconds, not a 20-minute rebuild).

Both export ``ggml_backend_rpc_add_server`` and ``ggml_backend_rpc_start_server``, which is all
this module calls. Everything here must run in the process that loads the model (a head) or serves
(a worker): llama.cpp keeps its device registry per process.

Wheels copy shared libraries instead of linking them (``libggml.so``, ``libggml.so.0`` … are
distinct files), so the registry must be reached through ``libggml.so.0``, the file ``libllama``
itself loaded; opening ``libggml.so`` would load a second registry that llama.cpp never reads.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from edge_magistral.errors import BackendError

LIB_ENV = "EDGE_MAGISTRAL_RPC_LIB"
LIB_NAME = "libggml-rpc.so"
GGML_NAME = "libggml.so.0"  # the copy libllama links (see the module docstring)

# ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL = 0, 1, 2, 3

BUILD_HINT = (
    "build it with `python scripts/build_rpc_backend.py` (seconds), or install an RPC build: "
    'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36'
)


def llama_lib_dir() -> Path:
    """``llama_cpp/lib`` of the installed llama-cpp-python (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise BackendError("llama-cpp-python is not installed: install the project first (README.md)")
    return Path(spec.origin).parent / "lib"


def library_path() -> Path | None:
    """The RPC backend library if there is one: ``$EDGE_MAGISTRAL_RPC_LIB``, else beside llama.cpp."""
    if env := os.environ.get(LIB_ENV):
        return Path(env)
    try:
        p = llama_lib_dir() / LIB_NAME
    except BackendError:
        return None
    return p if p.is_file() else None


def why_unavailable() -> str | None:
    """None when RPC can be used here; else a one-line reason with what to do."""
    p = library_path()
    if p is None:
        return f"llama.cpp's RPC backend ({LIB_NAME}) is not installed: {BUILD_HINT}"
    if not p.is_file():
        return f"${LIB_ENV} names {p}, which does not exist: {BUILD_HINT}"
    return None


@dataclass(frozen=True)
class LocalDevice:
    """A device of this box as llama.cpp's registry lists it."""

    index: int
    name: str
    description: str
    kind: int  # DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL
    free_bytes: int
    total_bytes: int


class _Libs:
    """The two libraries, loaded once per process, with their signatures declared."""

    def __init__(self) -> None:
        why = why_unavailable()
        if why:
            raise BackendError(why)
        import llama_cpp  # noqa: F401  (loads libllama, and with it the libggml this must share)

        self.ggml = ctypes.CDLL(str(llama_lib_dir() / GGML_NAME))
        self.rpc = ctypes.CDLL(str(library_path()))
        g, r = self.ggml, self.rpc
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        g.ggml_backend_register.argtypes = [vp]
        g.ggml_backend_register.restype = None
        g.ggml_backend_dev_count.argtypes = []
        g.ggml_backend_dev_count.restype = sz
        g.ggml_backend_dev_get.argtypes = [sz]
        g.ggml_backend_dev_get.restype = vp
        for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(g, fn).argtypes = [vp]
            getattr(g, fn).restype = ctypes.c_char_p
        g.ggml_backend_dev_type.argtypes = [vp]
        g.ggml_backend_dev_type.restype = ctypes.c_int
        g.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
        g.ggml_backend_dev_memory.restype = None
        r.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        r.ggml_backend_rpc_add_server.restype = vp
        r.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, sz, sz, vp]
        r.ggml_backend_rpc_start_server.restype = None


_libs: _Libs | None = None
_registered: dict[str, list[str]] = {}


def _load() -> _Libs:
    global _libs
    if _libs is None:
        _libs = _Libs()
    return _libs


def local_devices() -> list[LocalDevice]:
    """Every device in this process's llama.cpp registry (RPC devices of registered workers too)."""
    g = _load().ggml
    out = []
    for i in range(g.ggml_backend_dev_count()):
        d = g.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
        out.append(
            LocalDevice(
                i,
                (g.ggml_backend_dev_name(d) or b"").decode(errors="replace"),
                (g.ggml_backend_dev_description(d) or b"").decode(errors="replace"),
                g.ggml_backend_dev_type(d),
                free.value,
                total.value,
            )
        )
    return out


def register_workers(endpoints: list[str]) -> list[str]:
    """Add each worker's devices to llama.cpp's registry, in order, before the model loads.

    llama.cpp puts RPC devices first in its device order (then local GPUs), so a plan's
    ``tensor_split`` lists the workers' devices first, in this order. The caller must have probed
    every endpoint (``probe.probe``): a worker that does not answer, or speaks another protocol
    version, aborts this process inside llama.cpp. Registering an endpoint twice is a no-op.
    Returns the names of the RPC devices now registered for these endpoints. Workers once
    registered stay for the life of the process (llama.cpp loads onto every registered RPC device),
    so another set of workers needs another process.
    """
    libs = _load()
    if stale := sorted(set(_registered) - set(endpoints)):
        # llama.cpp uses every registered RPC device and has no way to unregister one
        raise BackendError(f"this process already placed layers on RPC worker(s) {', '.join(stale)}: "
                           "load a model with other workers in a new process")
    names: list[str] = []
    for ep in endpoints:
        if ep not in _registered:
            before = {d.name for d in local_devices()}
            reg = libs.rpc.ggml_backend_rpc_add_server(ep.encode())
            if not reg:
                raise BackendError(f"RPC worker {ep} offers no device: start it with at least one device")
            libs.ggml.ggml_backend_register(reg)
            _registered[ep] = [d.name for d in local_devices() if d.name not in before]
        names += _registered[ep]
    return names


class _Override(ctypes.Structure):
    """llama.cpp's ``llama_model_tensor_buft_override``: tensors whose name matches go to ``buft``."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# The output matrix, and a tied model's copy of the token embeddings that stands for it.
OUTPUT_TENSORS = rb"^(output|token_embd)\.weight$"
_host_output: ctypes.Array | None = None  # kept alive while llama.cpp may read it


def host_output_overrides() -> int:
    """A NULL-terminated override list (its address) that keeps the output layer's weights in the
    CPU's buffer type, for ``llama_model_params.tensor_buft_overrides``. llama.cpp then runs the
    output matmul on the CPU next to them (the RPC backend offloads no op)."""
    global _host_output
    if _host_output is None:
        base = ctypes.CDLL(str(llama_lib_dir() / "libggml-base.so.0"))
        base.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
        _host_output = (_Override * 2)(_Override(OUTPUT_TENSORS, base.ggml_backend_cpu_buffer_type()),
                                       _Override(None, None))
    return ctypes.addressof(_host_output)


def registered_endpoints() -> list[str]:
    """The workers this process has handed to llama.cpp (they stay until the process ends)."""
    return list(_registered)


def serve_devices(use_cpu: bool) -> list[LocalDevice]:
    """What a worker serves: every GPU (discrete or integrated) llama.cpp sees, or the CPU when
    there is none or ``use_cpu`` asks for it."""
    devs = [d for d in local_devices() if not d.name.startswith("RPC")]
    gpus = [d for d in devs if d.kind in (DEV_GPU, DEV_IGPU)]
    if gpus and not use_cpu:
        return gpus
    return [d for d in devs if d.kind == DEV_CPU][:1]


def serve_forever(endpoint: str, cache_dir: str | None, n_threads: int, devices: list[LocalDevice]) -> None:
    """Serve ``devices`` on ``endpoint`` (host:port) until the process ends; one client at a time.

    Blocks inside llama.cpp, so it belongs in a process of its own (``rpc-worker`` runs it in a
    supervised child). ``cache_dir`` lets a head skip sending weights the worker already has.
    """
    libs = _load()
    by_index = {d.index: libs.ggml.ggml_backend_dev_get(d.index) for d in devices}
    arr = (ctypes.c_void_p * len(devices))(*by_index.values())
    cache = cache_dir.encode() if cache_dir else None
    libs.rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache, n_threads, len(devices), arr)
    raise BackendError(f"llama.cpp's RPC server on {endpoint} stopped (is the port taken?)")
