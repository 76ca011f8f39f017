"""`plan --draft`: a draft model's memory per device in the plan, where its layers go (the GPU
first, the target's layers given up only when both do not fit), refusals (a draft that does not
fit, another vocabulary), and the profiles' speculation advice.

The target is a header-exact Magistral Q4_K_M (sparse data) carrying the tiny model's Tekken
vocabulary; the draft is the tiny model quantized by llama.cpp to Q8_0 (the same vocabulary);
the boxes are recorded hardware files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_magistral.catalog import Architecture, ModelCandidate, from_gguf_info, tensor_specs
from edge_magistral.errors import BadInputError, DoesNotFitError
from edge_magistral.gguf_info import read_info
from edge_magistral.hardware import Hardware, RecordedReader, detect
from edge_magistral.planner import (
    Plan,
    Request,
    devices_of,
    draft_candidate,
    kv_bytes_per_cell,
    kv_streams,
    plan,
    plan_for_model,
    pool_use,
    predict,
    predict_draft,
)
from edge_magistral.planner.box import make_box
from edge_magistral.profiles import BUILTIN_DIR, choose_profile, load_profiles, parse_profile
from edge_magistral.shaped_gguf import write_shaped_gguf
from edge_magistral.vocab_match import check_draft_vocab, check_special_ids

DATA = Path(__file__).parent / "data" / "hardware"
PROFILES = load_profiles([BUILTIN_DIR])
N_ALL = 41  # the target's 40 layers + its output layer
MID = Architecture(n_layers=16, n_embd=2048, n_head=16, n_head_kv=4, head_dim=128, n_ff=8192, context_length=32768)
SMALL = Architecture(n_layers=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, context_length=4096)


def box(name: str) -> Hardware:
    return detect(RecordedReader(DATA / name))


def plan_on(name: str, target: ModelCandidate, draft: ModelCandidate | None, request: Request | None = None) -> Plan:
    hw = box(name)
    return plan(hw, choose_profile(hw, PROFILES), [target], request, draft)


@pytest.fixture(scope="module")
def files(tiny_gguf_f32: Path, tiny_gguf_quants: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    """The target and the drafts: Tekken-vocabulary shaped files (sparse), the tiny Q8_0, and a
    small shaped model with another vocabulary of the same size."""
    d = tmp_path_factory.mktemp("draft-plan")
    mag = Architecture()

    def shaped(name: str, arch: Architecture, quant: str, tekken: bool = True) -> Path:
        return write_shaped_gguf(d / name, arch, tensor_specs(arch, quant), quant,
                                 vocab_from=tiny_gguf_f32 if tekken else None)

    return {
        "target": shaped("magistral-Q4_K_M.gguf", mag, "Q4_K_M"),
        "draft": tiny_gguf_quants["Q8_0"],
        "huge": shaped("magistral-BF16.gguf", mag, "BF16"),
        "mid": shaped("mid-Q8_0.gguf", MID, "Q8_0"),
        "other_vocab": shaped("other-vocab-Q8_0.gguf", SMALL, "Q8_0", tekken=False),
    }


@pytest.fixture(scope="module")
def target(files: dict[str, Path]) -> ModelCandidate:
    return from_gguf_info(read_info(files["target"]))


def draft_of(files: dict[str, Path], name: str, target: ModelCandidate) -> ModelCandidate:
    return draft_candidate(str(files[name]), [target])


def together_fits(name: str, target: ModelCandidate, p: Plan, draft: ModelCandidate, target_ngl: int) -> bool:
    """Whether the target with ``target_ngl`` GPU layers and the plan's draft fit together."""
    hw = box(name)
    b = make_box(hw, choose_profile(hw, PROFILES), Request())
    assert p.draft is not None
    s = replace(p.settings, n_gpu_layers=target_ngl)
    mem = predict(target, s, b.gpus) + predict_draft(draft, replace(s, n_gpu_layers=p.draft.n_gpu_layers), b)
    return all(u.fits for u in pool_use(mem, b.gpus, b.pools))


# ------------------------------------------------------------------------- memory per device


