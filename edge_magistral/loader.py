"""Open a model in one call: which GGUF, planned for this box, loaded into an engine.

``open_model(ModelRequest(...))`` resolves the model spec (a path, a quant in the model store, or
nothing: the store's model), detects the box (or reads a recorded one), refuses a GPU the
installed llama.cpp cannot drive, plans with the profile and the caller's overrides, turns the
plan into :class:`~edge_magistral.generation.LoadSettings` and loads the engine. ``run``,
``chat``, ``bench`` and the server's worker all open models this way, so they plan alike.

Everything before the engine (:func:`resolve_model`, :func:`plan_model`) imports no llama.cpp:
the server's front can plan and the CLI can print the plan before anything heavy loads.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_magistral.errors import BadInputError, ModelNotFoundError
from edge_magistral.generation import SPECULATE_MODES, LoadSettings

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.planner import Plan

MODEL_ENV = "EDGE_MAGISTRAL_MODEL"  # stands for the model spec when none is given


class NoModelError(ModelNotFoundError):
    """No model was named and the store holds none (a CLI may offer to pull one)."""


@dataclass(frozen=True)
class ModelRequest:
    """What to open and the caller's overrides; None leaves each choice to the plan."""

    model: str | None = None  # a GGUF path, a quant in the store; None: $EDGE_MAGISTRAL_MODEL, else the store's
    ctx: int | None = None  # the context of one slot
    n_gpu_layers: int | None = None
    parallel: int | None = None  # decoding slots (None: the profile's, lowered to what fits)
    profile: str | None = None  # a profile name (None: the one matching the box)
    hardware_file: str | None = None  # plan for the box this `detect --json` file records
    threads: int | None = None  # threads for prompt and generation (None: the plan's)
    think_budget: int | None = None  # the default per-turn think budget (None: the plan's)
    store: str | None = None  # the model store's folder (None: the default store)
    speculate: str | None = None  # "ngram" | "draft" | "off" (None: the profile's, else ngram)
    draft_model: str | None = None  # a draft GGUF sharing the model's vocabulary (speculate=draft)
    cluster: Any = None  # rpc.endpoints.Cluster: RPC workers to place layers on (None: this box alone)

    def __post_init__(self) -> None:
        """A draft model alone means speculate=draft; refused at once (before anything is
        resolved or loaded): a mode we do not know, draft without a draft model, a draft model
        with another mode."""
        if self.speculate is None and self.draft_model:
            object.__setattr__(self, "speculate", "draft")
        if self.speculate is not None and self.speculate not in SPECULATE_MODES:
            raise BadInputError(f"speculate must be one of {', '.join(SPECULATE_MODES)}, not {self.speculate!r}")
        if self.speculate == "draft" and not self.draft_model:
            raise BadInputError("--speculate draft needs a draft model: give --draft-model FILE.gguf "
                                "(a small model with the same vocabulary)")
        if self.draft_model and self.speculate != "draft":
            raise BadInputError(f"--draft-model goes with --speculate draft, not {self.speculate}")


@dataclass
class OpenedModel:
    """A loaded engine with the plan and settings it was loaded with."""

    engine: Any  # edge_magistral.engine.Engine
    plan: Plan
    settings: LoadSettings
    path: str

    def close(self) -> None:
        self.engine.close()


def resolve_model(spec: str | None, store: str | None = None, profile: str | None = None,
                  hardware_file: str | None = None) -> str:
    """The GGUF path for ``spec``: an existing file as given (a symlink stays a symlink), else a
    quant in the store; with no spec (nor ``$EDGE_MAGISTRAL_MODEL``), the store's only model, or
    the one the planner picks among several for this box (or the one ``hardware_file`` records).

    Raises ModelNotFoundError for a spec that names nothing, NoModelError for an empty store."""
    return _resolve(spec, store, profile, lambda: _hardware(hardware_file, store))


def _resolve(spec: str | None, store: str | None, profile: str | None, hardware: Callable[[], Hardware]) -> str:
    """:func:`resolve_model`, asking ``hardware`` for the box only when the planner must pick."""
    from edge_magistral.store import Store

    spec = spec or os.environ.get(MODEL_ENV) or None
    st = Store.default(store)
    if spec:
        if (named := _named(spec, st)) is not None:
            return named
        raise ModelNotFoundError(f"{spec}: no such model file, and no {spec} in the store at {st.root}; "
                                 f"check --model or ${MODEL_ENV} (`edge-magistral store` lists the store)")
    found = [st.root / e.file for e in st.models() if (st.root / e.file).is_file()]
    if not found:
        raise NoModelError(f"no model given and none in the store at {st.root}: pass --model FILE.gguf, "
                           "or `edge-magistral pull` one")
    if len(found) == 1:
        return str(found[0])
    return _best_of(found, profile, hardware())


def _named(spec: str, st: Any) -> str | None:
    """An existing file as given, else the file of a quant in the store ``st``; None if neither."""
    if Path(spec).is_file():
        return spec
    if (p := st.path_of(spec)) is not None and p.is_file():
        return str(p)
    return None


def resolve_draft(spec: str, store: str | None = None) -> str:
    """The draft GGUF's path, named as a model is (a file, or a quant in the store); never
    guessed: a draft is always named."""
    from edge_magistral.store import Store

    st = Store.default(store)
    if (named := _named(spec, st)) is not None:
        return named
    raise ModelNotFoundError(f"{spec}: no such draft model file, and no {spec} in the store at {st.root}; "
                             "check --draft-model")


