"""``pull``, ``bundle``, ``import`` and ``store``: the model store from the command line, and the
first-run path ``run`` takes when there is no model yet.

Importing this module puts huggingface-hub in offline mode for the whole process: every command
works without a network and never tries one. ``pull`` (and a first run's pull, once agreed to)
is the only thing that goes online.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edge_magistral import store as st
from edge_magistral.build import manifest as mf
from edge_magistral.cli.group import cli
from edge_magistral.cli.render import RichProgress, console, err_console
from edge_magistral.errors import BadInputError, ModelNotFoundError
from edge_magistral.loader import NoModelError, resolve_model
from edge_magistral.units import human_size

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.planner import Plan
    from edge_magistral.profiles import Profile

st.offline_by_default()

AIR_GAP_HINT = ("On a connected machine: `edge-magistral pull --quant {q}` then `edge-magistral bundle "
                "--quant {q} --out DIR`; carry DIR over, then here: `edge-magistral import DIR`")


def store_option(f):
    return click.option("--store", "store_dir", default=None, type=click.Path(file_okay=False),
                        help=f"Model store directory (default: ${st.STORE_ENV}; for the service "
                             f"{st.SYSTEM_STORE}; else ~/.cache/edge-magistral/models).")(f)


def hardware_options(f):
    f = click.option("--profile", default=None, help="Plan with this profile instead of the matching one.")(f)
    return click.option("--hardware", "hardware_file", type=click.Path(dir_okay=False), default=None,
                        help="With --quant auto: plan for the box this `detect --json` file describes.")(f)


# ---------------------------------------------------------------------------------------- pull


@cli.command()
@click.option("--quant", default="auto", show_default=True,
              help="GGUF quant to fetch (Q4_K_M, Q5_K_M, Q8_0, BF16), or auto: what `plan` picks for "
                   "this box.")
@click.option("--checkpoint", is_flag=True,
              help="Fetch the original checkpoint (for `build`) instead of a GGUF.")
@click.option("--repo", default=None,
              help=f"Hub repository (default {st.DEFAULT_REPO}; with --checkpoint {st.CHECKPOINT_REPO}).")
@click.option("--revision", default="main", show_default=True,
              help="Branch, tag or commit; the commit it resolves to is recorded in the manifest.")
@click.option("--pattern", default=st.DEFAULT_PATTERN, show_default=True,
              help="GGUF file name in the repository; {quant} is replaced by the quant.")
@click.option("--offline", is_flag=True,
              help="Take the files from huggingface-hub's local cache only (also when HF_HUB_OFFLINE=1).")
@hardware_options
@store_option
def pull(quant: str, checkpoint: bool, repo: str | None, revision: str, pattern: str, offline: bool,
         hardware_file: str | None, profile: str | None, store_dir: str | None) -> None:
    """Download a model into the store through huggingface-hub: pinned to the commit the revision
    resolves to, resumable, and verified against the hub's sha256 before it is listed."""
    store = st.Store.default(store_dir)
    offline = offline or st.user_wants_offline()
    if checkpoint:
        req = st.checkpoint_request(repo or st.CHECKPOINT_REPO, revision, offline=offline)
        plan = st.plan_pull(store, req)
    else:
        plan = _plan_gguf(store, quant, repo or st.DEFAULT_REPO, revision, pattern, offline, hardware_file,
                          profile)
    entries = _fetch(store, plan)
    for e in entries:
        console().print(f"ok  {e.file}  {e.quant}  {human_size(e.size)}  sha256 {e.sha256[:16]}…  "
                        f"{e.repo}@{e.revision[:12]}")
    console().print(f"store: {store.root}")
    if checkpoint:
        console().print(f"build it: edge-magistral build {store.root / plan.request.subdir} --out DIR")


def _plan_gguf(store: st.Store, quant: str, repo: str, revision: str, pattern: str, offline: bool,
               hardware_file: str | None, profile: str | None) -> st.PullPlan:
    if quant.lower() != "auto":
        return st.plan_pull(store, st.gguf_request(_canonical(quant), repo, revision, pattern, offline))
    from edge_magistral.catalog import CATALOG_QUANTS

    default = repo == st.DEFAULT_REPO and pattern == st.DEFAULT_PATTERN
    quants = list(st.OFFICIAL_QUANTS if default else CATALOG_QUANTS)
    hw, prof = _box(store, hardware_file, profile)
    while True:
        p = catalog_plan(hw, prof, quants)
        err_console().print(f"--quant auto: {p.quant} for this box (profile {prof.name}: "
                            f"{p.n_gpu_layers} GPU layers, context {p.n_ctx})")
        try:
            return st.plan_pull(store, st.gguf_request(p.quant, repo, revision, pattern, offline))
        except st.FileNotOnHubError:
            err_console().print(f"{repo} has no {p.quant}; planning again without it")
            quants.remove(p.quant)
            if not quants:
                raise


