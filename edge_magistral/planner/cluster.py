"""The planner across boxes: layers (and their KV cache) on every device of a head and its llama.cpp
RPC workers, so that boxes too small for the model alone hold it together.

llama.cpp's rules, which the plan follows: the device order is every worker's devices (workers in
the order given; a worker without a GPU the installed llama.cpp can use serves its CPU as one
device), then the head's GPUs. The head's CPU keeps the token embeddings and the first
``n_layers + 1 - n_gpu_layers`` layers; the rest, the output layer last, go to the devices in order,
in proportion to ``tensor_split``. So the output layer is on the last device: the head's last GPU
when it has one. On a head without a GPU that would be the last worker's device, and a logits row
would cross that link every token; there the output layer's weights stay on the head's CPU by a
tensor override (``LoadSettings.output_on_host``), which also puts the logits there. Remote devices
are GPU-kind devices with their own pools (a remote CPU gets a compute buffer as a GPU does), and
only local GPUs take the big-batch op offload (the RPC backend offloads no op).

The search, as the single-box one: quants in the head's profile order, the target context, else
the largest down to the minimum, KV types best first; for a head with GPUs, CPU layers only when
nothing fits without them. For one setting the layers are filled into the fastest devices first
(each box's own bandwidth and profile), each as full as its pools allow with its box's profile
reserves, so slow and unneeded devices get none and the pipeline keeps few boundaries.
Predicted tokens/s and the link's cost follow :mod:`~edge_magistral.planner.link`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from edge_magistral.catalog import ModelCandidate
from edge_magistral.errors import BadInputError
from edge_magistral.planner.box import CTX_STEP, Box, _reserve, gib, make_box
from edge_magistral.planner.draft import add_speculation
from edge_magistral.planner.link import (
    Link,
    Stage,
    WorkerBox,
    decode_seconds,
    link_seconds,
    reload_bytes,
    ttft_seconds,
    visits,
)
from edge_magistral.planner.memory import (
    CPU_EFFICIENCY,
    HOST_OVERHEAD,
    OP_OFFLOAD_MIN_BATCH,
    compute_stages,
    devices_of,
    kv_bytes_per_cell,
    kv_cells,
    kv_streams,
    layer_devices,
    pool_use,
    predict,
    remote_layers_compute,
    tied_output,
    ubatch_tokens,
)
from edge_magistral.planner.search import _ordered, _within_context
from edge_magistral.planner.types import (
    ClusterPlan,
    Device,
    DeviceMemory,
    NoFitError,
    Plan,
    Pool,
    PoolUse,
    Request,
    Settings,
    WorkerPlan,
)

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.profiles import Profile

__all__ = ["Link", "WorkerBox", "llama_split", "plan_cluster"]

HEAD = "head"
SINK = "(unplaced)"  # where layers not yet placed wait while the fill sizes one device


@dataclass
class Space:
    """The cluster's search space: the head's box and policy, and every device in llama.cpp's order."""

    b: Box
    workers: list[WorkerBox]
    profiles: dict[str, Profile]  # per box: HEAD or a worker's name
    devices: list[Device]  # llama.cpp's order: workers' devices, then the head's GPUs
    owner: list[str]  # per device: its worker's name, or HEAD
    pools: dict[str, Pool]  # every box's, with its profile's reserves
    speed: dict[str, float]  # bytes/s a decode reads at, per device ("CPU": the head's)
    extra: dict[str, int]  # pool -> a worker process's own RAM, where no device counts it
    quant_requested: bool = False

    @property
    def head_has_gpu(self) -> bool:
        return HEAD in self.owner

    @cached_property
    def pinned(self) -> dict[int, int]:
        """Device index -> layers of pinned workers (their first device); read once make_space is done."""
        return {self.owner.index(w.name): w.layers for w in self.workers if w.layers is not None}


@dataclass
class Fill:
    """One placement: layers on the head's CPU and per device, and what it costs."""

    s: Settings
    c0: int  # repeating layers on the head's CPU
    counts: list[int]  # repeating layers per device, llama.cpp's order
    remote_output: bool  # llama.cpp's output layer on the last device (False: all on the head's CPU)
    mem: list[DeviceMemory]  # the head's CPU first, then the devices
    use: list[PoolUse]
    where: list[int | None]  # per layer, the output layer last: its device (None: the head's CPU)



