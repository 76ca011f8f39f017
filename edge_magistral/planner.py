"""The planner: which quant, how many GPU layers, what context, KV type and batch fit this box.

Two parts. :func:`predict` is the memory model: what llama.cpp allocates on each device for one
set of load settings (weights by the layers each device gets, KV cache by type and context,
compute buffers by batch, context and flash attention, per-device overhead). It mirrors
llama.cpp's own rules and is checked against llama.cpp's dry-run numbers (tests/test_dryrun.py).
:func:`plan` is policy on top: the best quality that fully fits at the profile's target context;
else the context traded down to the profile's minimum; else a partial offload chosen by predicted
tokens/s; else a refusal that says how much memory is missing. Both are pure functions.

Parallel slots (:class:`edge_magistral.batch.BatchEngine`) are planned last, on top of the
single-request plan: quality and context for one request come first, throughput second. With N
slots llama.cpp keeps N + 1 KV streams of n_ctx cells (the extra one is the prefix cache), one
logits row per stream, and a compute buffer reserved for a ubatch split across the streams. A
profile's default slot count is reduced (down to 1) until it fits at the planned context; an
explicit ``Request.parallel`` keeps its slots and gives up context instead (down to the
minimum), and is refused when even that does not fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from edge_magistral.catalog import ModelCandidate
from edge_magistral.errors import BadInputError, DoesNotFitError
from edge_magistral.hardware import GiB, Hardware, MiB
from edge_magistral.profiles import MAX_PARALLEL, Profile

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
KV_ORDER = ("f16", "q8_0", "q4_0")  # what to try, best first, when memory binds
CTX_STEP = 1024  # contexts the planner picks are multiples of this
GPU_OVERHEAD = {"cuda": 512 * MiB, "rocm": 512 * MiB, "metal": 256 * MiB, "vulkan": 384 * MiB}
HOST_OVERHEAD = 400 * MiB  # Python, llama.cpp's code and the tokenizer
OP_OFFLOAD_MIN_BATCH = 32  # ubatches this large run CPU-resident matmuls on the GPU (weights copied over)
CPU_EFFICIENCY = 0.6  # share of host memory bandwidth a CPU decode achieves
DEFAULT_GPU_GBS = 300.0
BATCH_LOAD_CTX = 256  # the context BatchEngine loads the Llama object with (batch._LOAD_CTX)


class NoFitError(DoesNotFitError):
    """Nothing fits; carries the evaluated alternatives so a CLI can still show them."""

    def __init__(self, message: str, alternatives: list[Option], missing_bytes: int):
        super().__init__(message)
        self.alternatives = alternatives
        self.missing_bytes = missing_bytes


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Request:
    """What the caller insists on; None leaves the choice to the planner and the profile."""

    ctx: int | None = None
    n_gpu_layers: int | None = None
    quant: str | None = None
    kv_type: str | None = None
    flash_attn: bool | None = None
    parallel: int | None = None  # decoding slots (None: the profile's default)


@dataclass(frozen=True)
class Settings:
    """The load settings of one llama.cpp model + context."""

    n_ctx: int
    n_gpu_layers: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    n_batch: int = 512
    n_ubatch: int = 512
    n_slots: int = 1  # >1: BatchEngine's context (n_slots + 1 KV streams); 1: the single-sequence Engine


@dataclass(frozen=True)
class Device:
    """A device the model can be placed on, and the memory pools it draws from."""

    name: str  # llama.cpp's name: "CPU", "CUDA0", "Metal"
    kind: str  # cpu | gpu
    backend: str  # cpu | cuda | rocm | metal | vulkan
    split_bytes: int  # free memory llama.cpp splits layers by
    pools: tuple[str, ...]  # e.g. ("CUDA0",) or ("Metal", "RAM") for unified memory
    bandwidth_gbs: float


@dataclass(frozen=True)
class Pool:
    name: str
    free_bytes: int
    reserve_bytes: int

    @property
    def budget(self) -> int:
        return max(0, self.free_bytes - self.reserve_bytes)


@dataclass
class DeviceMemory:
    """Predicted bytes on one device."""

    device: str
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0
    layers: int = 0  # repeating layers placed here (the output layer not counted)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


@dataclass
class PoolUse:
    pool: str
    need: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.need <= self.budget


@dataclass
class Option:
    """One evaluated alternative: a quant with the best settings found for it."""

    quant: str
    path: str
    fits: bool
    settings: Settings | None
    pools: list[PoolUse] = field(default_factory=list)
    tokens_per_s: float = 0.0
    note: str = ""

    @property
    def need_bytes(self) -> int:
        return sum(p.need for p in self.pools)


@dataclass
class Plan:
    """How to load the model on this box, why, and what it will cost."""

    model_path: str
    quant: str
    source: str
    profile: str
    n_gpu_layers: int
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_batch: int
    n_ubatch: int
    n_slots: int  # requests decoded at once; 1: the single-sequence Engine
    n_threads: int
    n_threads_batch: int
    tensor_split: list[float]
    think_budget: int
    memory: list[DeviceMemory]
    pools: list[PoolUse]
    tokens_per_s: float
    reasons: dict[str, str]
    alternatives: list[Option] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return Settings(
            self.n_ctx,
            self.n_gpu_layers,
            self.type_k,
            self.type_v,
            self.flash_attn,
            self.n_batch,
            self.n_ubatch,
            self.n_slots,
        )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for m, dm in zip(d["memory"], self.memory, strict=True):
            m["total"] = dm.total
        return d


# ------------------------------------------------------------------------------- memory model


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
    """(KV streams, cells per stream). One stream for the Engine; n_slots + 1 for BatchEngine,
    padded as llama_context's constructor does: the total to 256, then each stream to 256."""
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
    """Rows of llama-cpp-python's scores array: n_batch of the Llama object, which BatchEngine
    loads with a throwaway 256-cell context."""
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
class _Stages:
    """Peak live bytes of the graph's stages for one ubatch (ggml-alloc's high-water mark)."""

    logits: int  # the output matmul and its logits
    layer: int  # the heaviest part of one repeating layer (attention or FFN), incl. the KQ mask
    attn: int  # the attention part alone (what stays on a CPU that only runs attention)
    slack: int  # allocator fragmentation seen in dry runs: one n_embd x n_ubatch f32 tensor


