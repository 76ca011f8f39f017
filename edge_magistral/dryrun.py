"""Ask llama.cpp itself what a load would allocate, without allocating it.

With ``no_alloc`` set in the model parameters (and ``load_mode = LLAMA_LOAD_MODE_NONE``: the default
mmap mode asserts and aborts), llama.cpp reads only the GGUF header, simulates every allocation
and logs the buffer sizes it would have made: weights per buffer, the KV cache, the compute
buffers. This is the same dry run llama.cpp's ``--fit`` relies on. The load runs in a child
process that streams llama.cpp's log back, so an abort inside llama.cpp costs only the child.

``n_slots > 1`` simulates the context the engine creates for several slots:
``n_seq_max = n_slots + 1`` per-sequence KV streams (``kv_unified`` off) of ``n_ctx`` cells each,
so the planner's prediction for parallel slots is checked against llama.cpp too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from edge_magistral.errors import BackendError, ModelNotFoundError
from edge_magistral.generation import KV_TYPES
from edge_magistral.gguf_info import GGUFInfo
from edge_magistral.paths import child_env
from edge_magistral.units import MiB


@dataclass(frozen=True)
class DryRunRequest:
    """The load to simulate: the same knobs a Plan sets."""

    model_path: str
    n_ctx: int
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 1
    n_slots: int = 1  # >1: the engine's context for several slots, n_slots + 1 KV streams of n_ctx cells


@dataclass
class DryRunResult:
    """Buffer sizes (bytes) as llama.cpp logged them, by buffer name ("CPU", "CUDA0", "CUDA_Host")."""

    model_buffers: dict[str, int] = field(default_factory=dict)
    kv_bytes: int = 0
    kv_k_bytes: int = 0
    kv_v_bytes: int = 0
    kv_cells: int = 0  # per KV stream
    kv_streams: int = 1
    compute_buffers: dict[str, int] = field(default_factory=dict)
    output_buffers: dict[str, int] = field(default_factory=dict)
    n_ctx: int = 0
    model_size: int = 0  # llama_model_size(): all tensor bytes
    layer_devices: list[str] = field(default_factory=list)  # per layer, then the output layer
    kv_devices: list[str] = field(default_factory=list)  # per layer with a KV cache
    log: str = ""

    @property
    def weights_bytes(self) -> int:
        return sum(self.model_buffers.values())

    @property
    def compute_bytes(self) -> int:
        return sum(self.compute_buffers.values())

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("log")
        return d


_MIB = r"([0-9.]+) MiB"
_RE_MODEL = re.compile(rf"load_tensors:\s+(\S+) model buffer size =\s+{_MIB}")
_RE_KV = re.compile(
    rf"llama_kv_cache: size =\s+{_MIB} \(\s*(\d+) cells.*?K \(\S+\):\s+{_MIB}, V \(\S+\):\s+{_MIB}"
)
_RE_KV_STREAMS = re.compile(r"llama_kv_cache: size =.*?\(.*?(\d+)/(\d+) seqs\)")
_RE_COMPUTE = re.compile(rf"(\S+) compute buffer size =\s+{_MIB}")
_RE_OUTPUT = re.compile(rf"(\S+)\s+output buffer size =\s+{_MIB}")
_RE_NCTX = re.compile(r"llama_context: n_ctx\s+=\s+(\d+)")
_RE_LAYER = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\S+?),")
_RE_KV_DEV = re.compile(r"llama_kv_cache: layer\s+(\d+): dev = (\S+)")
_RE_SIZE = re.compile(r"edge_magistral: model_size = (\d+)")


def parse_log(log: str) -> DryRunResult:
    """Pull the buffer sizes out of llama.cpp's log (sizes are printed in MiB with 2 decimals)."""
    r = DryRunResult(log=log)
    for name, mib in _RE_MODEL.findall(log):
        r.model_buffers[name] = r.model_buffers.get(name, 0) + _b(mib)
    m = _RE_KV.search(log)
    if m:
        r.kv_bytes, r.kv_cells, r.kv_k_bytes, r.kv_v_bytes = (
            _b(m.group(1)),
            int(m.group(2)),
            _b(m.group(3)),
            _b(m.group(4)),
        )
    m = _RE_KV_STREAMS.search(log)
    if m:
        r.kv_streams = int(m.group(2))
    for name, mib in _RE_COMPUTE.findall(log):
        r.compute_buffers[name] = _b(mib)  # the last reservation is the one kept
    for name, mib in _RE_OUTPUT.findall(log):
        r.output_buffers[name] = _b(mib)
    m = _RE_NCTX.search(log)
    if m:
        r.n_ctx = int(m.group(1))
    m = _RE_SIZE.search(log)
    if m:
        r.model_size = int(m.group(1))
    r.layer_devices = [d for _, d in sorted(_RE_LAYER.findall(log), key=lambda x: int(x[0]))]
    r.kv_devices = [d for _, d in sorted(_RE_KV_DEV.findall(log), key=lambda x: int(x[0]))]
    return r


def host_device(buffer_name: str) -> bool:
    """Buffers in host memory: "CPU", "CPU_REPACK", "CPU_Mapped", "CUDA_Host", ..."""
    return buffer_name.startswith("CPU") or buffer_name.endswith("_Host")