def make_space(head: Hardware, workers: list[WorkerBox], profile: Profile, request: Request,
               profiles: dict[str, Profile]) -> Space:
    """The devices and pools of every box; a worker's profile is the one its box matches."""
    from edge_magistral.profiles import choose_profile

    b = make_box(head, profile, request)
    sp = Space(b, workers, {HEAD: profile}, [], [], dict(b.pools), {}, {})
    sp.speed["CPU"] = profile.cpu_bandwidth_gbs * 1e9 * CPU_EFFICIENCY
    names = [w.name for w in workers]
    if len(set(names)) != len(names) or HEAD in names:
        raise BadInputError(f"worker names must be unique and not {HEAD!r}: {', '.join(names)}")
    for w in workers:
        wp = choose_profile(w.hardware, profiles)
        sp.profiles[w.name] = wp
        _add_worker(sp, w, wp)
    for g in b.gpus:
        sp.devices.append(g)
        sp.owner.append(HEAD)
        sp.speed[g.name] = g.bandwidth_gbs * 1e9 * profile.gpu_efficiency
    return sp


def _add_worker(sp: Space, w: WorkerBox, wp: Profile) -> None:
    """A worker's runnable GPUs, or its CPU as one device, named ``<device>@<worker>``."""
    gpus, pools = devices_of(w.hardware)
    at = f"@{w.name}"
    for name, p in pools.items():
        sp.pools[name + at] = replace(p, name=name + at, reserve_bytes=_reserve(name, wp))
    if gpus:
        for g in gpus:
            sp.devices.append(replace(g, name=g.name + at, pools=tuple(p + at for p in g.pools)))
            sp.speed[g.name + at] = g.bandwidth_gbs * 1e9 * wp.gpu_efficiency
        sp.extra["RAM" + at] = HOST_OVERHEAD  # the rpc-worker process itself
    else:
        ram = pools["RAM"]
        sp.devices.append(Device("CPU" + at, "gpu", "cpu", ram.free_bytes, ("RAM" + at,), wp.cpu_bandwidth_gbs))
        sp.speed["CPU" + at] = wp.cpu_bandwidth_gbs * 1e9 * CPU_EFFICIENCY
    sp.owner += [w.name] * (len(gpus) or 1)



def evaluate(sp: Space, m: ModelCandidate, s: Settings, c0: int, counts: list[int], sink: int = 0) -> Fill:
    """Memory per device and pool for this placement; ``sink`` layers are held nowhere (while the
    fill sizes one device). All on the head's CPU (no remote layer) keeps the output there too."""
    remote_output = bool(sp.devices) and (sp.head_has_gpu or c0 < m.n_layers or sink > 0)
    ngl = m.n_layers + 1 - c0 if remote_output else 0
    splits = [sink] + counts
    if remote_output:
        splits[-1] += 1
    sink_dev = Device(SINK, "gpu", "cpu", 0, (), 1.0)
    devs = [replace(d, split_bytes=n) for d, n in zip([sink_dev, *sp.devices], splits, strict=True)]
    s = replace(s, n_gpu_layers=ngl)
    mem = predict(m, s, devs)
    where = layer_devices(m.n_layers, ngl, splits) if remote_output else [None] * (m.n_layers + 1)
    home = _output_home(m, mem, where) if remote_output and not sp.head_has_gpu else None
    _compute(sp, m, s, mem, where, home)
    mem = [mem[0], *mem[2:]]  # the sink holds nothing anyone pays for
    for dm, d in zip(mem[1:], sp.devices, strict=True):
        if d.backend == "cpu":
            dm.overhead = HOST_OVERHEAD  # a remote CPU: the rpc-worker process
    use = pool_use(mem, sp.devices, sp.pools)
    for u in use:
        u.need += sp.extra.get(u.pool, 0)
    at = [None if x is None else x - 1 for x in where]
    return Fill(s, c0, list(counts), remote_output, mem, use, at)


def _output_home(m: ModelCandidate, mem: list[DeviceMemory], where: list[int | None]) -> int | None:
    """A head without a GPU keeps the output weights (so the logits) on its CPU by a tensor
    override (``LoadSettings.output_on_host``); ``mem`` is CPU, sink, devices. Returns the device
    llama.cpp still counts the output layer on."""
    dev, where[-1] = where[-1], None
    mem[dev + 1].weights -= m.output_bytes
    mem[0].weights += m.output_bytes
    return dev