def _best_of(paths: list[Path], profile: str | None, hw: Hardware) -> str:
    """The planner's pick among several local GGUFs for this box."""
    from edge_magistral.catalog import from_gguf_info
    from edge_magistral.gguf_info import read_info
    from edge_magistral.planner import plan
    from edge_magistral.profiles import choose_profile, load_profiles

    profile_ = choose_profile(hw, load_profiles(), profile)
    return plan(hw, profile_, [from_gguf_info(read_info(p)) for p in paths]).model_path


def _hardware(hardware_file: str | None, store: str | None) -> Hardware:
    """The recorded box, else this one, refused when llama.cpp cannot drive its GPU (never a
    silent CPU run)."""
    from edge_magistral.hardware import detect, load_hardware, require_usable

    hw = load_hardware(hardware_file) if hardware_file else detect(store_dir=store)
    require_usable(hw)
    return hw


def plan_model(req: ModelRequest) -> tuple[Plan, LoadSettings]:
    """Resolve, detect and plan (nothing loaded): the plan and the settings to load it with.

    Overrides that cannot fit are refused with the reason (DoesNotFitError, BadInputError)."""
    from edge_magistral.planner import Request, plan_for_model

    if req.threads is not None and req.threads < 1:
        raise BadInputError(f"threads must be at least 1, not {req.threads}")
    hardware = functools.cache(lambda: _hardware(req.hardware_file, req.store))  # detected once
    path = _resolve(req.model, req.store, req.profile, hardware)
    hw = hardware()
    request = Request(ctx=req.ctx, n_gpu_layers=req.n_gpu_layers, parallel=req.parallel)
    if req.cluster is not None and req.cluster.workers:
        from edge_magistral.rpc.head import plan_across

        if req.draft_model:
            raise BadInputError("a draft model together with RPC workers is not supported: drop --draft-model "
                                "(n-gram speculation still works)")
        plan = plan_across(path, request, hw, req.cluster, req.profile)
        return plan, _settings(plan, req)
    draft = resolve_draft(req.draft_model, req.store) if req.draft_model and req.speculate != "off" else None
    plan, _ = plan_for_model(path, request, hw, profile_name=req.profile, draft_path=draft)
    return plan, _settings(plan, req)


def _settings(plan: Plan, req: ModelRequest) -> LoadSettings:
    settings = LoadSettings.from_plan(plan)
    if req.threads:
        settings = replace(settings, n_threads=req.threads, n_threads_batch=req.threads)
    if req.think_budget is not None:
        settings = replace(settings, think_budget=req.think_budget)
    return with_speculation(settings, req, plan)


def with_speculation(settings: LoadSettings, req: ModelRequest, plan: Plan | None = None) -> LoadSettings:
    """The request's speculative decoding, else the plan's (the profile's mode; with a draft:
    the draft on the GPU layers the plan gave it), else the settings' own (ngram). A draft is
    named as a model is (:func:`resolve_draft`)."""
    draft_plan = getattr(plan, "draft", None)
    if draft_plan is not None and req.speculate in (None, "draft"):
        return replace(settings, speculate="draft", draft_model=draft_plan.model_path,
                       draft_gpu_layers=draft_plan.n_gpu_layers)
    if req.speculate is None:
        mode = getattr(plan, "speculate", None)
        return replace(settings, speculate=mode) if mode in ("ngram", "off") else settings
    draft = resolve_draft(req.draft_model, req.store) if req.draft_model else None
    return replace(settings, speculate=req.speculate, draft_model=draft)


def load_model(plan: Plan, settings: LoadSettings) -> OpenedModel:
    """Load the engine for settings :func:`plan_model` made (the slow part). A caller that plans
    first and loads afterwards imports ``edge_magistral.engine`` before planning (see
    :func:`open_model`)."""
    return OpenedModel(_engine(settings), plan, settings, settings.model_path)


def open_model(req: ModelRequest, on_plan: Callable[[Plan], None] | None = None) -> OpenedModel:
    """Resolve, plan and load: the one call that opens a model. ``on_plan`` hears the plan
    before the (slow) load, e.g. to say what the planner decided."""
    _llama_first()
    plan, settings = plan_model(req)
    if on_plan is not None:
        on_plan(plan)
    return load_model(plan, settings)


def _llama_first() -> None:
    """Load llama.cpp before anything imports numpy (the GGUF reader does): on a CUDA build the
    other order made every model load segfault."""
    import edge_magistral.engine  # noqa: F401


def _engine(settings: LoadSettings) -> Any:
    """The engine (imports llama.cpp): one engine for one slot or many."""
    from edge_magistral.engine import load_engine

    return load_engine(settings)


def model_sha256(path: str) -> str:
    """The model's sha256: from a build or store manifest beside it when its size matches, else
    computed (the audit log records which bytes answered)."""
    from edge_magistral.build import manifest as mf
    from edge_magistral.hashing import sha256_file

    p = Path(path)
    try:
        entry = mf.load(p.parent).entry(p.name)
    except BadInputError:
        entry = None
    if entry is not None and entry.size == p.stat().st_size:
        return entry.sha256
    return sha256_file(p)