def by_device(r: DryRunResult, info: GGUFInfo) -> dict[str, dict[str, int]]:
    """llama.cpp's allocations per device: weights by the layers llama.cpp placed there (bytes from
    the GGUF header; a dry run allocates no weight buffers), KV by its per-layer devices, compute
    buffers by name. Host buffers count as "CPU"."""
    out: dict[str, dict[str, int]] = {}

    def add(dev: str, key: str, n: int) -> None:
        d = out.setdefault("CPU" if host_device(dev) else dev, {"weights": 0, "kv_cache": 0, "compute": 0})
        d[key] += n

    add("CPU", "weights", info.token_embd_bytes)
    for il, dev in enumerate(r.layer_devices):
        add(dev, "weights", info.bytes_per_layer[il] if il < info.n_layers else info.output_bytes)
    n_kv = len(r.kv_devices) or 1
    for dev in r.kv_devices:
        add(dev, "kv_cache", r.kv_bytes // n_kv)
    for name, n in r.compute_buffers.items():
        add(name, "compute", n)
    for name, n in r.output_buffers.items():
        add(name, "compute", n)
    return out


def _b(mib: str) -> int:
    return round(float(mib) * MiB)


def dry_run(req: DryRunRequest, timeout_s: float = 300.0) -> DryRunResult:
    """Simulate the load in a child process and return what llama.cpp would allocate."""
    if not os.path.isfile(req.model_path):
        raise ModelNotFoundError(f"{req.model_path}: no such model file")
    if req.type_k not in KV_TYPES or req.type_v not in KV_TYPES:
        raise BackendError(
            f"unknown KV cache type {req.type_k!r}/{req.type_v!r}; use one of {', '.join(KV_TYPES)}"
        )
    cmd = [sys.executable, "-m", "edge_magistral.dryrun", json.dumps(asdict(req))]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout_s, env=child_env())
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"llama.cpp dry run of {req.model_path} did not finish in {timeout_s:.0f} s"
        ) from None
    log = p.stdout.decode("utf-8", "replace")
    if p.returncode != 0:
        tail = " | ".join((log + p.stderr.decode("utf-8", "replace")).strip().splitlines()[-4:])
        raise BackendError(f"llama.cpp dry run failed (exit {p.returncode}): {tail}")
    result = parse_log(log)
    if not result.model_buffers or not result.kv_bytes:
        raise BackendError("llama.cpp dry run logged no buffer sizes; is this llama-cpp-python 0.3.36?")
    return result


@dataclass
class Comparison:
    """Predicted vs llama.cpp's dry run, on the host (a CPU-only build puts everything there)."""

    request: DryRunRequest
    predicted: dict[str, int]
    llama_cpp: dict[str, int]

    def error(self, key: str) -> float:
        return self.predicted[key] / self.llama_cpp[key] - 1 if self.llama_cpp[key] else 0.0

    def errors(self) -> dict[str, float]:
        return {k: self.error(k) for k in self.predicted}


def compare(req: DryRunRequest, timeout_s: float = 300.0) -> Comparison:
    """Dry-run ``req`` and predict the same load with the planner's memory model."""
    from edge_magistral.catalog import from_gguf_info
    from edge_magistral.gguf_info import read_info
    from edge_magistral.planner import Settings, predict

    r = dry_run(req, timeout_s)
    info = read_info(req.model_path)
    actual = by_device(r, info)
    if set(actual) != {"CPU"}:
        raise BackendError(f"compare() covers CPU-only builds; llama.cpp placed buffers on {sorted(actual)}")
    a = actual["CPU"]
    s = Settings(
        req.n_ctx, req.n_gpu_layers, req.type_k, req.type_v, req.flash_attn, req.n_batch, req.n_ubatch,
        req.n_slots,
    )
    cpu = predict(from_gguf_info(info), s, gpus=[])[0]  # the devices this llama.cpp has: the CPU only
    predicted = {"weights": cpu.weights, "kv_cache": cpu.kv_cache, "compute": cpu.compute}
    predicted["total"] = sum(predicted.values())
    llama = {**a, "total": a["weights"] + a["kv_cache"] + a["compute"]}
    return Comparison(req, predicted, llama)


def _child(req: DryRunRequest) -> int:
    """Runs in the child: load with no_alloc, create the context, stream the log to stdout."""
    import llama_cpp

    from edge_magistral import llama_log

    llama_log.install()
    with llama_log.listen(lambda line: os.write(1, (line + "\n").encode())):
        return _simulate(llama_cpp, req)


def _simulate(llama_cpp, req: DryRunRequest) -> int:  # noqa: ANN001 (the llama_cpp module)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = req.n_gpu_layers
    mp.no_alloc = True
    mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    model = llama_cpp.llama_model_load_from_file(req.model_path.encode(), mp)
    if not model:
        os.write(2, b"model load failed\n")
        return 3
    os.write(1, f"edge_magistral: model_size = {llama_cpp.llama_model_size(model)}\n".encode())
    cp = llama_cpp.llama_context_default_params()
    if req.n_slots > 1:  # as the engine loads several slots: one stream of n_ctx cells per slot and the prefix
        cp.n_ctx = (req.n_slots + 1) * req.n_ctx
        cp.n_batch = req.n_batch
        cp.n_seq_max = req.n_slots + 1
        cp.kv_unified = False
    else:
        cp.n_ctx = req.n_ctx
        cp.n_batch = min(req.n_ctx, req.n_batch)  # as llama_cpp.Llama does
        cp.n_seq_max = 1
    cp.n_ubatch = min(cp.n_batch, req.n_ubatch)
    cp.n_threads = cp.n_threads_batch = req.n_threads
    cp.type_k = KV_TYPES[req.type_k]
    cp.type_v = KV_TYPES[req.type_v]
    cp.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if req.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        os.write(2, b"context creation failed\n")
        return 4
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(_child(DryRunRequest(**json.loads(sys.argv[1]))))