def _compute(sp: Space, m: ModelCandidate, s: Settings, mem: list[DeviceMemory], where: list[int | None],
             home: int | None) -> None:
    """Compute buffers (``memory._add_compute``'s stages) where the op offload goes to the first
    local GPU only: RPC devices offload no op; a worker's device without the logits as measured
    (``memory.remote_layers_compute``). ``mem`` is CPU, sink, devices; ``where`` and ``home`` (the
    output layer's device when its weights stay home) index sink + devices."""
    st = compute_stages(m, s)
    offload = ubatch_tokens(s) >= OP_OFFLOAD_MIN_BATCH and sp.head_has_gpu
    first_local = 1 + sp.owner.index(HEAD) if sp.head_has_gpu else None
    cpu_layers = any(d is None for d in where[:-1])
    output_on_cpu = where[-1] is None
    for i in range(1, len(mem) - 1):
        stages = [st.layer] if i in where[:-1] else []
        if where[-1] == i:
            stages.append(st.logits)
        if offload and i == first_local:
            stages += [st.layer + m.largest_matrix_bytes] if cpu_layers else []
            stages += [st.logits + m.output_bytes] if output_on_cpu else []
        mem[i + 1].compute = max(stages) + st.slack if stages else 0
        if i > 0 and sp.owner[i - 1] != HEAD and where[-1] != i:
            mem[i + 1].compute = remote_layers_compute(m, s, where[:-1].count(i), i == home)
    host = 2 * m.n_embd * 4 * ubatch_tokens(s)
    if cpu_layers:
        host += st.attn if offload else st.layer
    if output_on_cpu and not offload:
        host = max(host, st.logits)
    mem[0].compute = host + st.slack + (kv_streams(s)[0] - 1) * m.n_vocab * 4


def _slot_order(sp: Space) -> list[int]:
    """Devices fastest first (-1: the head's CPU); ties in pipeline order."""
    speed = [sp.speed["CPU"]] + [sp.speed[d.name] for d in sp.devices]
    return sorted(range(-1, len(sp.devices)), key=lambda i: (-speed[i + 1], i))


def fill(sp: Space, m: ModelCandidate, s: Settings, allow_cpu: bool, fixed_c0: int | None = None) -> Fill | None:
    """The placement for ``s``: the fastest devices filled first (module docstring); None when the
    layers do not all find room. A pool that overflows once every layer is placed (a compute
    buffer that grew with the final split) caps the device that drew the most from it."""
    caps: dict[int, int] = {}
    for _ in range(m.n_layers + 1):
        c0, counts, left = _greedy(sp, m, s, allow_cpu, fixed_c0, caps)
        if left:
            return None
        f = evaluate(sp, m, s, c0, counts)
        if all(u.fits for u in f.use):
            return f
        if not _cap(sp, f, caps, fixed_c0):
            return None
    return None


def _greedy(sp: Space, m: ModelCandidate, s: Settings, allow_cpu: bool, fixed_c0: int | None,
            caps: dict[int, int]) -> tuple[int, list[int], int]:
    c0, counts = fixed_c0 or 0, [0] * len(sp.devices)
    for i, n in sp.pinned.items():
        counts[i] = n
    left = m.n_layers - c0 - sum(counts)  # below 0: more pinned than there are layers (no fit)
    for i in _slot_order(sp):
        if i in sp.pinned:
            continue
        if i == -1:
            if fixed_c0 is not None or not (allow_cpu or not sp.devices):
                continue
        hi = min(left, caps.get(i, left))
        lo, best = 0, -1
        while lo <= hi:  # the most layers that keep this device's pools within budget
            mid = (lo + hi) // 2
            c, cs = (mid, counts) if i == -1 else (c0, counts[:i] + [mid] + counts[i + 1:])
            f = evaluate(sp, m, s, c, cs, sink=left - mid)
            if all(u.fits for u in f.use if u.pool in (("RAM",) if i == -1 else sp.devices[i].pools)):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best < 0:
            return c0, counts, left
        if i == -1:
            c0 = best
        else:
            counts[i] = best
        left -= best
    return c0, counts, left


def _cap(sp: Space, f: Fill, caps: dict[int, int], fixed_c0: int | None) -> bool:
    """Lower the cap of the device with the most layers in an overflowing pool; False if none can give."""
    over = {u.pool for u in f.use if not u.fits}
    holders = [(f.counts[i], i) for i in range(len(sp.devices))
               if over & set(sp.devices[i].pools) and i not in sp.pinned]
    if "RAM" in over and fixed_c0 is None:
        holders.append((f.c0, -1))
    n, i = max(holders, default=(0, 0))
    if n <= 0:
        return False
    caps[i] = n - 1
    return True



