"""The policy: which quant, GPU layers, context, KV type and slots to load with.

The best quality that fully fits at the profile's target context; else the context traded down
to the profile's minimum; else a partial offload chosen by predicted tokens/s; else a refusal
that says how much memory is missing.

Parallel slots are planned last, on top of the single-request plan: quality and context for one
request come first, throughput second. A profile's default slot count is reduced (down to 1)
until it fits at the planned context; an explicit ``Request.parallel`` keeps its slots and gives
up context instead (down to the minimum), and is refused when even that does not fit.

A draft model for speculative decoding is placed last, next to the finished plan
(:mod:`~edge_magistral.planner.draft`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from edge_magistral.catalog import ModelCandidate
from edge_magistral.errors import BadInputError
from edge_magistral.planner.box import CTX_STEP, Box, evaluate, full_ngl, make_box, option, settings_for
from edge_magistral.planner.draft import add_speculation, draft_candidate, place_draft
from edge_magistral.planner.explain import failed_option, make_plan, refusal, slots_refusal
from edge_magistral.planner.types import Option, Plan, Request, Settings

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.profiles import Profile


def plan(
    hw: Hardware,
    profile: Profile,
    candidates: list[ModelCandidate],
    request: Request | None = None,
    draft: ModelCandidate | None = None,
) -> Plan:
    """Choose quant, layers, context, KV type, batch and slots for this box (module docstring),
    and place ``draft`` (see :func:`draft_candidate`) next to the model."""
    request = request or Request()
    if not candidates:
        raise BadInputError("no model candidates: build or pull a Magistral GGUF, or plan from the catalog")
    b = make_box(hw, profile, request)
    cands = _within_context(_ordered(candidates, profile, request), candidates, request)
    steps: list[tuple[str, Callable[[ModelCandidate], Option | None]]] = [
        ("full", lambda m: _try_full(b, m, True)),
        ("reduced", lambda m: _try_full(b, m, False)),
    ]
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
    alternatives = [by_path.get(m.path) or failed_option(b, m) for m in cands]
    if not found:
        raise refusal(b, cands, alternatives, request)
    first = min(i for i, _, _ in found)
    m, o = _pick(steps[first][0], [(m, o) for i, m, o in found if i == first], profile)
    o, why_slots = _with_slots(b, m, o)
    placed = place_draft(b, m, o, draft) if draft is not None else None
    p = make_plan(b, m, placed.target if placed else o, steps[first][0], alternatives, cands, why_slots)
    add_speculation(p, b, m, placed)
    return p


def _ordered(candidates: list[ModelCandidate], profile: Profile, request: Request) -> list[ModelCandidate]:
    """The requested quant only, else every candidate in the profile's order (local files first)."""
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


def _within_context(
    cands: list[ModelCandidate], candidates: list[ModelCandidate], request: Request
) -> list[ModelCandidate]:
    """The candidates trained for the requested context; refused when none is."""
    if not request.ctx:
        return cands
    cands = [c for c in cands if not c.context_length or request.ctx <= c.context_length]
    if not cands:
        longest = max(c.context_length for c in candidates)
        raise BadInputError(
            f"--ctx {request.ctx} is beyond the model's trained context of {longest} tokens; "
            f"use at most {longest}"
        )
    return cands


def _pick(
    step: str, found: list[tuple[ModelCandidate, Option]], profile: Profile
) -> tuple[ModelCandidate, Option]:
    """First in preference order; for partial offloads, the first fast enough, else the fastest."""
    if step != "partial":
        return found[0]
    fast = [(m, o) for m, o in found if o.tokens_per_s >= profile.min_tokens_per_s]
    return fast[0] if fast else max(found, key=lambda mo: mo[1].tokens_per_s)


# ----------------------------------------------------------------------------- the searches