def test_the_plan_counts_the_drafts_memory_per_device(files: dict[str, Path], target: ModelCandidate) -> None:
    draft = draft_of(files, "draft", target)
    alone, p = plan_on("rtx4090-desktop", target, None), plan_on("rtx4090-desktop", target, draft)
    assert alone.draft is None and alone.speculate == "ngram"
    assert p.speculate == "draft" and p.draft is not None and p.draft.model_path == str(files["draft"])
    # a small draft fits next to the fully offloaded model: nothing is taken from it
    assert (p.n_gpu_layers, p.n_ctx, p.type_k, p.n_slots) == (alone.n_gpu_layers, alone.n_ctx, alone.type_k, 1)
    assert p.draft.n_gpu_layers == draft.n_layers + 1 == 3
    cpu, gpu = (next(d for d in p.draft.memory if d.device == n) for n in ("CPU", "CUDA0"))
    assert gpu.layers == 2 and gpu.weights == sum(draft.bytes_per_layer) + draft.output_bytes
    assert cpu.layers == 0 and cpu.weights == draft.token_embd_bytes  # embeddings stay on the host, as the target's
    streams, cells = kv_streams(p.settings)  # the target's context and KV type, its streams
    assert gpu.kv_cache == streams * cells * kv_bytes_per_cell(draft, p.type_k, p.type_v) > 0
    assert gpu.compute > 0 and cpu.overhead > 0  # its compute buffer and its host logits
    # the pools count both models: the target's need plus the draft's, device by device
    need_alone, need = ({u.pool: u.need for u in x.pools} for x in (alone, p))
    assert need["CUDA0"] == need_alone["CUDA0"] + gpu.total
    assert need["RAM"] == need_alone["RAM"] + cpu.total
    assert "all 3 layers on the GPU" in p.reasons["draft"] and "acceptance" in p.reasons["speculate"]
    assert "trained for 4096 tokens" in p.reasons["draft"]  # the tiny draft is shorter than the context
    again = json.loads(json.dumps(p.to_dict()))
    assert again["draft"]["memory"][1]["total"] == gpu.total and again["speculate"] == "draft"


def test_on_a_cpu_only_box_both_run_from_ram(files: dict[str, Path], target: ModelCandidate) -> None:
    draft = draft_of(files, "draft", target)
    p = plan_on("cpu-only-32gb", target, draft)
    assert p.draft is not None and p.draft.n_gpu_layers == 0 and [d.device for d in p.draft.memory] == ["CPU"]
    assert p.draft.memory[0].layers == 2 and "shares the memory bandwidth" in p.reasons["draft"]
    assert "does not recommend" in p.reasons["speculate"]  # the cpu-only profile's advice


# ------------------------------------------------------------------------------- placement


def test_the_target_gives_up_the_fewest_gpu_layers_for_the_draft(
    files: dict[str, Path], target: ModelCandidate
) -> None:
    name = "rtx4060-laptop-8gb"
    draft = draft_of(files, "draft", target)
    alone, p = plan_on(name, target, None), plan_on(name, target, draft)
    assert 0 < p.n_gpu_layers < alone.n_gpu_layers < N_ALL  # a partial offload that gave up layers
    assert p.draft is not None and p.draft.n_gpu_layers == 3  # the draft went to the GPU whole
    assert together_fits(name, target, p, draft, p.n_gpu_layers)
    assert not together_fits(name, target, p, draft, p.n_gpu_layers + 1)  # one more target layer would not fit
    assert f"lowered from {alone.n_gpu_layers}" in p.reasons["n_gpu_layers"]
    assert p.tokens_per_s < alone.tokens_per_s  # the target alone is predicted slower, and it says so
    cuda = next(d for d in p.memory if d.device == "CUDA0")
    assert cuda.layers == p.n_gpu_layers - 1  # the plan's memory is the target's, at its new layers


