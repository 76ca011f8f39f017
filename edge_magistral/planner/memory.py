"""The memory model: what llama.cpp allocates on each device for one set of load settings.

Weights by the layers each device gets, the KV cache by type and context, compute buffers by
batch, context and flash attention, and a per-device overhead. It mirrors llama.cpp's own rules
and is checked against llama.cpp's dry-run numbers (tests/test_dryrun.py). Pure arithmetic: no
llama.cpp import.

With N parallel slots llama.cpp keeps N + 1 KV streams of n_ctx cells (the extra one is the
prefix cache), one logits row per stream, and a compute buffer reserved for a ubatch split
across the streams.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edge_magistral.catalog import ModelCandidate
from edge_magistral.planner.types import Device, DeviceMemory, Pool, PoolUse, Settings
from edge_magistral.units import MiB

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.profiles import Profile

KV_BYTES = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}  # (block, bytes per block), as ggml
GPU_OVERHEAD = {"cuda": 512 * MiB, "rocm": 512 * MiB, "metal": 256 * MiB, "vulkan": 384 * MiB}
HOST_OVERHEAD = 400 * MiB  # Python, llama.cpp's code and the tokenizer
OP_OFFLOAD_MIN_BATCH = 32  # ubatches this large run CPU-resident matmuls on the GPU (weights copied over)
CPU_EFFICIENCY = 0.6  # share of host memory bandwidth a CPU decode achieves
DEFAULT_GPU_GBS = 300.0
# With several slots the engine loads its llama_cpp.Llama object with this context before it
# builds the real one (llama-cpp-python insists on a context at load); it sizes the host's logits.
BATCH_LOAD_CTX = 256


def kv_bytes_per_cell(m: ModelCandidate, type_k: str, type_v: str) -> int:
    """KV cache bytes per context cell, all layers."""
    n = m.n_head_kv * m.head_dim
    return m.n_layers * (_row_bytes(n, type_k) + _row_bytes(n, type_v))


def _row_bytes(n: int, t: str) -> int:
    block, size = KV_BYTES[t]
    return n // block * size


def kv_cells(n_ctx: int) -> int:
    """llama.cpp pads the context to a multiple of 256 cells."""
    return -(-n_ctx // 256) * 256


def kv_streams(s: Settings) -> tuple[int, int]:
    """(KV streams, cells per stream). One stream for one slot; n_slots + 1 for several, padded
    as llama_context's constructor does: the total to 256, then each stream to 256."""
    if s.n_slots <= 1:
        return 1, kv_cells(s.n_ctx)
    n = s.n_slots + 1
    return n, kv_cells(kv_cells(n * s.n_ctx) // n)


def ubatch_tokens(s: Settings) -> int:
    """Tokens of the worst-case ubatch llama.cpp reserves its compute buffer for; with several
    streams, graph_reserve rounds it up to a multiple of the streams."""
    streams, _ = kv_streams(s)
    if streams == 1:
        return min(s.n_ctx, s.n_batch, s.n_ubatch)
    ub = min(streams * s.n_ctx, s.n_batch, s.n_ubatch)
    return -(-ub // streams) * streams


def _host_logits_rows(s: Settings) -> int:
    """Rows of llama-cpp-python's scores array: n_batch of the Llama object, which the engine
    loads with a throwaway 256-cell context when it has several slots."""
    return min(s.n_ctx if s.n_slots <= 1 else BATCH_LOAD_CTX, s.n_batch)


def layer_devices(n_layers: int, n_gpu_layers: int, splits: list[int]) -> list[int | None]:
    """Device index per layer 0..n_layers (the last entry is the output layer); None is the CPU.

    As llama.cpp's ``load_tensors``: the last ``n_gpu_layers`` of the n_layers + 1 go to the GPUs,
    spread in proportion to ``splits`` (free memory by default).
    """
    if not splits or n_gpu_layers <= 0:
        return [None] * (n_layers + 1)
    total = sum(splits) or 1
    cum, acc = [], 0.0
    for s in splits:
        acc += s
        cum.append(acc / total)
    start = max(n_layers + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layers + 1)
    out: list[int | None] = []
    for il in range(n_layers + 1):
        if il < start:
            out.append(None)
            continue
        x = (il - start) / act
        out.append(next((i for i, c in enumerate(cum) if c > x), len(cum) - 1))
    return out


@dataclass(frozen=True)
class Stages:
    """Peak live bytes of the graph's stages for one ubatch (ggml-alloc's high-water mark)."""

    logits: int  # the output matmul and its logits
    layer: int  # the heaviest part of one repeating layer (attention or FFN), incl. the KQ mask
    attn: int  # the attention part alone (what stays on a CPU that only runs attention)
    slack: int  # allocator fragmentation seen in dry runs: one n_embd x n_ubatch f32 tensor


def compute_stages(m: ModelCandidate, s: Settings) -> Stages:
    """Compute-buffer stages of llama.cpp's llama graph, fitted to its dry runs on Magistral's shape."""
    n_ub = ubatch_tokens(s)
    n_kv = kv_streams(s)[1]  # each stream attends to its own cells
    per_tok = 4 * n_ub  # one f32 value per token
    n_q, n_kvd = m.n_head * m.head_dim, m.n_head_kv * m.head_dim
    mask = n_kv * n_ub * (2 if s.flash_attn else 4)
    logits = n_ub * m.n_vocab * 4 + 2 * m.n_embd * per_tok
    ffn = mask + per_tok * (3 * m.n_ff + 3 * m.n_embd + n_q)
    if s.flash_attn:
        attn = mask + per_tok * (2 * n_q + 2 * n_kvd + 2 * m.n_embd)
    else:
        attn = mask + n_kv * n_ub * m.n_head * 4 + per_tok * (3 * m.n_embd + 2 * n_q + 2 * n_kvd)
    return Stages(logits=logits, layer=max(ffn, attn), attn=attn, slack=m.n_embd * per_tok)


def tied_output(m: ModelCandidate) -> ModelCandidate:
    """A model without an output matrix (its output reuses the token embeddings) gets a copy of
    them on the device of the output layer, as llama.cpp loads it (less than a bit per output
    weight means no output matrix)."""
    if m.output_bytes * 8 >= m.n_vocab * m.n_embd:
        return m
    return replace(m, output_bytes=m.output_bytes + m.token_embd_bytes)


def remote_layers_compute(m: ModelCandidate, s: Settings, layers: int, output_counted: bool) -> int:
    """The compute buffer of an RPC worker's device that runs only repeating layers (its logits
    are computed elsewhere): ggml-alloc's peak is the FFN of its last layer (the normed input, gate,
    up and their product: 3 x n_ff + 2 x n_embd floats a token), plus the attention mask while a
    later layer here still needs it, plus the split's output rows where llama.cpp counts the output
    layer (its weights kept on the head). Exact, to llama.cpp's logged KiB, on two-worker loads of
    SmolLM2 and the tiny Magistral."""
    if layers <= 0:
        return m.n_embd * 4 * ubatch_tokens(s) if output_counted else 0
    st = compute_stages(m, s)
    per_tok = 4 * ubatch_tokens(s)
    ffn = per_tok * (3 * m.n_ff + 2 * m.n_embd)
    mask = kv_streams(s)[1] * ubatch_tokens(s) * (2 if s.flash_attn else 4) if layers > 1 else 0
    return max(ffn, st.attn) + mask + (m.n_embd * per_tok if output_counted else 0)


def predict(m: ModelCandidate, s: Settings, gpus: list[Device]) -> list[DeviceMemory]:
    """Bytes llama.cpp will allocate per device (CPU first, then each GPU) for these settings."""
    devs = layer_devices(m.n_layers, s.n_gpu_layers, [g.split_bytes for g in gpus])
    cpu = DeviceMemory(
        "CPU", weights=m.token_embd_bytes, overhead=HOST_OVERHEAD + _host_logits_rows(s) * m.n_vocab * 4
    )
    out = {
        None: cpu,
        **{
            i: DeviceMemory(g.name, overhead=GPU_OVERHEAD.get(g.backend, 512 * MiB))
            for i, g in enumerate(gpus)
        },
    }
    streams, cells = kv_streams(s)
    kv_layer = streams * cells * kv_bytes_per_cell(m, s.type_k, s.type_v) // max(1, m.n_layers)
    for il in range(m.n_layers):
        d = out[devs[il]]
        d.weights += m.bytes_per_layer[il] if il < len(m.bytes_per_layer) else 0
        d.kv_cache += kv_layer
        d.layers += 1
    out[devs[m.n_layers]].weights += m.output_bytes
    _add_compute(m, s, gpus, devs, out)
    cpu.compute += (streams - 1) * m.n_vocab * 4  # llama.cpp's host output buffer: a logits row per stream
    return list(out.values())


def _add_compute(
    m: ModelCandidate,
    s: Settings,
    gpus: list[Device],
    devs: list[int | None],
    out: dict[int | None, DeviceMemory],
) -> None:
    st = compute_stages(m, s)
    if not gpus:
        out[None].compute = max(st.logits, st.layer) + st.slack
        return
    n_ub = ubatch_tokens(s)
    op_offload = n_ub >= OP_OFFLOAD_MIN_BATCH
    cpu_layers = sum(1 for d in devs[:-1] if d is None)
    output_on_cpu = devs[-1] is None
    for i in range(len(gpus)):
        stages = []
        if any(d == i for d in devs[:-1]):
            stages.append(st.layer)
        if devs[-1] == i:
            stages.append(st.logits)
        if i == 0 and op_offload:  # big batches run CPU-resident matmuls here, weights copied in
            if cpu_layers:
                stages.append(st.layer + m.largest_matrix_bytes)
            if output_on_cpu:
                stages.append(st.logits + m.output_bytes)
        out[i].compute = max(stages) + st.slack if stages else 0
    host = 2 * m.n_embd * 4 * n_ub  # token embeddings and the copies of inputs
    if cpu_layers:
        host += st.attn  # attention of CPU layers runs next to their KV cache
    if output_on_cpu and not op_offload:
        host = max(host, st.logits)
    out[None].compute = host + st.slack


def devices_of(hw: Hardware) -> tuple[list[Device], dict[str, Pool]]:
    """The GPUs llama.cpp can use on this box and the memory pools (RAM, each discrete GPU)."""
    pools = {"RAM": Pool("RAM", hw.usable_ram_bytes, 0)}
    gpus = []
    for i, g in enumerate(hw.runnable_gpus()):
        name = g.ggml_device or f"GPU{i}"
        backend = _backend_of(name, g.vendor)
        if g.unified:
            cap = Pool(f"{name} (unified)", g.free_bytes, 0)
            pools[cap.name] = cap
            dev_pools: tuple[str, ...] = (cap.name, "RAM")
        else:
            pools[name] = Pool(name, g.free_bytes, 0)
            dev_pools = (name,)
        gpus.append(Device(name, "gpu", backend, g.free_bytes, dev_pools, g.bandwidth_gbs or DEFAULT_GPU_GBS))
    return gpus, pools


def _backend_of(name: str, vendor: str) -> str:
    n = name.lower()
    for b in ("cuda", "rocm", "metal", "vulkan"):
        if n.startswith(b) or (b == "metal" and n.startswith("mtl")):
            return b
    return {"nvidia": "cuda", "amd": "rocm", "apple": "metal"}.get(vendor, "vulkan")


def pool_use(mem: list[DeviceMemory], gpus: list[Device], pools: dict[str, Pool]) -> list[PoolUse]:
    """Need per pool: each device's total counted once in every pool it draws from."""
    need = {p: 0 for p in pools}
    pools_of = {g.name: g.pools for g in gpus}
    for d in mem:
        for p in pools_of.get(d.device, ("RAM",)):
            need[p] += d.total
    return [PoolUse(p, need[p], pools[p].budget) for p in pools]


def tokens_per_s(m: ModelCandidate, mem: list[DeviceMemory], gpus: list[Device], profile: Profile) -> float:
    """Decode speed estimate: each token reads every weight once and half the KV cache on average."""
    bw = {g.name: g.bandwidth_gbs * 1e9 * profile.gpu_efficiency for g in gpus}
    seconds = 0.0
    for d in mem:
        read = d.weights + d.kv_cache // 2
        if d.device == "CPU":
            read -= m.token_embd_bytes  # one row per token
            seconds += max(0, read) / (profile.cpu_bandwidth_gbs * 1e9 * CPU_EFFICIENCY)
        else:
            seconds += read / bw[d.device]
    return 1.0 / seconds if seconds > 0 else 0.0
