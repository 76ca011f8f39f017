"""A draft model in the plan: its memory per device, where its layers go, and what the plan says.

The draft is a second llama.cpp context in the same process (``edge_magistral.draft_model``) with
the target's context, KV type, batch and slots: its weights, KV streams and compute buffer are
predicted by the same memory model, less what the process already holds once (Python, llama.cpp's
code, a GPU backend's context: a second context on a GPU adds its own streams and memory pool,
``DRAFT_GPU_OVERHEAD``, an estimate).

Placement, after the target is planned as without a draft (quant, context, KV type, slots):
all the draft's layers on the GPUs when they fit next to the target, since a draft earns its
keep only by being fast; else the target gives up the fewest GPU layers that make room (not
when ``--n-gpu-layers`` fixed them); else the draft goes partly (or wholly) to the CPU, which the
reasons call out; else the draft is refused with what it would cost per device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_magistral.catalog import ModelCandidate, from_gguf_info
from edge_magistral.errors import BadInputError, DoesNotFitError
from edge_magistral.planner.box import CTX_STEP, Box, gib
from edge_magistral.planner.memory import HOST_OVERHEAD, pool_use, predict, tokens_per_s
from edge_magistral.planner.types import DeviceMemory, DraftPlan, Option, Plan, PoolUse, Settings
from edge_magistral.units import MiB

DRAFT_GPU_OVERHEAD = {"cuda": 128 * MiB, "rocm": 128 * MiB, "metal": 64 * MiB, "vulkan": 128 * MiB}


@dataclass
class Placement:
    """Where the draft goes and what the target keeps: ``target`` is the target's option with its
    (possibly lowered) GPU layers and the pools of both models together."""

    target: Option
    draft: DraftPlan
    target_ngl_before: int
    tokens_per_s_before: float


def predict_draft(d: ModelCandidate, s: Settings, b: Box) -> list[DeviceMemory]:
    """The draft's bytes per device (CPU first, then each GPU) at the target's settings ``s`` with
    the draft's own GPU layers in ``s.n_gpu_layers``."""
    mem = predict(d, s, b.gpus)
    backend = {g.name: g.backend for g in b.gpus}
    for dm in mem:
        if dm.device == "CPU":
            dm.overhead -= HOST_OVERHEAD  # the process is there already; its logits array is not
        else:
            dm.overhead = DRAFT_GPU_OVERHEAD.get(backend[dm.device], 128 * MiB)
    return mem


def _together(
    b: Box, m: ModelCandidate, s: Settings, d: ModelCandidate, draft_ngl: int
) -> tuple[bool, list[DeviceMemory], list[DeviceMemory], list[PoolUse]]:
    """Whether the target at ``s`` and the draft with ``draft_ngl`` GPU layers fit together."""
    mem = predict(m, s, b.gpus)
    dmem = predict_draft(d, replace(s, n_gpu_layers=draft_ngl), b)
    use = pool_use(mem + dmem, b.gpus, b.pools)
    return all(u.fits for u in use), mem, dmem, use


def place_draft(b: Box, m: ModelCandidate, o: Option, d: ModelCandidate) -> Placement:
    """The draft's placement next to the planned target ``o`` (module docstring), or a refusal."""
    s = o.settings
    assert s is not None
    full = d.n_layers + 1 if b.gpus else 0
    lowest = s.n_gpu_layers if b.fixed_ngl is not None else 0
    tries = [(ngl, full) for ngl in range(s.n_gpu_layers, lowest - 1, -1)]
    tries += [(s.n_gpu_layers, dngl) for dngl in range(full - 1, -1, -1)]
    for ngl, dngl in tries:
        ts = replace(s, n_gpu_layers=ngl)
        ok, mem, dmem, use = _together(b, m, ts, d, dngl)
        if ok:
            target = Option(m.quant, m.path, True, ts, use, tokens_per_s(m, mem, b.gpus, b.profile), o.note)
            dp = DraftPlan(d.path, d.quant, dngl, d.n_layers, d.context_length, dmem)
            return Placement(target, dp, s.n_gpu_layers, o.tokens_per_s)
    raise draft_refusal(b, m, s, d)


def draft_refusal(b: Box, m: ModelCandidate, s: Settings, d: ModelCandidate) -> DoesNotFitError:
    """No placement fits: the draft's cost per device at its best placement, and what is short
    with it wholly on the CPU (the least GPU memory it can take)."""
    full = d.n_layers + 1 if b.gpus else 0
    cost = _costs(predict_draft(d, replace(s, n_gpu_layers=full), b))
    where = f"with all its layers on {', '.join(g.name for g in b.gpus)}" if b.gpus else "on the CPU"
    short = "; ".join(f"{u.pool} needs {gib(u.need)} of {gib(u.budget)}"
                      for u in _together(b, m, s, d, 0)[3] if not u.fits)
    cpu = f"; with it on the CPU instead, {short}" if b.gpus else f" ({short})"
    ctx = _ctx_that_fits(b, m, s, d)
    smaller = f"--ctx {ctx} (both fit there)" if ctx else "a smaller --ctx"
    return DoesNotFitError(
        f"the draft model {d.path} does not fit next to {m.quant} at context {s.n_ctx}: it costs {cost} "
        f"{where}{cpu}. Use a smaller draft, {smaller}, or --speculate ngram"
    )


