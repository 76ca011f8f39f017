"""The one call that opens a model: which file a spec names, the plan and load settings it gets
(on recorded boxes, nothing loaded), and the model's sha256 for the audit log."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge_magistral import loader
from edge_magistral.build import manifest as mf
from edge_magistral.catalog import Architecture, tensor_specs
from edge_magistral.errors import BackendError, DoesNotFitError, ModelNotFoundError
from edge_magistral.hardware import RecordedReader, detect
from edge_magistral.loader import ModelRequest, NoModelError, model_sha256, plan_model, resolve_model
from edge_magistral.shaped_gguf import write_shaped_gguf

BOXES = Path(__file__).parent / "data" / "hardware"
SMALL = Architecture(
    n_layers=16, n_embd=256, n_head=4, n_head_kv=1, head_dim=64, n_ff=512, n_vocab=512, context_length=4096
)


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(loader.MODEL_ENV, raising=False)
    monkeypatch.setenv("EDGE_MAGISTRAL_STORE", str(tmp_path / "default-store"))


def shaped(path: Path, quant: str = "Q4_K_M", arch: Architecture = SMALL) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_shaped_gguf(path, arch, tensor_specs(arch, quant), quant)


def store_with(root: Path, *quants: str) -> Path:
    """A store folder whose manifest lists one shaped GGUF per quant."""
    m = mf.Manifest()
    for q in quants:
        shaped(root / f"m-{q}.gguf", q)
        m.put(mf.entry_for(root, f"m-{q}.gguf", q))
    mf.save(root, m)
    return root


def hardware_file(tmp_path: Path, box: str) -> str:
    p = tmp_path / f"{box}.json"
    p.write_text(detect(RecordedReader(BOXES / box)).to_json())
    return str(p)


# ------------------------------------------------------------------------------- resolving


def test_a_path_is_taken_as_given_and_a_quant_from_the_store(tmp_path: Path) -> None:
    store = store_with(tmp_path / "store", "Q4_K_M")
    link = tmp_path / "current.gguf"
    link.symlink_to(store / "m-Q4_K_M.gguf")
    assert resolve_model(str(link), store=str(store)) == str(link)  # a symlink stays the thing named
    assert resolve_model("q4_k_m", store=str(store)) == str(store / "m-Q4_K_M.gguf")
    with pytest.raises(ModelNotFoundError, match="no such model file, and no Q8_0 in the store"):
        resolve_model("Q8_0", store=str(store))


def test_no_spec_takes_the_env_then_the_stores_only_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_with(tmp_path / "store", "Q4_K_M")
    assert resolve_model(None, store=str(store)) == str(store / "m-Q4_K_M.gguf")
    other = shaped(tmp_path / "other.gguf")
    monkeypatch.setenv(loader.MODEL_ENV, str(other))
    assert resolve_model(None, store=str(store)) == str(other)


def test_an_empty_store_is_a_no_model_error(tmp_path: Path) -> None:
    with pytest.raises(NoModelError, match="pull"):
        resolve_model(None, store=str(tmp_path / "empty"))
    assert issubclass(NoModelError, ModelNotFoundError)  # exit code 3 when nobody offers a pull


def test_among_several_store_models_the_planner_picks_for_the_box(tmp_path: Path) -> None:
    store = store_with(tmp_path / "store", "Q8_0", "Q4_K_M")
    for box, quant in (("h200-nvml", "Q8_0"), ("cpu-only-32gb", "Q4_K_M")):  # the profiles' first choices
        picked = resolve_model(None, store=str(store), hardware_file=hardware_file(tmp_path, box))
        assert picked == str(store / f"m-{quant}.gguf")


# -------------------------------------------------------------------------------- planning


def test_plan_model_applies_the_overrides_to_the_load_settings(tmp_path: Path) -> None:
    model = shaped(tmp_path / "m.gguf")
    req = ModelRequest(model=str(model), ctx=2048, parallel=2, threads=3, think_budget=100,
                       hardware_file=hardware_file(tmp_path, "cpu-only-32gb"))
    plan, settings = plan_model(req)
    assert (plan.model_path, plan.n_ctx, plan.n_slots) == (str(model), 2048, 2)
    assert (settings.model_path, settings.n_ctx, settings.n_slots) == (str(model), 2048, 2)
    assert (settings.n_threads, settings.n_threads_batch, settings.think_budget) == (3, 3, 100)
    plan, plain = plan_model(ModelRequest(model=str(model), hardware_file=req.hardware_file))
    assert (plain.think_budget, plain.n_threads, plain.n_slots) == (plan.think_budget, plan.n_threads, plan.n_slots)


def test_plan_model_refuses_what_cannot_fit_and_a_gpu_llama_cpp_cannot_drive(tmp_path: Path) -> None:
    big = shaped(tmp_path / "big.gguf", "Q8_0", Architecture())
    with pytest.raises(DoesNotFitError):
        plan_model(ModelRequest(model=str(big), hardware_file=hardware_file(tmp_path, "rtx3050-laptop-4gb"),
                                n_gpu_layers=41, ctx=40960))
    with pytest.raises(BackendError, match="RTX 3090"):
        plan_model(ModelRequest(model=str(big), hardware_file=hardware_file(tmp_path, "rtx3090-cpu-build")))


def test_planning_loads_no_llama_cpp(tmp_path: Path) -> None:
    """The server's front plans through the loader and must never load llama.cpp."""
    import subprocess
    import sys

    req = ModelRequest(model=str(shaped(tmp_path / "m.gguf")), hardware_file=hardware_file(tmp_path, "cpu-only-32gb"))
    code = ("import sys; from edge_magistral.loader import ModelRequest, plan_model; "
            f"plan_model({req!r}); print('llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------- sha256


def test_model_sha256_trusts_a_manifest_only_when_the_size_matches(tmp_path: Path) -> None:
    store = store_with(tmp_path / "store", "Q4_K_M")
    path = store / "m-Q4_K_M.gguf"
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_sha256(str(path)) == real
    m = mf.load(store)
    m.files[0].sha256 = "f" * 64  # the manifest's word is taken while the size agrees
    mf.save(store, m)
    assert model_sha256(str(path)) == "f" * 64
    with open(path, "ab") as f:
        f.write(b"x")
    assert model_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------- opening


def test_open_model_loads_the_engine_the_plan_asks_for(tiny_gguf_quants: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from edge_magistral.generation import Done, Limits

    req = ModelRequest(model=str(tiny_gguf_quants["Q8_0"]), ctx=1024, parallel=2, threads=2,
                       hardware_file=hardware_file(tmp_path, "cpu-only-32gb"))
    said = []
    opened = loader.open_model(req, on_plan=said.append)
    try:
        assert said == [opened.plan] and opened.path == req.model == opened.settings.model_path
        e = opened.engine
        assert (e.n_slots, e.n_ctx, opened.settings.n_threads) == (2, 1024, 2)
        events = list(e.generate_ids([1, 1000, 1001], Limits(raw=True, max_tokens=2, seed=1)))
        assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens >= 1
    finally:
        opened.close()