def _max_ctx(sp: Space, m: ModelCandidate, kv: str, slots: int, allow_cpu: bool, fixed: int | None) -> Fill | None:
    """The largest context in [minimum, target] (a multiple of CTX_STEP, or the target) that fits."""
    b = sp.b
    hi = min(b.target_ctx, m.context_length or b.target_ctx)
    lo = min(b.min_ctx, hi)

    def at(ctx: int) -> Fill | None:
        return fill(sp, m, _settings(b, ctx, kv, slots), allow_cpu, fixed)

    best = at(hi) or at(lo)
    if best is None or best.s.n_ctx == hi:
        return best
    lo_k, hi_k = -(-lo // CTX_STEP), hi // CTX_STEP
    while lo_k <= hi_k:
        mid = (lo_k + hi_k) // 2
        f = at(mid * CTX_STEP)
        if f is not None:
            best, lo_k = (f if f.s.n_ctx > best.s.n_ctx else best), mid + 1
        else:
            hi_k = mid - 1
    return best


def _settings(b: Box, ctx: int, kv: str, slots: int) -> Settings:
    return Settings(ctx, 0, kv, kv, b.flash_attn, b.profile.n_batch, b.profile.n_ubatch, slots)


def _steps(sp: Space) -> list[tuple[str, bool]]:
    """(step, CPU layers allowed): without the head's CPU first when it has GPUs."""
    if sp.b.fixed_ngl is not None or not sp.head_has_gpu:
        return [("target", True), ("reduced", True)]
    return [("target", False), ("reduced", False), ("partial", True)]


def _search(sp: Space, cands: list[ModelCandidate]) -> tuple[ModelCandidate, Fill, str] | None:
    b = sp.b
    fixed = None if b.fixed_ngl is None else max(0, min(cands[0].n_layers, cands[0].n_layers + 1 - b.fixed_ngl))
    slots = b.parallel if b.fixed_parallel else 1
    for step, allow_cpu in _steps(sp):
        for m in cands:
            for kv in b.kv_types:
                if step == "target":
                    ctx = min(b.target_ctx, m.context_length or b.target_ctx)
                    f = fill(sp, m, _settings(b, ctx, kv, slots), allow_cpu, fixed)
                else:
                    f = _max_ctx(sp, m, kv, slots, allow_cpu, fixed)
                if f is not None:
                    return m, _more_slots(sp, m, f, allow_cpu, fixed), step
    return None


def _more_slots(sp: Space, m: ModelCandidate, f: Fill, allow_cpu: bool, fixed: int | None) -> Fill:
    """The profile's slots, lowered to what fits at the planned context (an explicit count is kept)."""
    if sp.b.fixed_parallel:
        return f
    for n in range(sp.b.parallel, 1, -1):
        g = fill(sp, m, replace(f.s, n_slots=n), allow_cpu, fixed)
        if g is not None:
            return g
    return f


def plan_cluster(head: Hardware, workers: list[WorkerBox], candidates: list[ModelCandidate],
                 request: Request | None, profile: Profile, profiles: dict[str, Profile] | None = None,
                 prompt_tokens: int = 512) -> Plan:
    """Plan the model over ``head`` and its RPC ``workers`` (llama.cpp's device order); the head's
    ``profile`` sets the policy, each worker's box its own reserves (from ``profiles``, the built-in
    and user ones by default). Refuses (NoFitError) with what each box holds and lacks."""
    from edge_magistral.profiles import load_profiles

    request = request or Request()
    if not candidates:
        raise BadInputError("no model candidates: build or pull a Magistral GGUF, or plan from the catalog")
    if "Q4_K_M" not in profile.quants:  # left out for one box's memory: across boxes it may well fit
        profile = replace(profile, quants=type(profile.quants)(["Q4_K_M", *profile.quants]))
    sp = make_space(head, workers, profile, request, profiles or load_profiles())
    sp.quant_requested = request.quant is not None
    cands = [tied_output(c) for c in _within_context(_ordered(candidates, profile, request), candidates, request)]
    found = _search(sp, cands)
    if found is None:
        raise _refusal(sp, cands)
    m, f, step = found
    return make_cluster_plan(sp, m, f, step, prompt_tokens)


def llama_split(plan: Plan) -> tuple[list[float], int]:
    """``tensor_split`` (llama.cpp's device order, as layer counts: llama.cpp normalizes them, and
    whole numbers reproduce the planned layers exactly) and ``n_gpu_layers``, as LoadSettings takes them."""
    return list(plan.tensor_split), plan.n_gpu_layers


def make_cluster_plan(sp: Space, m: ModelCandidate, f: Fill, step: str, prompt_tokens: int) -> Plan:
    """The Plan of a placement, its cluster part and its reasons."""
    b, s = sp.b, f.s
    vs = visits(_stages(sp, f))
    speeds = [sp.speed["CPU"]] + [sp.speed[d.name] for d in sp.devices]  # per entry of f.mem
    kinds = ["cpu"] + ["cpu" if d.backend == "cpu" else "gpu" for d in sp.devices]
    ttft = ttft_seconds(m, f.mem, speeds, kinds, vs, f.s, prompt_tokens)
    decode = decode_seconds(m, f.mem, speeds)
    per_token = link_seconds(m, vs, 1, kv_cells(max(1, kv_streams(s)[1] // 2)), s.flash_attn)
    workers = [_worker_plan(sp, m, f, w) for w in sp.workers]
    out = f.where[-1]
    cl = ClusterPlan(
        workers=workers, device_order=[d.name for d in sp.devices], head_cpu_layers=f.c0,
        output_device="CPU" if out is None else sp.devices[out].name, boundaries=2 * len(vs),
        round_trips_per_token=sum(1 + v.device_changes for v in vs),
        tokens_per_s=round(1 / (decode + per_token), 2), tokens_per_s_no_link=round(1 / decode, 2),
        link_ms_per_token=round(per_token * 1e3, 3), ttft_s=round(ttft, 3),
        prompt_tokens=prompt_tokens, first_load_bytes=sum(w.first_load_bytes for w in workers),
        reload_bytes=sum(w.reload_bytes for w in workers))
    split = [float(n) for n in f.counts]
    if f.remote_output:
        split[-1] += 1
    threads = b.profile.threads_for(b.hw)
    p = Plan(model_path=m.path, quant=m.quant, source=m.source, profile=b.profile.name, n_gpu_layers=s.n_gpu_layers,
             n_ctx=s.n_ctx, type_k=s.type_k, type_v=s.type_v, flash_attn=s.flash_attn, n_batch=s.n_batch,
             n_ubatch=s.n_ubatch, n_slots=s.n_slots, n_threads=threads,
             n_threads_batch=max(threads, b.hw.cpu.cores_logical or threads),
             tensor_split=split if f.remote_output else [], think_budget=min(b.profile.think_budget,
                                                                              max(0, s.n_ctx - 2048)),
             memory=f.mem, pools=f.use, tokens_per_s=cl.tokens_per_s, reasons={}, cluster=cl)
    p.reasons = _reasons(sp, m, f, step, cl)
    add_speculation(p, b, m, None)
    return p


def _stages(sp: Space, f: Fill) -> list[Stage]:
    links = {w.name: w.link for w in sp.workers}
    last = len(sp.devices) - 1
    output_remote = f.where[-1] is not None
    return [Stage(None if o == HEAD else o, links.get(o), f.mem[i + 1].layers, output_remote and i == last)
            for i, o in enumerate(sp.owner)]


def _worker_plan(sp: Space, m: ModelCandidate, f: Fill, w: WorkerBox) -> WorkerPlan:
    idx = [i for i, o in enumerate(sp.owner) if o == w.name]
    dms = [f.mem[i + 1] for i in idx]
    mine = [il for il in range(m.n_layers) if f.where[il] in idx]
    total = DeviceMemory(w.name, weights=sum(d.weights for d in dms), kv_cache=sum(d.kv_cache for d in dms),
                         compute=sum(d.compute for d in dms),
                         overhead=sum(d.overhead for d in dms) + sp.extra.get(f"RAM@{w.name}", 0),
                         layers=sum(d.layers for d in dms))
    return WorkerPlan(
        endpoint=w.name, profile=sp.profiles[w.name].name, devices=[sp.devices[i].name for i in idx],
        layers=total.layers, memory=total, device_memory=dms,
        pools=[u for u in f.use if _box_of(u.pool) == w.name], first_load_bytes=total.weights,
        reload_bytes=reload_bytes(m, mine, f.where[-1] in idx),
        link_mbit=w.link.bandwidth_bytes_s * 8 / 1e6, link_ms=w.link.latency_s * 1e3)


def _reasons(sp: Space, m: ModelCandidate, f: Fill, step: str, cl: ClusterPlan) -> dict[str, str]:
    b, s = sp.b, f.s
    n_box = len(sp.workers) + 1
    where = {"target": f"at the {'requested' if b.min_ctx == b.target_ctx else 'target'} context",
             "reduced": f"at the largest context that fits (target {b.target_ctx}, minimum {b.min_ctx})",
             "partial": "only with layers on the head's CPU"}[step]
    per_box = ", ".join(f"{w.endpoint} {w.layers}" for w in cl.workers)
    head_gpu = sum(dm.layers for dm, o in zip(f.mem[1:], sp.owner, strict=True) if o == HEAD)
    return {
        "profile": f"{b.profile.name} (the head's): {b.profile.description}; workers: "
                   + ", ".join(f"{w.endpoint} {w.profile}" for w in cl.workers),
        "quant": f"{m.quant}: as requested; it fits across the {n_box} boxes {where}" if sp.quant_requested else
                 f"{m.quant}: the first of the head profile's order ({', '.join(b.profile.quants)}) that fits "
                 f"across the {n_box} boxes {where}",
        "n_gpu_layers": f"{s.n_gpu_layers}: layers per box, fastest devices first: head CPU {f.c0}, head GPUs "
                        f"{head_gpu}, {per_box}; the output layer on {cl.output_device}",
        "tensor_split": "llama.cpp's device order (" + ", ".join(cl.device_order) + "), as layer counts",
        "n_ctx": f"{s.n_ctx}", "kv_cache": f"{s.type_k}: the first of {', '.join(b.kv_types)} that fits",
        "link": f"{cl.boundaries} link crossings and {cl.round_trips_per_token} round trips per token: "
                f"{cl.link_ms_per_token:.2f} ms, so {cl.tokens_per_s_no_link:.1f} -> {cl.tokens_per_s:.1f} "
                f"tokens/s; a {cl.prompt_tokens}-token prompt about {cl.ttft_s:.1f} s to its first token",
        "first_load": f"{gib(cl.first_load_bytes)} of weights cross the links on the first load; "
                      f"{gib(cl.reload_bytes)} on later ones with the workers' cache",
        "memory": "; ".join(f"{u.pool} {gib(u.need)} of {gib(u.budget)}" for u in f.use),
        "parallel": f"{s.n_slots}: " + ("as requested" if b.fixed_parallel else
                                        f"the most of the profile's {b.parallel} that fit"),
    }



def _refusal(sp: Space, cands: list[ModelCandidate]) -> NoFitError:
    """What each box can take of the smallest option, and how much has no room."""
    b = sp.b
    m = min(cands, key=lambda c: c.weight_bytes)
    s = _settings(b, min(b.min_ctx, m.context_length or b.min_ctx), b.kv_types[-1], 1)
    fixed = None if b.fixed_ngl is None else max(0, min(m.n_layers, m.n_layers + 1 - b.fixed_ngl))
    c0, counts, left = _greedy(sp, m, s, True, fixed, {})
    f = evaluate(sp, m, s, c0, counts, sink=left)
    kv_layer = kv_streams(s)[0] * kv_streams(s)[1] * kv_bytes_per_cell(m, s.type_k, s.type_v) // m.n_layers
    missing = sum(m.bytes_per_layer[:left]) + left * kv_layer
    boxes = []
    for box in [HEAD, *(w.name for w in sp.workers)]:
        layers = (c0 if box == HEAD else 0) + sum(n for n, o in zip(counts, sp.owner, strict=True) if o == box)
        need = sum(u.need for u in f.use if _box_of(u.pool) == box and not u.pool.endswith("(unified)"))
        free = sum(u.budget for u in f.use if _box_of(u.pool) == box and not u.pool.endswith("(unified)"))
        boxes.append(f"{box} takes {layers} layers ({gib(need)} of {gib(free)} usable)")
    msg = (f"Magistral does not fit across these {len(sp.workers) + 1} boxes: even {m.quant} at {s.n_ctx} context "
           f"with a {s.type_k} KV cache leaves {left} of {m.n_layers} layers without room ({'; '.join(boxes)}); "
           "add a worker, free memory, or use a smaller --ctx")
    return NoFitError(msg, [], missing)


def _box_of(pool: str) -> str:
    return pool.rsplit("@", 1)[1] if "@" in pool else HEAD