def _costs(mem: list[DeviceMemory]) -> str:
    return ", ".join(f"{dm.device} {dm.total / MiB:.0f} MiB" for dm in mem if dm.total)


def _ctx_that_fits(b: Box, m: ModelCandidate, s: Settings, d: ModelCandidate) -> int | None:
    """The largest context (a multiple of CTX_STEP, at least the profile's minimum) at which the
    target as planned and the whole draft on the GPUs fit together; None if none does."""
    full = d.n_layers + 1 if b.gpus else 0
    for ctx in range((s.n_ctx - 1) // CTX_STEP * CTX_STEP, min(b.min_ctx, s.n_ctx) - 1, -CTX_STEP):
        if ctx > 0 and _together(b, m, replace(s, n_ctx=ctx), d, full)[0]:
            return ctx
    return None


def draft_candidate(path: str, targets: list[ModelCandidate]) -> ModelCandidate:
    """The draft GGUF at ``path`` as a planner candidate, refused (BadInputError) unless it shares
    every local target's vocabulary id for id (catalog targets: their token count only; the
    engine checks the downloaded file at load)."""
    from edge_magistral.gguf_info import read_info
    from edge_magistral.vocab_match import check_draft_vocab, check_token_count

    info = read_info(path)
    for t in targets:
        if t.source == "local":
            check_draft_vocab(read_info(t.path), info)
        else:
            check_token_count(t.n_vocab, info)
    if not info.n_layers or not info.n_embd:
        raise BadInputError(f"{path}: no layer count or embedding size in its metadata; not a usable draft model")
    tied = not any(t.name == "output.weight" for t in info.tensors)
    c = from_gguf_info(replace(info, architecture="llama"))  # other decoder architectures: the llama estimate
    if tied:  # the output layer reuses the token embeddings: a copy goes with the output layer (on the CPU,
        # where the mapped file serves both, this over-counts: a conservative estimate)
        c.output_bytes += c.token_embd_bytes
    return c


# ------------------------------------------------------------------------------------ reasons


def add_speculation(plan: Plan, b: Box, m: ModelCandidate, placed: Placement | None) -> None:
    """The plan's speculation: the mode, the draft, and why (the profile's advice, the draft's
    placement and what the target gave up for it)."""
    p = b.profile
    advice = f"the profile {'recommends' if p.draft_recommended else 'does not recommend'} a draft model here"
    advice += f" ({p.draft_reason})" if p.draft_reason else ""
    gain = "the gain depends on the acceptance rate (measured as it decodes; guesses stop when they do not pay)"
    if placed is None:
        plan.speculate = "ngram" if p.speculate == "draft" else p.speculate
        how = {"ngram": "n-gram guesses from the prompt and the turn, no memory", "off": "one token per step"}
        plan.reasons["speculate"] = f"{plan.speculate}: {how[plan.speculate]}; {advice}" + (
            "; give --draft FILE.gguf to plan one" if p.draft_recommended else "")
        return
    plan.speculate, plan.draft = "draft", placed.draft
    plan.reasons["speculate"] = (f"draft: the draft proposes tokens, the model verifies them in one batch; {gain}; "
                                 f"predicted tokens/s is without speculation; {advice}")
    plan.reasons["draft"] = _why_draft(b, placed)
    if placed.target.settings and placed.target.settings.n_gpu_layers < placed.target_ngl_before:
        plan.reasons["n_gpu_layers"] = (
            f"{plan.n_gpu_layers} of {m.n_layers + 1}: lowered from {placed.target_ngl_before} to make room for "
            f"the draft on the GPU (predicted {placed.tokens_per_s_before:.1f} → {plan.tokens_per_s:.1f} tokens/s "
            "before speculation)")


def _why_draft(b: Box, placed: Placement) -> str:
    dp = placed.draft
    n_all = dp.n_layers + 1
    gpu = sum(dm.total for dm in dp.memory if dm.device != "CPU")
    cost = _costs(dp.memory)
    ctx = placed.target.settings.n_ctx if placed.target.settings else 0
    if not b.gpus:
        where = "on the CPU, as the model; it shares the memory bandwidth the model decodes with"
    elif dp.n_gpu_layers >= n_all:
        where = f"all {n_all} layers on the GPU next to the model"
    elif dp.n_gpu_layers == 0:
        where = ("0 layers on the GPU: on the CPU beside a GPU model a draft is nearly useless (each guess "
                 "costs a CPU decode); prefer a smaller draft or --speculate ngram")
    else:
        where = (f"{dp.n_gpu_layers} of {n_all} layers on the GPU, the rest on the CPU, which slows every "
                 "guess; prefer a smaller draft")
    trained = (f"; trained for {dp.context_length} tokens, less than the context {ctx}: beyond it its guesses "
               "get worse (the output does not)") if dp.context_length and dp.context_length < ctx else ""
    return f"{dp.quant} {dp.model_path}: {where}; costs {cost} ({gib(gpu)} on GPUs){trained}"