def catalog_plan(hw: Hardware, profile: Profile, quants: tuple[str, ...] | list[str]) -> Plan:
    """What the planner picks for this box among ``quants``, from the catalog (nothing downloaded):
    how ``--quant auto`` and a first run choose. The store itself does not plan."""
    from edge_magistral.catalog import catalog
    from edge_magistral.planner import plan

    return plan(hw, profile, catalog(list(quants)))


def _canonical(quant: str) -> str:
    from edge_magistral.catalog import QUALITY_ORDER

    return next((q for q in QUALITY_ORDER if q.upper() == quant.upper()), quant)


def _box(store: st.Store, hardware_file: str | None, profile: str | None) -> tuple[Hardware, Profile]:
    from edge_magistral.hardware import detect, load_hardware
    from edge_magistral.profiles import choose_profile, load_profiles

    hw = load_hardware(hardware_file) if hardware_file else detect(store_dir=str(store.root))
    return hw, choose_profile(hw, load_profiles(), profile)


def _announce(store: st.Store, plan: st.PullPlan) -> None:
    """Say what will come from where, and how big it is, before any byte moves."""
    r = plan.request
    pin = "" if plan.revision == r.revision else f" ({r.revision})"
    where = "the hub" if plan.source == "hub" else f"huggingface-hub's cache at {st.hub_cache_dir()}"
    out = err_console()
    if plan.note:
        out.print(f"{plan.note}; using {where}", style="yellow")
    out.print(f"{r.quant} from {r.repo} at commit {plan.revision[:12]}{pin}, via {where}")
    for i in plan.items:
        what = {"present": "already in the store", "cache": "copy from the hub cache",
                "download": "download" + (f" (resuming: {human_size(i.have)} already here)" if i.have else "")}
        out.print(f"  {i.entry_file}  {human_size(i.remote.size)}  {what[i.action]}")
    free = shutil.disk_usage(store.staging()).free
    out.print(f"  to download: {human_size(plan.to_download)} of {human_size(plan.total)} into {store.root} "
              f"({human_size(free)} free)")


def _fetch(store: st.Store, plan: st.PullPlan) -> list[mf.FileEntry]:
    _announce(store, plan)
    with RichProgress() as progress:
        return st.fetch(store, plan, progress)


# ----------------------------------------------------------------------------------- first run


def model_for_run(spec: str | None, yes: bool = False, profile: str | None = None) -> str:
    """The GGUF ``run`` loads (see ``loader.resolve_model``); with no model at all, a first run
    pulls the quant the planner picks, after saying what and how big (and asking, unless ``yes``)."""
    try:
        return resolve_model(spec, profile=profile)
    except NoModelError:
        return _first_run(st.Store.default(), yes, profile)


def _first_run(store: st.Store, yes: bool, profile: str | None) -> str:
    from edge_magistral.catalog import catalog

    hw, prof = _box(store, None, profile)
    q = catalog_plan(hw, prof, st.OFFICIAL_QUANTS).quant
    req = st.gguf_request(q)
    size = catalog([q])[0].file_size
    err_console().print(f"No model in {store.root} yet. For this box the planner picks {q}: "
                        f"{req.files[0]} from {req.repo}, about {human_size(size)}.")
    if not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise ModelNotFoundError(f"no model to run: pass --yes to download {q} (about "
                                     f"{human_size(size)}) now, or `edge-magistral pull --quant {q}` first, "
                                     "or --model FILE.gguf. " + AIR_GAP_HINT.format(q=q))
        if not click.confirm("Download it now?", default=True, err=True):
            raise ModelNotFoundError(f"no model to run; `edge-magistral pull --quant {q}` when ready")
    try:
        plan = st.plan_pull(store, req)
    except st.DownloadError as e:
        raise ModelNotFoundError(f"no model in {store.root}, and {e}. " + AIR_GAP_HINT.format(q=q)) from None
    entries = _fetch(store, plan)
    return str(store.root / entries[0].file)


# -------------------------------------------------------------------------------- bundle/import


@cli.command()
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="New (or empty) bundle directory.")
@click.option("--quant", "quants", default=None,
              help="Comma-separated quants from the store, or auto (what the planner picks among them, "
                   "for --hardware's box).")
@click.option("--checkpoint", is_flag=True, help="Also carry the checkpoint pulled with `pull --checkpoint`.")
@click.option("--with-wheels", is_flag=True,
              help="Add a wheelhouse of edge-magistral and all its dependencies (`pip download`).")
@click.option("--platform", "platforms", multiple=True,
              help="Wheel platform of the target (repeatable), e.g. manylinux2014_aarch64 (Jetson) or "
                   "manylinux2014_x86_64; default this machine's.")
