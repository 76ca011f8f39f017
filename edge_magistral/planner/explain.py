"""What the planner says: the Plan with a reason for each choice, and refusals that name the
pool that is short and by how much."""

from __future__ import annotations

from dataclasses import replace

from edge_magistral.catalog import ModelCandidate
from edge_magistral.errors import DoesNotFitError
from edge_magistral.planner.box import Box, evaluate, full_ngl, gib, option, settings_for
from edge_magistral.planner.memory import kv_bytes_per_cell, predict
from edge_magistral.planner.types import NoFitError, Option, Plan, Request, Settings
from edge_magistral.units import MiB


def make_plan(
    b: Box,
    m: ModelCandidate,
    o: Option,
    step: str,
    alts: list[Option],
    cands: list[ModelCandidate],
    why_slots: str,
) -> Plan:
    """The Plan for the chosen option; ``step`` is how it was found (full, reduced, partial)."""
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
        reasons={**_reasons(b, m, o, step, cands), "parallel": why_slots},
        alternatives=alts,
    )


def _reasons(b: Box, m: ModelCandidate, o: Option, step: str, cands: list[ModelCandidate]) -> dict[str, str]:
    s = o.settings
    assert s is not None
    r = {"profile": f"{b.profile.name}: {b.profile.description}",
         "quant": _why_quant(b, m, o, step, cands),
         "n_gpu_layers": _why_layers(b, m, s)}
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
    r["memory"] = "; ".join(f"{u.pool} {gib(u.need)} of {gib(u.budget)}" for u in o.pools)
    return r


def _why_quant(b: Box, m: ModelCandidate, o: Option, step: str, cands: list[ModelCandidate]) -> str:
    where = _where(b)
    if step == "full":
        why_not = "; ".join(_why_not(b, c) for c in cands[: cands.index(m)])
        return (
            f"{m.quant}: the first of the profile's order ({', '.join(b.profile.quants)}) that fits "
            f"entirely on {where} at the target context" + (f" ({why_not})" if why_not else "")
        )
    if step == "reduced":
        return (
            f"{m.quant}: no quant fits at the target context {b.target_ctx}; this is the best that fits "
            f"entirely on {where} at a context of at least {b.min_ctx}"
        )
    return (
        f"{m.quant}: nothing fits entirely on {where}; of the partial offloads, the first in the "
        f"profile's order predicted at ≥ {b.profile.min_tokens_per_s:g} tokens/s "
        f"(or the fastest), at {o.tokens_per_s:.1f} tokens/s"
    )


def _why_layers(b: Box, m: ModelCandidate, s: Settings) -> str:
    n_all = m.n_layers + 1
    if not b.gpus:
        return "0: no GPU that the installed llama.cpp can use"
    if b.fixed_ngl is not None:
        return f"{s.n_gpu_layers}: as requested"
    if s.n_gpu_layers >= n_all:
        return f"{s.n_gpu_layers} of {n_all}: every layer and the output layer on {_where(b)}"
    return f"{s.n_gpu_layers} of {n_all}: the most that fit on {_where(b)}; the rest run on the CPU"


def _where(b: Box) -> str:
    return ", ".join(g.name for g in b.gpus) or "the CPU"


def _why_not(b: Box, m: ModelCandidate) -> str:
    """Why a better-ranked quant lost: what it needs at the target context, fully offloaded."""
    s = settings_for(b, min(b.target_ctx, m.context_length or b.target_ctx), full_ngl(b, m), b.kv_types[-1])
    short = [u for u in evaluate(b, m, s)[2] if not u.fits]
    return f"{m.quant} needs " + ", ".join(f"{gib(u.need)} of {u.pool}'s {gib(u.budget)}" for u in short)


def _kv_mib(m: ModelCandidate, t: str) -> str:
    return f"{kv_bytes_per_cell(m, t, t) * 1024 / MiB:.0f}"


# ------------------------------------------------------------------------------- refusals


def failed_option(b: Box, m: ModelCandidate) -> Option:
    """The smallest setting for a quant that does not fit, to show how far off it is."""
    s = settings_for(b, min(b.min_ctx, m.context_length or b.min_ctx), full_ngl(b, m), b.kv_types[-1])
    o = option(b, m, s, "does not fit")
    if b.gpus and b.fixed_ngl is None:  # the least it could need: spread across GPU and RAM
        o.note = "does not fit, even partly offloaded"
    return o


def refusal(b: Box, cands: list[ModelCandidate], alts: list[Option], request: Request) -> NoFitError:
    """Nothing fits: what the smallest option needs, and what is missing or which override to drop."""
    total_budget = sum(p.budget for p in b.pools.values() if not p.name.endswith("(unified)"))
    smallest = min(cands, key=lambda m: m.weight_bytes)
    s = settings_for(
        b, min(b.min_ctx, smallest.context_length or b.min_ctx), full_ngl(b, smallest), b.kv_types[-1]
    )
    need = sum(d.total for d in predict(smallest, s, b.gpus))
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
        msg = (
            f"{asked} cannot fit on this box: even {what} does not ({_short_pools(b, smallest, s)}); "
            "drop the override to let the planner choose"
        )
    else:
        msg = (
            f"Magistral does not fit this box: the smallest option, {what}, needs {gib(need)} "
            f"but only {gib(total_budget)} is usable ({_budgets(b)}); {gib(missing)} is missing. "
            "Free memory, add RAM or a GPU, or use a smaller --ctx"
        )
    return NoFitError(msg, alts, missing)


def slots_refusal(b: Box, m: ModelCandidate, s: Settings, most_that_fit: int) -> DoesNotFitError:
    """The requested slots do not fit even at the minimum context."""
    low = replace(s, n_ctx=min(b.min_ctx, s.n_ctx), n_slots=b.parallel)
    return DoesNotFitError(
        f"--parallel {b.parallel} cannot fit: {b.parallel} slots of {m.quant} at context {low.n_ctx} "
        f"({_short_pools(b, m, low)}); use at most --parallel {most_that_fit}, or a smaller --ctx"
    )


def _short_pools(b: Box, m: ModelCandidate, s: Settings) -> str:
    return "; ".join(f"{u.pool} needs {gib(u.need)} of {gib(u.budget)}" for u in evaluate(b, m, s)[2] if not u.fits)


def _budgets(b: Box) -> str:
    return ", ".join(
        f"{p.name} {gib(p.budget)} after a {gib(p.reserve_bytes)} reserve"
        for p in b.pools.values()
        if not p.name.endswith("(unified)")
    )