def compute_stages(m: ModelCandidate, s: Settings) -> _Stages:
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
    return _Stages(logits=logits, layer=max(ffn, attn), attn=attn, slack=m.n_embd * per_tok)


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


# ---------------------------------------------------------------------------------- the policy


@dataclass
class _Box:
    """Everything plan() derives once from the box, the profile and the request."""

    hw: Hardware
    profile: Profile
    gpus: list[Device]
    pools: dict[str, Pool]
    kv_types: list[str]
    flash_attn: bool
    target_ctx: int
    min_ctx: int
    fixed_ngl: int | None
    parallel: int = 1  # the slots wanted
    fixed_parallel: bool = False  # asked for explicitly: kept at the cost of context, or refused


def _box(hw: Hardware, profile: Profile, request: Request) -> _Box:
    gpus, pools = devices_of(hw)
    reserved = {name: replace(p, reserve_bytes=_reserve(name, profile)) for name, p in pools.items()}
    fa = profile.flash_attn if request.flash_attn is None else request.flash_attn
    if request.kv_type:
        if request.kv_type not in KV_BYTES:
            raise BadInputError(
                f"unknown KV cache type {request.kv_type!r}; use one of {', '.join(KV_ORDER)}"
            )
        kvs = [request.kv_type]
    else:
        first = profile.kv_type
        kvs = [first] + (
            [t for t in KV_ORDER if KV_ORDER.index(t) > KV_ORDER.index(first)]
            if profile.allow_kv_quant
            else []
        )
    if not fa:
        if request.kv_type and request.kv_type != "f16":
            raise BadInputError("a quantized KV cache needs flash attention; drop --no-flash-attn or use f16")
        kvs = ["f16"]
    target = request.ctx or profile.target_ctx
    minimum = request.ctx or min(profile.min_ctx, target)
    if request.ctx is not None and request.ctx < 256:
        raise BadInputError(f"--ctx {request.ctx} is too small; use at least 256")
    if request.parallel is not None and not 1 <= request.parallel <= MAX_PARALLEL:
        raise BadInputError(f"--parallel {request.parallel} is out of range; use 1 to {MAX_PARALLEL}")
    parallel = request.parallel or profile.parallel
    return _Box(hw, profile, gpus, reserved, kvs, fa, target, minimum, request.n_gpu_layers, parallel,
                request.parallel is not None)


