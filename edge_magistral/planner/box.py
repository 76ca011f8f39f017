"""What a plan is searched within: the box's devices and pools with the profile's reserves, the
KV types and contexts the profile and the request allow, and how one setting is evaluated."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edge_magistral.catalog import ModelCandidate
from edge_magistral.errors import BadInputError
from edge_magistral.planner.memory import KV_BYTES, devices_of, pool_use, predict, tokens_per_s
from edge_magistral.planner.types import Device, DeviceMemory, Option, Pool, PoolUse, Request, Settings
from edge_magistral.profiles import MAX_PARALLEL
from edge_magistral.units import GiB, MiB

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.profiles import Profile

KV_ORDER = ("f16", "q8_0", "q4_0")  # what to try, best first, when memory binds
CTX_STEP = 1024  # contexts the planner picks are multiples of this


@dataclass
class Box:
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


def make_box(hw: Hardware, profile: Profile, request: Request) -> Box:
    """The search space for ``request`` on this box; refuses requests that can never be met."""
    gpus, pools = devices_of(hw)
    reserved = {name: replace(p, reserve_bytes=_reserve(name, profile)) for name, p in pools.items()}
    fa = profile.flash_attn if request.flash_attn is None else request.flash_attn
    kvs = _kv_types(profile, request, fa)
    target = request.ctx or profile.target_ctx
    minimum = request.ctx or min(profile.min_ctx, target)
    if request.ctx is not None and request.ctx < 256:
        raise BadInputError(f"--ctx {request.ctx} is too small; use at least 256")
    if request.parallel is not None and not 1 <= request.parallel <= MAX_PARALLEL:
        raise BadInputError(f"--parallel {request.parallel} is out of range; use 1 to {MAX_PARALLEL}")
    parallel = request.parallel or profile.parallel
    return Box(hw, profile, gpus, reserved, kvs, fa, target, minimum, request.n_gpu_layers, parallel,
               request.parallel is not None)


def _kv_types(profile: Profile, request: Request, flash_attn: bool) -> list[str]:
    """The KV cache types to try, best first: the requested one, else the profile's and (when it
    allows quantizing) the smaller ones after it. A quantized cache needs flash attention."""
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
    if not flash_attn:
        if request.kv_type and request.kv_type != "f16":
            raise BadInputError("a quantized KV cache needs flash attention; drop --no-flash-attn or use f16")
        kvs = ["f16"]
    return kvs


def _reserve(pool: str, profile: Profile) -> int:
    """What the profile leaves free in a pool; a unified GPU's cap shares the RAM pool's reserve."""
    if pool == "RAM":
        return profile.reserve_ram_mib * MiB
    return 0 if pool.endswith("(unified)") else profile.reserve_gpu_mib * MiB


def settings_for(b: Box, ctx: int, ngl: int, kv: str, n_slots: int = 1) -> Settings:
    return Settings(ctx, ngl, kv, kv, b.flash_attn, b.profile.n_batch, b.profile.n_ubatch, n_slots)


def evaluate(b: Box, m: ModelCandidate, s: Settings) -> tuple[bool, list[DeviceMemory], list[PoolUse]]:
    """Whether ``s`` fits every pool, with the prediction per device and the use per pool."""
    mem = predict(m, s, b.gpus)
    use = pool_use(mem, b.gpus, b.pools)
    return all(u.fits for u in use), mem, use


def full_ngl(b: Box, m: ModelCandidate) -> int:
    """The GPU layers of a full offload (or the requested count)."""
    if b.fixed_ngl is not None:
        return b.fixed_ngl
    return m.n_layers + 1 if b.gpus else 0


def option(b: Box, m: ModelCandidate, s: Settings, note: str) -> Option:
    ok, mem, use = evaluate(b, m, s)
    return Option(m.quant, m.path, ok, s, use, tokens_per_s(m, mem, b.gpus, b.profile), note)


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