def test_fixed_gpu_layers_are_kept_and_the_draft_goes_partly_to_the_cpu(
    files: dict[str, Path], target: ModelCandidate
) -> None:
    draft = draft_of(files, "mid", target)
    p = plan_on("rtx4060-laptop-8gb", target, draft, Request(n_gpu_layers=15))
    assert p.n_gpu_layers == 15 and p.draft is not None
    assert 0 < p.draft.n_gpu_layers < MID.n_layers + 1
    assert "the rest on the CPU, which slows every guess" in p.reasons["draft"]
    cpu = next(d for d in p.draft.memory if d.device == "CPU")
    assert cpu.layers == MID.n_layers + 1 - p.draft.n_gpu_layers


def test_a_draft_that_does_not_fit_is_refused_with_its_cost(files: dict[str, Path], target: ModelCandidate) -> None:
    huge = draft_of(files, "huge", target)  # a 47 GB draft
    with pytest.raises(DoesNotFitError) as e:
        plan_on("rtx4060-laptop-8gb", target, huge)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit next to Q4_K_M" in msg
    assert "CPU" in msg and "CUDA0" in msg and " MiB " in msg and "RAM needs" in msg and "--speculate ngram" in msg


def test_a_draft_refused_at_fixed_layers_says_which_context_fits(
    files: dict[str, Path], target: ModelCandidate
) -> None:
    draft = draft_of(files, "draft", target)
    alone = plan_on("rtx4060-laptop-8gb", target, None)
    with pytest.raises(DoesNotFitError) as e:
        plan_on("rtx4060-laptop-8gb", target, draft, Request(n_gpu_layers=alone.n_gpu_layers))
    ctx = int(str(e.value).split("--ctx ")[1].split()[0])
    assert ctx < alone.n_ctx
    p = plan_on("rtx4060-laptop-8gb", target, draft, Request(n_gpu_layers=alone.n_gpu_layers, ctx=ctx))
    assert p.n_gpu_layers == alone.n_gpu_layers and p.draft is not None and p.draft.n_gpu_layers == 3


# ------------------------------------------------------------------------------- vocabulary


def test_the_same_vocabulary_passes(tiny_gguf_f32: Path, files: dict[str, Path]) -> None:
    check_draft_vocab(read_info(tiny_gguf_f32), read_info(files["draft"]))  # F32 and Q8_0 of one model
    check_draft_vocab(read_info(files["target"]), read_info(files["draft"]))


def test_another_vocabulary_of_the_same_size_is_refused(files: dict[str, Path], target: ModelCandidate) -> None:
    with pytest.raises(BadInputError, match=r"token \d+ is .* pieces differ\); a draft must share"):
        draft_of(files, "other_vocab", target)


def test_another_token_count_is_refused(smollm2_gguf: Path, target: ModelCandidate) -> None:
    with pytest.raises(BadInputError, match="has 49152 tokens, the model 131072"):
        draft_candidate(str(smollm2_gguf), [target])
    # a catalog target (no file yet) is checked by its token count
    from edge_magistral.catalog import catalog

    with pytest.raises(BadInputError, match="has 49152 tokens"):
        draft_candidate(str(smollm2_gguf), catalog(["Q4_K_M"]))


def test_other_special_ids_are_refused(files: dict[str, Path]) -> None:
    t, d = read_info(files["target"]), read_info(files["draft"])
    check_special_ids(t, d)
    with pytest.raises(BadInputError, match="its EOS id is 7, the model's 2"):
        check_special_ids(t, replace(d, special_tokens={**d.special_tokens, "eos": 7}))
    with pytest.raises(BadInputError, match="its end_think token is id 99"):
        check_special_ids(t, replace(d, special_tokens={**d.special_tokens, "end_think": 99}))


# ------------------------------------------------------------------------ the library and CLI


def test_plan_for_model_with_a_draft(files: dict[str, Path]) -> None:
    p, _ = plan_for_model(str(files["target"]), Request(), box("rtx4090-desktop"), draft_path=str(files["draft"]))
    assert p.draft is not None and p.draft.n_gpu_layers == 3 and p.speculate == "draft"
    with pytest.raises(BadInputError, match="pieces differ"):
        plan_for_model(str(files["target"]), Request(), box("rtx4090-desktop"), draft_path=str(files["other_vocab"]))


