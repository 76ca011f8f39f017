"""``edge-magistral detect`` and ``edge-magistral plan``: parse, call the library, render."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click

from edge_magistral.catalog import ModelCandidate, catalog, from_gguf_info
from edge_magistral.cli.cluster_opts import cluster_of, cluster_options
from edge_magistral.cli.group import cli
from edge_magistral.errors import BackendError, BadInputError
from edge_magistral.hardware import Hardware, detect, load_hardware
from edge_magistral.planner import DeviceMemory, NoFitError, Option, Plan, Request, draft_candidate, plan
from edge_magistral.planner.cluster import Link, WorkerBox, plan_cluster
from edge_magistral.planner.types import ClusterPlan
from edge_magistral.profiles import MAX_PARALLEL, Profile, choose_profile, load_profiles
from edge_magistral.units import GiB, MiB


@cli.command("detect")
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (feed it to `plan --hardware`)."
)
@click.option("--store", "store_dir", default=None, help="Model store folder whose disk space to report.")
def detect_cmd(as_json: bool, store_dir: str | None) -> None:
    """Report CPU, RAM, container limit, disk and GPUs as llama.cpp and the vendor tools see them."""
    hw = detect(store_dir=store_dir)
    if as_json:
        click.echo(hw.to_json())
    else:
        click.echo(_render_hardware(hw))
    if any(f.level == "error" for f in hw.findings):
        click.get_current_context().exit(BackendError.exit_code)


@cli.command("plan")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--ctx", type=click.IntRange(min=256), default=None, help="Require this context (tokens).")
@click.option("--profile", "profile_name", default=None, help="Use this profile instead of the matching one.")
@click.option(
    "--hardware",
    "hardware_files",
    type=click.Path(dir_okay=False),
    multiple=True,
    help="Plan for the box described by this `detect --json` file; repeated, the first is the head and "
    "the others are its RPC workers, in llama.cpp's device order.",
)
@click.option("--link-mbit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Bandwidth of the link to each worker, Mbit/s (default 1000).")
@click.option("--link-ms", type=click.FloatRange(min=0), default=None,
              help="One-way latency of the link to each worker, ms (default 0.5).")
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A local GGUF to consider (repeatable); without it, the catalog of quants.",
)
@click.option("--quant", default=None, help="Consider only this quant (e.g. Q4_K_M).")
@click.option(
    "--n-gpu-layers", type=click.IntRange(min=0), default=None, help="Require this many GPU layers."
)
@click.option(
    "--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default=None, help="Require this KV type."
)
@click.option(
    "--parallel",
    type=click.IntRange(1, MAX_PARALLEL),
    default=None,
    help="Requests decoded at once by `serve` (default: the profile's, lowered to what fits).",
)
@click.option(
    "--draft",
    "draft_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="A draft GGUF for speculative decoding (same vocabulary): plan its memory next to the model.",
)
@cluster_options
def plan_cmd(as_json: bool, ctx: int | None, profile_name: str | None, hardware_files: tuple[str, ...],
             link_mbit: float | None, link_ms: float | None, models: tuple[str, ...], quant: str | None,
             n_gpu_layers: int | None, kv_type: str | None, parallel: int | None, draft_path: str | None,
             workers: tuple[str, ...], cluster_file: str | None, allow_public_worker: bool) -> None:
    """Choose quant, GPU layers, context and KV cache for this box (or another one), with reasons;
    with --draft, where the draft model goes and what it costs per device; with several --hardware,
    the layers across the head and its RPC workers, and what the links cost."""
    hw = load_hardware(hardware_files[0]) if hardware_files else detect()
    profiles = load_profiles()
    profile = choose_profile(hw, profiles, profile_name)
    candidates = _candidates(models)
    request = Request(ctx=ctx, n_gpu_layers=n_gpu_layers, quant=quant, kv_type=kv_type, parallel=parallel)
    boxes = _boxes(cluster_of(workers, cluster_file, allow_public_worker), hardware_files, link_mbit, link_ms)
    try:
        p = _plan(hw, profile, profiles, candidates, request, boxes, draft_path)
    except NoFitError as e:
        _echo_refusal(e, as_json)
        raise
    if as_json:
        click.echo(json.dumps({"fits": True, **p.to_dict()}, indent=2))
    else:
        click.echo(_render_plan(p, hw))
        if p.cluster is not None:
            click.echo(_render_cluster(p.cluster))


def _plan(hw: Hardware, profile: Profile, profiles: dict[str, Profile], candidates: list[ModelCandidate],
          request: Request, workers: list[WorkerBox], draft_path: str | None) -> Plan:
    """This box alone (with its draft model), or across the workers."""
    if workers:
        if draft_path:
            raise BadInputError("a draft model across RPC workers is not supported: drop --draft")
        return plan_cluster(hw, workers, candidates, request, profile, profiles)
    draft = draft_candidate(draft_path, candidates) if draft_path else None
    return plan(hw, profile, candidates, request, draft)


def _echo_refusal(e: NoFitError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"fits": False, "error": str(e), "missing_bytes": e.missing_bytes,
                               "alternatives": [asdict(a) for a in e.alternatives]}, indent=2))
    else:
        click.echo(_render_alternatives(e.alternatives))


def _boxes(cluster, hardware_files: tuple[str, ...], link_mbit: float | None,
           link_ms: float | None) -> list[WorkerBox]:
    """The running workers, probed (their boxes as they publish them, links from the cluster
    file), else the recorded ones (every --hardware after the first)."""
    from edge_magistral.rpc.head import worker_boxes

    if cluster is None:
        return _workers(hardware_files[1:], link_mbit, link_ms)
    if len(hardware_files) > 1 or link_mbit is not None or link_ms is not None:
        raise BadInputError("give the workers either running (--worker/--cluster; links in the cluster file) "
                            "or recorded (a second --hardware with --link-mbit/--link-ms), not both")
    return worker_boxes(cluster)


def _workers(files: tuple[str, ...], link_mbit: float | None, link_ms: float | None) -> list[WorkerBox]:
    """Each further --hardware file as a worker named after its file, with the given link."""
    if not files and (link_mbit is not None or link_ms is not None):
        raise BadInputError("--link-mbit and --link-ms describe the link to workers: give a second --hardware")
    d = Link()
    link = Link(d.bandwidth_bytes_s if link_mbit is None else link_mbit * 1e6 / 8,
                d.latency_s if link_ms is None else link_ms / 1e3)
    names = [Path(f).stem for f in files]
    names = [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]
    return [WorkerBox(n, load_hardware(f), link) for n, f in zip(names, files, strict=True)]


def _candidates(models: tuple[str, ...]) -> list[ModelCandidate]:
    if not models:
        return catalog()
    from edge_magistral.gguf_info import read_info

    return [from_gguf_info(read_info(m)) for m in models]


# ------------------------------------------------------------------------------------- render


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def _render_hardware(hw: Hardware) -> str:
    c = hw.cpu
    lines = [
        f"CPU      {c.model} ({c.arch}), {c.cores_physical} cores / {c.cores_logical} threads, "
        f"{' '.join(c.flags) or 'no SIMD flags found'}",
        f"RAM      {_gib(hw.ram_total_bytes)} total, {_gib(hw.ram_available_bytes)} available",
    ]
    if hw.cgroup_limit_bytes is not None:
        lines.append(
            f"limit    container memory limit {_gib(hw.cgroup_limit_bytes)} "
            f"(using {_gib(hw.cgroup_usage_bytes)}); usable {_gib(hw.usable_ram_bytes)}"
        )
    lines.append(f"disk     {_gib(hw.disk_free_bytes)} free at {hw.store_dir}")
    if hw.board:
        lines.append(f"board    {hw.board}" + (f" ({hw.jetson_release})" if hw.jetson_release else ""))
    for g in hw.gpus:
        extra = ", ".join(
            x
            for x in (
                g.driver and f"driver {g.driver}",
                g.compute_capability and f"compute {g.compute_capability}",
                "unified memory" if g.unified else "",
            )
            if x
        )
        lines.append(
            f"GPU      {g.name} [{g.vendor}] {_gib(g.total_bytes)} total, {_gib(g.free_bytes)} free"
            f"{' (' + extra + ')' if extra else ''}; llama.cpp device: {g.ggml_device or 'none'}"
        )
    if not hw.gpus:
        lines.append("GPU      none")
    if hw.ggml_devices is not None:
        lines.append(
            "llama.cpp sees: "
            + ", ".join(f"{d.name} ({d.description}, {_gib(d.free_bytes)} free)" for d in hw.ggml_devices)
        )
    for f in hw.findings:
        lines.append(f"{f.level.upper():8} {f.message}" + (f"\n         fix: {f.fix}" if f.fix else ""))
    return "\n".join(lines)


def _render_plan(p: Plan, hw: Hardware) -> str:
    lines = [
        f"plan for {hw.cpu.model} + {', '.join(g.name for g in hw.runnable_gpus()) or 'no GPU'}",
        f"  model        {p.quant} ({p.source}: {p.model_path})",
        f"  gpu layers   {p.n_gpu_layers}",
        f"  context      {p.n_ctx}" + (f" per slot, {p.n_slots} slots" if p.n_slots > 1 else ""),
        f"  slots        {p.n_slots} (requests decoded at once)",
        f"  kv cache     {p.type_k}/{p.type_v}, flash attention {'on' if p.flash_attn else 'off'}",
        f"  batch        {p.n_batch}/{p.n_ubatch}, threads {p.n_threads}/{p.n_threads_batch}",
        f"  think budget {p.think_budget} tokens",
        f"  speculate    {p.speculate}",
    ]
    if p.draft is not None:
        lines.append(f"  draft        {p.draft.quant} ({p.draft.model_path}), "
                     f"{p.draft.n_gpu_layers} of {p.draft.n_layers + 1} layers on GPU")
    lines += [f"  predicted    {p.tokens_per_s:.1f} tokens/s" + (" (without speculation)" if p.draft else ""), "",
              "why:"]
    lines += [f"  {k:12} {v}" for k, v in p.reasons.items()]
    lines += ["", "predicted memory (weights + KV + compute + overhead):"]
    lines += _render_memory(p.memory, _gib)
    if p.draft is not None:
        lines += ["", "draft model's memory (weights + KV + compute + overhead; counted in the pools above):"]
        lines += _render_memory(p.draft.memory, _mib)
    if p.alternatives:
        lines += ["", _render_alternatives(p.alternatives)]
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def _render_memory(memory: list[DeviceMemory], unit: Callable[[int], str]) -> list[str]:
    return [
        f"  {d.device:10} {unit(d.total):>10} = {unit(d.weights)} + {unit(d.kv_cache)} + "
        f"{unit(d.compute)} + {unit(d.overhead)}  ({d.layers} layers)"
        for d in memory
    ]


def _render_alternatives(alts: list[Option]) -> str:
    rows = [("quant", "fits", "gpu layers", "context", "kv", "memory need / budget", "tokens/s", "")]
    for a in alts:
        s = a.settings
        mem = ", ".join(f"{u.pool} {u.need / GiB:.1f}/{u.budget / GiB:.1f}" for u in a.pools)
        rows.append(
            (
                a.quant,
                "yes" if a.fits else "no",
                str(s.n_gpu_layers) if s else "-",
                str(s.n_ctx) if s else "-",
                s.type_k if s else "-",
                mem + " GiB",
                f"{a.tokens_per_s:.1f}" if a.fits else "-",
                a.note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["alternatives:"]
    for r in rows:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(out)


def _render_cluster(c: ClusterPlan) -> str:
    lines = ["", "across boxes (llama.cpp device order: " + ", ".join(c.device_order) + "):",
             f"  head CPU     {c.head_cpu_layers} layers and the token embeddings; output layer on {c.output_device}"]
    for w in c.workers:
        m = w.memory
        lines.append(f"  {w.endpoint:12} {w.layers} layers on {', '.join(w.devices)}: {_gib(m.total)} "
                     f"({_gib(m.weights)} weights, {_gib(m.kv_cache)} KV, {_mib(m.compute)} compute), "
                     f"profile {w.profile}; link {w.link_mbit:g} Mbit/s, {w.link_ms:g} ms")
        lines.append("               " + "; ".join(f"{u.pool} {_gib(u.need)} of {_gib(u.budget)}" for u in w.pools))
        lines.append(f"               first load {_gib(w.first_load_bytes)}, later loads {_mib(w.reload_bytes)} "
                     "(its cache)")
    lines += [f"  predicted    {c.tokens_per_s:.2f} tokens/s ({c.tokens_per_s_no_link:.2f} without the links: "
              f"{c.link_ms_per_token:.2f} ms per token, {c.boundaries} link crossings, "
              f"{c.round_trips_per_token} round trips)",
              f"  first token  {c.ttft_s:.1f} s after a {c.prompt_tokens}-token prompt",
              f"  first load   {_gib(c.first_load_bytes)} over the links ({_gib(c.reload_bytes)} later, cached)"]
    return "\n".join(lines)