@click.option("--python-version", default=None, help="Target Python, e.g. 3.10 (default: this one's).")
@click.option("--pip-arg", "pip_args", multiple=True,
              help="Extra argument for every pip call (repeatable), e.g. --pip-arg=--index-url=URL.")
@hardware_options
@store_option
def bundle(out: Path, quants: str | None, checkpoint: bool, with_wheels: bool, platforms: tuple[str, ...],
           python_version: str | None, pip_args: tuple[str, ...], hardware_file: str | None,
           profile: str | None, store_dir: str | None) -> None:
    """Write an air-gap bundle: model files from the store, the manifest, the profiles, INSTALL.txt
    and SHA256SUMS, and with --with-wheels everything pip needs to install offline."""
    store = st.Store.default(store_dir)
    if not quants and not checkpoint:
        raise BadInputError("nothing to bundle: give --quant Q4_K_M (or auto) and/or --checkpoint")
    if (platforms or python_version or pip_args) and not with_wheels:
        raise BadInputError("--platform, --python-version and --pip-arg go with --with-wheels")
    names = _bundle_quants(store, quants, hardware_file, profile) + ([st.CHECKPOINT] if checkpoint else [])
    wheels = st.WheelSpec(platforms, python_version or "", pip_args) if with_wheels else None
    if wheels is not None:
        err_console().print("downloading wheels with pip (this part needs the package index)…")
    with RichProgress() as progress:
        b = st.make_bundle(store, st.BundleRequest(out, names, wheels), progress)
    models = [e for e in b.manifest.files if e.quant]
    for e in models:
        console().print(f"model  {e.file}  {e.quant}  {human_size(e.size)}  sha256 {e.sha256[:16]}…")
    n_wheels = sum(e.file.startswith("wheels/") for e in b.manifest.files)
    if wheels is not None:
        console().print(f"wheels {n_wheels} files (llama-cpp-python as {b.llama_from})")
    total = sum(e.size for e in b.manifest.files)
    console().print(f"bundle {out}: {len(b.manifest.files)} files, {human_size(total)}; on the other side: "
                    "see INSTALL.txt, then `edge-magistral import DIR`")


def _bundle_quants(store: st.Store, quants: str | None, hardware_file: str | None,
                   profile: str | None) -> list[str]:
    if not quants:
        return []
    if quants.lower() != "auto":
        return [_canonical(q.strip()) for q in quants.split(",") if q.strip()]
    from edge_magistral.catalog import CATALOG_QUANTS

    have = sorted({e.quant for e in store.models()} & set(CATALOG_QUANTS))
    if not have:
        raise ModelNotFoundError(f"the store at {store.root} holds no GGUF to choose from; "
                                 "`edge-magistral pull --quant auto --hardware FILE` first")
    hw, prof = _box(store, hardware_file, profile)
    q = catalog_plan(hw, prof, have).quant
    box = "that" if hardware_file else "this"
    err_console().print(f"--quant auto: {q} for {box} box (profile {prof.name})")
    return [q]


@cli.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--no-profiles", is_flag=True, help="Do not install the bundle's hardware profiles.")
@store_option
def import_cmd(directory: Path, no_profiles: bool, store_dir: str | None) -> None:
    """Verify every file of a bundle (or a build directory) against its manifest, then copy its
    models into the store, all or nothing. A mismatched, truncated, extra or outside file
    refuses the whole bundle."""
    store = st.Store.default(store_dir)
    with RichProgress() as progress:
        r = st.import_bundle(store, directory, progress, profiles=not no_profiles)
    for e in r.added:
        console().print(f"added    {e.file}  {e.quant}  {human_size(e.size)}  sha256 {e.sha256[:16]}…")
    for e in r.present:
        console().print(f"present  {e.file}  {e.quant}  (already in the store)")
    if r.profiles_added:
        console().print(f"profiles added: {', '.join(r.profiles_added)}")
    if r.profiles_kept:
        console().print(f"profiles kept (yours differ from the bundle's): {', '.join(r.profiles_kept)}")
    console().print(f"store: {store.root}")


@cli.command("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@store_option
def store_cmd(as_json: bool, store_dir: str | None) -> None:
    """Where the model store is, and what it holds (`verify` re-hashes it)."""
    store = st.Store.default(store_dir)
    entries = store.entries()
    if as_json:
        click.echo(json.dumps({"root": str(store.root), "files": [asdict(e) for e in entries]}, indent=2))
        return
    free = shutil.disk_usage(store.root).free if store.root.is_dir() else None
    console().print(f"store {store.root}" + (f" ({human_size(free)} free)" if free is not None else " (empty)"))
    for e in entries:
        src = f"{e.repo}@{e.revision[:12]}" if e.repo else "local build"
        console().print(f"  {e.quant:10} {e.file}  {human_size(e.size)}  {src}  {e.created}")