def _max_ctx(
    b: Box, m: ModelCandidate, ngl: int, kv: str, n_slots: int = 1, upto: int | None = None
) -> int | None:
    """The largest context in [min, target or ``upto``] (a multiple of CTX_STEP, or exactly the
    upper end) that fits."""
    hi = upto or min(b.target_ctx, m.context_length or b.target_ctx)
    lo = min(b.min_ctx, hi)
    if evaluate(b, m, settings_for(b, hi, ngl, kv, n_slots))[0]:
        return hi
    if not evaluate(b, m, settings_for(b, lo, ngl, kv, n_slots))[0]:
        return None
    lo_k, hi_k = -(-lo // CTX_STEP), hi // CTX_STEP  # search in steps; lo itself is known to fit
    best = lo
    while lo_k <= hi_k:
        mid = (lo_k + hi_k) // 2
        if mid * CTX_STEP >= lo and evaluate(b, m, settings_for(b, mid * CTX_STEP, ngl, kv, n_slots))[0]:
            best, lo_k = max(best, mid * CTX_STEP), mid + 1
        else:
            hi_k = mid - 1
    return best


def _max_ngl(b: Box, m: ModelCandidate, ctx: int, kv: str) -> int | None:
    for ngl in range(m.n_layers + 1, -1, -1):
        if evaluate(b, m, settings_for(b, ctx, ngl, kv))[0]:
            return ngl
    return None


def _try_full(b: Box, m: ModelCandidate, at_target: bool) -> Option | None:
    """Every layer on the GPUs (or the requested count): at the target context, or the largest
    context down to the minimum."""
    ngl = full_ngl(b, m)
    for kv in b.kv_types:
        if at_target:
            ctx = min(b.target_ctx, m.context_length or b.target_ctx)
            if evaluate(b, m, settings_for(b, ctx, ngl, kv))[0]:
                return option(b, m, settings_for(b, ctx, ngl, kv), "fits fully at the target context")
        else:
            ctx = _max_ctx(b, m, ngl, kv)
            if ctx is not None:
                return option(b, m, settings_for(b, ctx, ngl, kv), "fits fully at a reduced context")
    return None


def _try_partial(b: Box, m: ModelCandidate) -> Option | None:
    """Largest context in [min, target] where some layers fit on the GPUs, with the most layers there."""
    best: Option | None = None
    for kv in b.kv_types:
        ctx_hi = min(b.target_ctx, m.context_length or b.target_ctx)
        for ctx in _ctx_ladder(ctx_hi, min(b.min_ctx, ctx_hi)):
            ngl = _max_ngl(b, m, ctx, kv)
            if ngl is not None:
                o = option(
                    b,
                    m,
                    settings_for(b, ctx, ngl, kv),
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


# ---------------------------------------------------------------------------- parallel slots


def _with_slots(b: Box, m: ModelCandidate, o: Option) -> tuple[Option, str]:
    """The single-request option with the slots the policy allows (module docstring), and why."""
    s = o.settings
    assert s is not None
    whose = "requested" if b.fixed_parallel else "the profile's"
    if b.parallel == 1:
        return o, f"1: one request at a time ({whose})"
    if b.fixed_parallel:
        ctx = _max_ctx(b, m, s.n_gpu_layers, s.type_k, b.parallel, upto=s.n_ctx)
        if ctx is None:
            low = replace(s, n_ctx=min(b.min_ctx, s.n_ctx), n_slots=1)
            raise slots_refusal(b, m, s, _max_slots(b, m, low, b.parallel))
        o = option(b, m, replace(s, n_ctx=ctx, n_slots=b.parallel), o.note)
        less = f"; context reduced from {s.n_ctx} to make room for their KV cache" if ctx < s.n_ctx else ""
        return o, f"{b.parallel}: as requested, {b.parallel + 1} KV streams of {ctx} cells{less}"
    n = _max_slots(b, m, s, b.parallel)
    if n == 1:
        return o, f"1: the profile's {b.parallel} slots do not fit at context {s.n_ctx}; one request at a time"
    o = option(b, m, replace(s, n_slots=n), o.note)
    fewer = "" if n == b.parallel else f" (of the profile's {b.parallel}: the most that fit)"
    return o, (
        f"{n}{fewer}: requests decoded at once, {n + 1} KV streams of {s.n_ctx} cells "
        "(one holds the shared prefix); slots are given up before context"
    )


def _max_slots(b: Box, m: ModelCandidate, s: Settings, most: int) -> int:
    """The most slots, up to ``most``, that fit with these settings (1 when none more do)."""
    return next((n for n in range(most, 1, -1) if evaluate(b, m, replace(s, n_slots=n))[0]), 1)


# ------------------------------------------------------------------------ planning for a local model


def plan_for_model(
    model_path: str,
    request: Request | None = None,
    hardware: Hardware | None = None,
    profile_name: str | None = None,
    draft_path: str | None = None,
) -> tuple[Plan, Hardware]:
    """Detect this box (unless ``hardware`` is given), pick its profile and plan ``model_path``
    (with the draft model at ``draft_path``, its vocabulary checked first).

    The one way the engine gets its settings: overrides travel in ``request`` and are refused
    with the reason when they cannot fit.
    """
    from edge_magistral.catalog import from_gguf_info
    from edge_magistral.gguf_info import read_info
    from edge_magistral.hardware import detect
    from edge_magistral.profiles import choose_profile, load_profiles

    hw = hardware or detect()
    profile = choose_profile(hw, load_profiles(), profile_name)
    target = from_gguf_info(read_info(model_path))
    draft = draft_candidate(draft_path, [target]) if draft_path else None
    return plan(hw, profile, [target], request, draft), hw