def test_cli_plan_draft(files: dict[str, Path], tmp_path: Path) -> None:
    from edge_magistral.cli import (
        cli,
        plan_cmds,  # noqa: F401
    )

    hw_file = tmp_path / "laptop.json"
    hw_file.write_text(box("rtx4060-laptop-8gb").to_json())
    base = ["plan", "--hardware", str(hw_file), "--model", str(files["target"])]
    r = CliRunner().invoke(cli, [*base, "--draft", str(files["draft"])])
    assert r.exit_code == 0, r.output
    out = r.output.split("draft model's memory")[1]
    assert "CPU" in out.splitlines()[1] and "CUDA0" in out.splitlines()[2] and "MiB" in out.splitlines()[2]
    assert "speculate    draft" in r.output and "lowered from" in r.output
    r = CliRunner().invoke(cli, [*base, "--json", "--draft", str(files["draft"])])
    d = json.loads(r.output)
    assert d["draft"]["n_gpu_layers"] == 3 and d["speculate"] == "draft"
    r = CliRunner().invoke(cli, [*base, "--draft", str(files["huge"])])
    assert r.exit_code == 5 and "does not fit next to" in r.output
    r = CliRunner().invoke(cli, [*base, "--draft", str(files["other_vocab"])])
    assert r.exit_code == 2 and "a draft must share" in r.output


# ------------------------------------------------------------------------------- profiles


def test_profiles_say_where_a_draft_pays(files: dict[str, Path], target: ModelCandidate) -> None:
    assert all(p.speculate in ("ngram", "draft", "off") and p.draft_reason for p in PROFILES.values())
    assert {n for n, p in PROFILES.items() if p.draft_recommended} == {
        "rtx-24gb", "datacenter-80gb", "jetson-agx-orin-64gb"}
    p = plan_on("rtx4090-desktop", target, None)
    assert p.speculate == "ngram" and "recommends a draft model here" in p.reasons["speculate"]
    assert "--draft" in p.reasons["speculate"]
    p = plan_on("rtx4060-laptop-8gb", target, None)
    assert "does not recommend" in p.reasons["speculate"] and PROFILES["nvidia-8gb"].draft_reason in p.reasons[
        "speculate"]


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"speculate": "medusa"}, "speculate"),
        ({"speculate": "draft"}, "speculate"),  # a draft by default needs draft_recommended
        ({"draft_recommended": "yes"}, "draft_recommended"),
        ({"draft_reason": "one\ntwo"}, "draft_reason"),
        ({"draft_reason": 3}, "draft_reason"),
        ({"draft_model": "x.gguf"}, "draft_model"),  # unknown fields stay errors
    ],
)
def test_profile_speculation_fields_are_checked(fields: dict[str, object], field: str) -> None:
    with pytest.raises(BadInputError, match=f"p.yaml: field '{field}'"):
        parse_profile({"name": "p", **fields}, "p.yaml")
    ok = parse_profile({"name": "p", "speculate": "draft", "draft_recommended": True, "draft_reason": "room"}, "p.yaml")
    assert (ok.speculate, ok.draft_recommended, ok.draft_reason) == ("draft", True, "room")


def test_a_profile_defaulting_to_draft_plans_ngram_without_one(target: ModelCandidate) -> None:
    hw = box("rtx4090-desktop")
    prof = replace(choose_profile(hw, PROFILES), speculate="draft")
    assert plan(hw, prof, [target]).speculate == "ngram"
    off = replace(prof, speculate="off", draft_recommended=False)
    assert plan(hw, off, [target]).speculate == "off"


def test_devices_of_the_draft_match_the_target(files: dict[str, Path], target: ModelCandidate) -> None:
    p = plan_on("jetson-agx-orin-64gb", target, draft_of(files, "draft", target))
    gpus, _ = devices_of(box("jetson-agx-orin-64gb"))
    assert p.draft is not None and [d.device for d in p.draft.memory] == ["CPU"] + [g.name for g in gpus]
    use = {u.pool: u.need for u in p.pools}  # unified memory: RAM holds both models, GPU layers too
    assert use["RAM"] == sum(d.total for d in p.memory) + sum(d.total for d in p.draft.memory)