def _reserve(pool: str, profile: Profile) -> int:
    """What the profile leaves free in a pool; a unified GPU's cap shares the RAM pool's reserve."""
    if pool == "RAM":
        return profile.reserve_ram_mib * MiB
    return 0 if pool.endswith("(unified)") else profile.reserve_gpu_mib * MiB


def _settings(b: _Box, ctx: int, ngl: int, kv: str, n_slots: int = 1) -> Settings:
    return Settings(ctx, ngl, kv, kv, b.flash_attn, b.profile.n_batch, b.profile.n_ubatch, n_slots)


def _evaluate(b: _Box, m: ModelCandidate, s: Settings) -> tuple[bool, list[DeviceMemory], list[PoolUse]]:
    mem = predict(m, s, b.gpus)
    use = pool_use(mem, b.gpus, b.pools)
    return all(u.fits for u in use), mem, use


def _full_ngl(b: _Box, m: ModelCandidate) -> int:
    if b.fixed_ngl is not None:
        return b.fixed_ngl
    return m.n_layers + 1 if b.gpus else 0


def _max_ctx(
    b: _Box, m: ModelCandidate, ngl: int, kv: str, n_slots: int = 1, upto: int | None = None
) -> int | None:
    """The largest context in [min, target or ``upto``] (a multiple of CTX_STEP, or exactly the
    upper end) that fits."""
    hi = upto or min(b.target_ctx, m.context_length or b.target_ctx)
    lo = min(b.min_ctx, hi)
    if _evaluate(b, m, _settings(b, hi, ngl, kv, n_slots))[0]:
        return hi
    if not _evaluate(b, m, _settings(b, lo, ngl, kv, n_slots))[0]:
        return None
    lo_k, hi_k = -(-lo // CTX_STEP), hi // CTX_STEP  # search in steps; lo itself is known to fit
    best = lo
    while lo_k <= hi_k:
        mid = (lo_k + hi_k) // 2
        if mid * CTX_STEP >= lo and _evaluate(b, m, _settings(b, mid * CTX_STEP, ngl, kv, n_slots))[0]:
            best, lo_k = max(best, mid * CTX_STEP), mid + 1
        else:
            hi_k = mid - 1
    return best


def _max_ngl(b: _Box, m: ModelCandidate, ctx: int, kv: str) -> int | None:
    for ngl in range(m.n_layers + 1, -1, -1):
        if _evaluate(b, m, _settings(b, ctx, ngl, kv))[0]:
            return ngl
    return None


def _option(b: _Box, m: ModelCandidate, s: Settings, note: str) -> Option:
    ok, mem, use = _evaluate(b, m, s)
    return Option(m.quant, m.path, ok, s, use, tokens_per_s(m, mem, b.gpus, b.profile), note)


def _try_full(b: _Box, m: ModelCandidate, at_target: bool) -> Option | None:
    ngl = _full_ngl(b, m)
    for kv in b.kv_types:
        if at_target:
            ctx = min(b.target_ctx, m.context_length or b.target_ctx)
            if _evaluate(b, m, _settings(b, ctx, ngl, kv))[0]:
                return _option(b, m, _settings(b, ctx, ngl, kv), "fits fully at the target context")
        else:
            ctx = _max_ctx(b, m, ngl, kv)
            if ctx is not None:
                return _option(b, m, _settings(b, ctx, ngl, kv), "fits fully at a reduced context")
    return None


def _try_partial(b: _Box, m: ModelCandidate) -> Option | None:
    """Largest context in [min, target] where some layers fit on the GPUs, with the most layers there."""
    best: Option | None = None
    for kv in b.kv_types:
        ctx_hi = min(b.target_ctx, m.context_length or b.target_ctx)
        for ctx in _ctx_ladder(ctx_hi, min(b.min_ctx, ctx_hi)):
            ngl = _max_ngl(b, m, ctx, kv)
            if ngl is not None:
                o = _option(
                    b,
                    m,
                    _settings(b, ctx, ngl, kv),
                    f"partial offload: {ngl} of {m.n_layers + 1} layers on GPU",
                )
                if best is None or ctx > best.settings.n_ctx:  # type: ignore[union-attr]
                    best = o  # a later (smaller) KV type only if it buys context
                break
    return best


def _ctx_ladder(hi: int, lo: int) -> list[int]:
    """hi, then halving steps, then lo: the contexts a partial offload tries."""
    out, c = [hi], hi
    while c // 2 >= lo:
        c //= 2
        out.append(c)
    if out[-1] != lo:
        out.append(lo)
    return out


def _ordered(candidates: list[ModelCandidate], profile: Profile, request: Request) -> list[ModelCandidate]:
    if request.quant:
        cands = [c for c in candidates if c.quant.upper() == request.quant.upper()]
        if not cands:
            raise BadInputError(
                f"no candidate model is quant {request.quant!r}; have: "
                f"{', '.join(sorted({c.quant for c in candidates}))}"
            )
        return cands
    order = {q: i for i, q in enumerate(profile.quants)}
    return sorted(
        candidates, key=lambda c: (order.get(c.quant, len(order) + c.quality_rank), c.source != "local")
    )


def plan(
    hw: Hardware, profile: Profile, candidates: list[ModelCandidate], request: Request | None = None
) -> Plan:
    """Choose quant, layers, context, KV type and batch for this box (see the module docstring)."""
    request = request or Request()
    if not candidates:
        raise BadInputError("no model candidates: build or pull a Magistral GGUF, or plan from the catalog")
    b = _box(hw, profile, request)
    cands = _ordered(candidates, profile, request)
    if request.ctx:
        cands = [c for c in cands if not c.context_length or request.ctx <= c.context_length]
        if not cands:
            longest = max(c.context_length for c in candidates)
            raise BadInputError(
                f"--ctx {request.ctx} is beyond the model's trained context of {longest} tokens; "
                f"use at most {longest}"
            )
    steps = [("full", lambda m: _try_full(b, m, True)), ("reduced", lambda m: _try_full(b, m, False))]
    if b.gpus and b.fixed_ngl is None:
        steps.append(("partial", lambda m: _try_partial(b, m)))
    found: list[tuple[int, ModelCandidate, Option]] = []  # each candidate's first working step
    for m in cands:
        for i, (_, fn) in enumerate(steps):
            o = fn(m)
            if o is not None:
                found.append((i, m, o))
                break
    by_path = {m.path: o for _, m, o in found}
    alternatives = [by_path.get(m.path) or _failed_option(b, m) for m in cands]
    if not found:
        raise _refusal(b, cands, alternatives, request)
    first = min(i for i, _, _ in found)
    m, o = _pick(steps[first][0], [(m, o) for i, m, o in found if i == first], profile)
    o, why_slots = _with_slots(b, m, o)
    return _make_plan(b, m, o, steps[first][0], alternatives, cands, why_slots)


# ------------------------------------------------------------------------------- parallel slots


def _with_slots(b: _Box, m: ModelCandidate, o: Option) -> tuple[Option, str]:
    """The single-request option with the slots the policy allows (module docstring), and why."""
    s = o.settings
    assert s is not None
    whose = "requested" if b.fixed_parallel else "the profile's"
    if b.parallel == 1:
        return o, f"1: one request at a time ({whose})"
    if b.fixed_parallel:
        ctx = _max_ctx(b, m, s.n_gpu_layers, s.type_k, b.parallel, upto=s.n_ctx)
        if ctx is None:
            raise _slots_refusal(b, m, s)
        o = _option(b, m, replace(s, n_ctx=ctx, n_slots=b.parallel), o.note)
        less = f"; context reduced from {s.n_ctx} to make room for their KV cache" if ctx < s.n_ctx else ""
        return o, f"{b.parallel}: as requested, {b.parallel + 1} KV streams of {ctx} cells{less}"
    n = _max_slots(b, m, s, b.parallel)
    if n == 1:
        return o, f"1: the profile's {b.parallel} slots do not fit at context {s.n_ctx}; one request at a time"
    o = _option(b, m, replace(s, n_slots=n), o.note)
    fewer = "" if n == b.parallel else f" (of the profile's {b.parallel}: the most that fit)"
    return o, (
        f"{n}{fewer}: requests decoded at once, {n + 1} KV streams of {s.n_ctx} cells "
        "(one holds the shared prefix); slots are given up before context"
    )


def _max_slots(b: _Box, m: ModelCandidate, s: Settings, most: int) -> int:
    """The most slots, up to ``most``, that fit with these settings (1 when none more do)."""
    return next((n for n in range(most, 1, -1) if _evaluate(b, m, replace(s, n_slots=n))[0]), 1)


def _slots_refusal(b: _Box, m: ModelCandidate, s: Settings) -> DoesNotFitError:
    low = replace(s, n_ctx=min(b.min_ctx, s.n_ctx), n_slots=b.parallel)
    short = "; ".join(f"{u.pool} needs {_gib(u.need)} of {_gib(u.budget)}" for u in _evaluate(b, m, low)[2]
                      if not u.fits)
    fit = _max_slots(b, m, replace(low, n_slots=1), b.parallel)
    return DoesNotFitError(
        f"--parallel {b.parallel} cannot fit: {b.parallel} slots of {m.quant} at context {low.n_ctx} "
        f"({short}); use at most --parallel {fit}, or a smaller --ctx"
    )


def _pick(
    step: str, found: list[tuple[ModelCandidate, Option]], profile: Profile
) -> tuple[ModelCandidate, Option]:
    """First in preference order; for partial offloads, the first fast enough, else the fastest."""
    if step != "partial":
        return found[0]
    fast = [(m, o) for m, o in found if o.tokens_per_s >= profile.min_tokens_per_s]
    return fast[0] if fast else max(found, key=lambda mo: mo[1].tokens_per_s)


def _failed_option(b: _Box, m: ModelCandidate) -> Option:
    """The smallest setting for a quant that does not fit, to show how far off it is."""
    s = _settings(b, min(b.min_ctx, m.context_length or b.min_ctx), _full_ngl(b, m), b.kv_types[-1])
    o = _option(b, m, s, "does not fit")
    if b.gpus and b.fixed_ngl is None:  # the least it could need: spread across GPU and RAM
        o.note = "does not fit, even partly offloaded"
    return o


def _refusal(b: _Box, cands: list[ModelCandidate], alts: list[Option], request: Request) -> NoFitError:
    total_budget = sum(p.budget for p in b.pools.values() if not p.name.endswith("(unified)"))
    smallest = min(cands, key=lambda m: m.weight_bytes)
    s = _settings(
        b, min(b.min_ctx, smallest.context_length or b.min_ctx), _full_ngl(b, smallest), b.kv_types[-1]
    )
    mem = predict(smallest, s, b.gpus)
    need = sum(d.total for d in mem)
    missing = max(0, need - total_budget)
    what = f"{smallest.quant} at {s.n_ctx} context with a {s.type_k} KV cache"
    if request.ctx or request.n_gpu_layers is not None:
        asked = ", ".join(
            x
            for x in (
                f"--ctx {request.ctx}" if request.ctx else "",
                f"--n-gpu-layers {request.n_gpu_layers}" if request.n_gpu_layers is not None else "",
            )
            if x
        )
        per_pool = "; ".join(
            f"{u.pool} needs {_gib(u.need)} of {_gib(u.budget)}"
            for u in _evaluate(b, smallest, s)[2]
            if not u.fits
        )
        msg = (
            f"{asked} cannot fit on this box: even {what} does not ({per_pool}); "
            "drop the override to let the planner choose"
        )
    else:
        msg = (
            f"Magistral does not fit this box: the smallest option, {what}, needs {_gib(need)} "
            f"but only {_gib(total_budget)} is usable ({_budgets(b)}); {_gib(missing)} is missing. "
            "Free memory, add RAM or a GPU, or use a smaller --ctx"
        )
    return NoFitError(msg, alts, missing)


def _budgets(b: _Box) -> str:
    return ", ".join(
        f"{p.name} {_gib(p.budget)} after a {_gib(p.reserve_bytes)} reserve"
        for p in b.pools.values()
        if not p.name.endswith("(unified)")
    )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _make_plan(
    b: _Box,
    m: ModelCandidate,
    o: Option,
    step: str,
    alts: list[Option],
    cands: list[ModelCandidate],
    why_slots: str,
) -> Plan:
    s = o.settings
    assert s is not None
    mem = predict(m, s, b.gpus)
    total = sum(g.split_bytes for g in b.gpus) or 1
    threads = b.profile.threads_for(b.hw)
    return Plan(
        model_path=m.path,
        quant=m.quant,
        source=m.source,
        profile=b.profile.name,
        n_gpu_layers=s.n_gpu_layers,
        n_ctx=s.n_ctx,
        type_k=s.type_k,
        type_v=s.type_v,
        flash_attn=s.flash_attn,
        n_batch=s.n_batch,
        n_ubatch=s.n_ubatch,
        n_slots=s.n_slots,
        n_threads=threads,
        n_threads_batch=max(threads, b.hw.cpu.cores_logical or threads),
        tensor_split=[round(g.split_bytes / total, 4) for g in b.gpus] if len(b.gpus) > 1 else [],
        think_budget=min(b.profile.think_budget, max(0, s.n_ctx - 2048)),
        memory=mem,
        pools=o.pools,
        tokens_per_s=round(o.tokens_per_s, 1),
        reasons={**_reasons(b, m, o, step, alts, cands), "parallel": why_slots},
        alternatives=alts,
    )


def _reasons(
    b: _Box, m: ModelCandidate, o: Option, step: str, alts: list[Option], cands: list[ModelCandidate]
) -> dict[str, str]:
    s = o.settings
    assert s is not None
    why_not = "; ".join(_why_not(b, c) for c in cands[: cands.index(m)])
    where = ", ".join(g.name for g in b.gpus) or "the CPU"
    r = {"profile": f"{b.profile.name}: {b.profile.description}"}
    if step == "full":
        r["quant"] = (
            f"{m.quant}: the first of the profile's order ({', '.join(b.profile.quants)}) that fits "
            f"entirely on {where} at the target context" + (f" ({why_not})" if why_not else "")
        )
    elif step == "reduced":
        r["quant"] = (
            f"{m.quant}: no quant fits at the target context {b.target_ctx}; this is the best that fits "
            f"entirely on {where} at a context of at least {b.min_ctx}"
        )
    else:
        r["quant"] = (
            f"{m.quant}: nothing fits entirely on {where}; of the partial offloads, the first in the "
            f"profile's order predicted at ≥ {b.profile.min_tokens_per_s:g} tokens/s "
            f"(or the fastest), at {o.tokens_per_s:.1f} tokens/s"
        )
    n_all = m.n_layers + 1
    if not b.gpus:
        r["n_gpu_layers"] = "0: no GPU that the installed llama.cpp can use"
    elif b.fixed_ngl is not None:
        r["n_gpu_layers"] = f"{s.n_gpu_layers}: as requested"
    elif s.n_gpu_layers >= n_all:
        r["n_gpu_layers"] = f"{s.n_gpu_layers} of {n_all}: every layer and the output layer on {where}"
    else:
        r["n_gpu_layers"] = (
            f"{s.n_gpu_layers} of {n_all}: the most that fit on {where}; the rest run on the CPU"
        )
    if s.n_ctx >= b.target_ctx:
        whose = "requested" if b.min_ctx == b.target_ctx else "profile's target"
        r["n_ctx"] = f"{s.n_ctx}: the {whose} context"
    else:
        r["n_ctx"] = f"{s.n_ctx}: the largest that fits (target {b.target_ctx}, minimum {b.min_ctx})"
    r["kv_cache"] = f"{s.type_k}: " + (
        "the profile's choice"
        if s.type_k == b.kv_types[0]
        else f"quantized because {b.kv_types[0]} does not fit ({_kv_mib(m, b.kv_types[0])} vs "
        f"{_kv_mib(m, s.type_k)} MiB per 1k tokens)"
    )
    r["flash_attn"] = (
        "on: smaller compute buffers and faster decoding"
        if s.flash_attn
        else "off: as requested (compute buffers grow with the context)"
    )
    r["batch"] = (
        f"n_batch {s.n_batch}, n_ubatch {s.n_ubatch}: the profile's; the compute buffer scales with n_ubatch"
    )
    r["threads"] = f"{b.profile.threads_for(b.hw)} ({b.profile.threads} cores) for decoding"
    r["memory"] = "; ".join(f"{u.pool} {_gib(u.need)} of {_gib(u.budget)}" for u in o.pools)
    return r


def _why_not(b: _Box, m: ModelCandidate) -> str:
    """Why a better-ranked quant lost: what it needs at the target context, fully offloaded."""
    s = _settings(b, min(b.target_ctx, m.context_length or b.target_ctx), _full_ngl(b, m), b.kv_types[-1])
    short = [u for u in _evaluate(b, m, s)[2] if not u.fits]
    return f"{m.quant} needs " + ", ".join(f"{_gib(u.need)} of {u.pool}'s {_gib(u.budget)}" for u in short)


def _kv_mib(m: ModelCandidate, t: str) -> str:
    return f"{kv_bytes_per_cell(m, t, t) * 1024 / MiB:.0f}"


# ------------------------------------------------------------------------ planning for a local model


def plan_for_model(
    model_path: str,
    request: Request | None = None,
    hardware: Hardware | None = None,
    profile_name: str | None = None,
) -> tuple[Plan, Hardware]:
    """Detect this box (unless ``hardware`` is given), pick its profile and plan ``model_path``.

    The one way the engine gets its settings: overrides travel in ``request`` and are refused
    with the reason when they cannot fit.
    """
    from edge_magistral.catalog import from_gguf_info
    from edge_magistral.gguf_info import read_info
    from edge_magistral.hardware import detect
    from edge_magistral.profiles import choose_profile, load_profiles

    hw = hardware or detect()
    profile = choose_profile(hw, load_profiles(), profile_name)
    return plan(hw, profile, [from_gguf_info(read_info(model_path))], request), hw
