"""The planner on recorded boxes (one per profile class), its overrides and refusals, the memory
model's llama.cpp rules, and the catalog's quant type mix against llama.cpp's own quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_magistral.catalog import (
    QUALITY_ORDER,
    Architecture,
    ModelCandidate,
    catalog,
    from_gguf_info,
    tensor_specs,
)
from edge_magistral.errors import BadInputError, DoesNotFitError
from edge_magistral.gguf_info import read_info
from edge_magistral.hardware import Hardware, RecordedReader, detect
from edge_magistral.planner import (
    NoFitError,
    Plan,
    Request,
    Settings,
    devices_of,
    kv_bytes_per_cell,
    kv_streams,
    layer_devices,
    plan,
    pool_use,
    predict,
)
from edge_magistral.profiles import BUILTIN_DIR, choose_profile, load_profiles
from edge_magistral.shaped_gguf import write_shaped_gguf
from edge_magistral.units import GiB, MiB

DATA = Path(__file__).parent / "data" / "hardware"
PROFILES = load_profiles([BUILTIN_DIR])
N_ALL = 41  # 40 layers + the output layer


def box(name: str) -> Hardware:
    return detect(RecordedReader(DATA / name))


def plan_for(
    name: str, request: Request | None = None, candidates: list[ModelCandidate] | None = None
) -> Plan:
    hw = box(name)
    return plan(hw, choose_profile(hw, PROFILES), catalog() if candidates is None else candidates, request)


def rank(quant: str) -> int:
    return QUALITY_ORDER.index(quant)


def assert_accepted(p: Plan, name: str) -> None:
    """The memory model, run again on the plan's settings, puts every pool within its budget."""
    gpus, pools = devices_of(box(name))
    m = next(c for c in catalog() if c.quant == p.quant)
    mem = predict(m, p.settings, gpus)
    assert [d.total for d in mem] == [d.total for d in p.memory]
    use = pool_use(mem, gpus, pools)
    budgets = {u.pool: u.budget for u in p.pools}  # the profile's reserves already taken off
    assert all(u.need <= budgets[u.pool] for u in use), p.pools
    assert p.tokens_per_s > 0


# ----------------------------------------------------------------------------- profile classes


def test_24gb_card_full_offload_of_at_least_q5_at_32k() -> None:
    p = plan_for("rtx4090-desktop")
    assert p.profile == "rtx-24gb"
    assert p.n_gpu_layers == N_ALL and rank(p.quant) <= rank("Q5_K_M") and p.n_ctx >= 32768
    assert_accepted(p, "rtx4090-desktop")
    cuda = next(d for d in p.memory if d.device == "CUDA0")
    assert cuda.layers == 40 and cuda.kv_cache > 0
    host = next(d for d in p.memory if d.device == "CPU")
    assert (
        host.layers == 0 and host.weights == catalog([p.quant])[0].token_embd_bytes
    )  # embeddings stay on the host


def test_8gb_card_partial_offload_the_memory_model_accepts() -> None:
    p = plan_for("rtx4060-laptop-8gb")
    assert p.profile == "nvidia-8gb"
    assert 0 < p.n_gpu_layers < N_ALL
    assert_accepted(p, "rtx4060-laptop-8gb")
    cuda, host = (next(d for d in p.memory if d.device == n) for n in ("CUDA0", "CPU"))
    assert (
        cuda.layers == p.n_gpu_layers - 1 and host.layers == 40 - cuda.layers
    )  # the output layer counts in ngl
    assert "partial offload" in p.reasons["quant"]
    # one more layer would not fit: the planner took the most it could
    hw = box("rtx4060-laptop-8gb")
    gpus, pools = devices_of(hw)
    m = next(c for c in catalog() if c.quant == p.quant)
    more = predict(m, Settings(p.n_ctx, p.n_gpu_layers + 1, p.type_k, p.type_v), gpus)
    assert (
        next(d for d in more if d.device == "CUDA0").total
        > next(u for u in p.pools if u.pool == "CUDA0").budget
    )


def test_64gb_jetson_counts_unified_memory_once() -> None:
    p = plan_for("jetson-agx-orin-64gb")
    assert p.profile == "jetson-agx-orin-64gb" and p.n_gpu_layers == N_ALL
    assert_accepted(p, "jetson-agx-orin-64gb")
    use = {u.pool: u for u in p.pools}
    assert set(use) == {"RAM", "CUDA0 (unified)"}
    assert use["RAM"].need == sum(d.total for d in p.memory)  # GPU and host draw from one pool
    # a load that fits only if RAM and "GPU memory" were counted twice is refused
    hw = box("jetson-agx-orin-64gb")
    q8 = catalog(["BF16"])
    need = sum(d.total for d in predict(q8[0], Settings(131072, N_ALL), devices_of(hw)[0]))
    assert hw.usable_ram_bytes < need < 2 * hw.usable_ram_bytes
    with pytest.raises(DoesNotFitError):
        plan(hw, PROFILES["jetson-agx-orin-64gb"], q8, Request(ctx=131072, kv_type="f16"))


def test_32gb_cpu_only_box_gets_at_least_q4_k_m() -> None:
    p = plan_for("cpu-only-32gb")
    assert p.profile == "cpu-only" and p.n_gpu_layers == 0
    assert rank(p.quant) <= rank("Q4_K_M") and p.n_ctx >= PROFILES["cpu-only"].min_ctx
    assert_accepted(p, "cpu-only-32gb")
    assert [d.device for d in p.memory] == ["CPU"]


def test_16gb_boxes_get_an_honest_answer() -> None:
    gpu16 = plan_for("rtx4060ti-16gb")  # a 16 GB card: a smaller catalog quant, all on the card
    assert gpu16.quant in ("IQ4_XS", "Q3_K_M") and gpu16.n_gpu_layers == N_ALL
    assert_accepted(gpu16, "rtx4060ti-16gb")
    # Q4_K_M did not fit entirely and the reason says so
    assert "Q4_K_M needs" in gpu16.reasons["quant"]
    try:  # a 16 GB Orin NX: the smallest quant if it fits in the shared pool, else a refusal with the numbers
        nx = plan_for("jetson-orin-nx-16gb")
    except NoFitError as e:
        assert e.missing_bytes > 0 and f"{e.missing_bytes / GiB:.2f} GiB is missing" in str(e)
        assert all(not a.fits for a in e.alternatives)
    else:
        assert nx.quant in ("IQ4_XS", "Q3_K_M")
        assert_accepted(nx, "jetson-orin-nx-16gb")


def test_4gb_box_is_refused_with_the_missing_amount() -> None:
    with pytest.raises(NoFitError) as e:
        plan_for("rtx3050-laptop-4gb")
    msg = str(e.value)
    assert "does not fit this box" in msg and "Q3_K_M" in msg
    assert e.value.missing_bytes > 1 * GiB and f"{e.value.missing_bytes / GiB:.2f} GiB is missing" in msg
    assert len(e.value.alternatives) == len(catalog()) and not any(a.fits for a in e.value.alternatives)


def test_datacenter_gpu_plans_near_lossless_at_40k() -> None:
    p = plan_for("h200-nvml")
    assert (p.profile, p.quant, p.n_gpu_layers, p.n_ctx) == ("datacenter-80gb", "Q8_0", N_ALL, 40960)


def test_mac_plan_respects_both_the_wired_limit_and_ram() -> None:
    p = plan_for("macbook-m2-max-32gb")
    assert p.profile == "apple-silicon" and p.n_gpu_layers == N_ALL
    assert_accepted(p, "macbook-m2-max-32gb")
    assert {u.pool for u in p.pools} == {"RAM", "MTL0 (unified)"}


def test_amd_card_full_offload() -> None:
    p = plan_for("amd-7900xtx-sysfs")
    assert p.profile == "amd-rocm-16-24gb" and p.n_gpu_layers == N_ALL and rank(p.quant) <= rank("Q5_K_M")
    assert next(d for d in p.memory if d.device == "ROCm0").layers == 40


def test_gpu_without_backend_is_planned_on_the_cpu() -> None:
    p = plan_for("rtx3090-cpu-build")
    assert p.n_gpu_layers == 0 and [d.device for d in p.memory] == ["CPU"]
    assert "no GPU that the installed llama.cpp can use" in p.reasons["n_gpu_layers"]


def test_container_limit_binds_the_plan() -> None:
    with pytest.raises(NoFitError, match="RAM 9.51 GiB after a 2.00 GiB reserve"):
        plan_for("cpu-only-32gb-container-12g")


# ---------------------------------------------------------------------- overrides, bad input


def test_context_override_that_cannot_fit_is_refused_with_the_reason() -> None:
    with pytest.raises(
        DoesNotFitError, match=r"--ctx 65536 cannot fit on this box: even Q3_K_M at 65536 .*RAM needs"
    ):
        plan_for("cpu-only-32gb-container-12g", Request(ctx=65536))
    with pytest.raises(BadInputError, match="beyond the model's trained context of 131072"):
        plan_for("cpu-only-32gb", Request(ctx=1048576))


def test_gpu_layers_override() -> None:
    p = plan_for("rtx4090-desktop", Request(n_gpu_layers=20))
    assert p.n_gpu_layers == 20 and p.reasons["n_gpu_layers"] == "20: as requested"
    with pytest.raises(DoesNotFitError, match="--n-gpu-layers 41"):
        plan_for("rtx4060-laptop-8gb", Request(n_gpu_layers=41))


def test_context_override_is_kept_exactly() -> None:
    p = plan_for("rtx4090-desktop", Request(ctx=12345))
    assert p.n_ctx == 12345 and "requested" in p.reasons["n_ctx"]


def test_no_candidates_and_unknown_quant() -> None:
    with pytest.raises(BadInputError, match="no model candidates"):
        plan_for("cpu-only-32gb", candidates=[])
    with pytest.raises(BadInputError, match="no candidate model is quant 'Q9_K'"):
        plan_for("cpu-only-32gb", Request(quant="Q9_K"))
    with pytest.raises(BadInputError, match="needs flash attention"):
        plan_for("cpu-only-32gb", Request(kv_type="q8_0", flash_attn=False))


def test_plan_is_json_serializable() -> None:
    d = plan_for("rtx4060-laptop-8gb").to_dict()
    again = json.loads(json.dumps(d))
    assert again["n_gpu_layers"] == d["n_gpu_layers"] and again["memory"][0]["total"] > 0
    assert again["reasons"]["quant"] and len(again["alternatives"]) == len(catalog())


def test_local_gguf_candidates(tmp_path: Path) -> None:
    arch = Architecture()
    path = write_shaped_gguf(tmp_path / "m.gguf", arch, tensor_specs(arch, "Q4_K_M"), "Q4_K_M")
    local = from_gguf_info(read_info(path))
    assert local.bytes_per_layer == catalog(["Q4_K_M"])[0].bytes_per_layer
    p = plan_for("rtx4090-desktop", candidates=[local])
    assert p.model_path == str(path) and p.source == "local" and p.n_gpu_layers == N_ALL


# ------------------------------------------------------------------- the memory model's rules


def test_kv_cache_per_token_matches_the_measured_sizes() -> None:
    m = catalog(["Q4_K_M"])[0]
    assert kv_bytes_per_cell(m, "f16", "f16") == 160 * 1024
    assert kv_bytes_per_cell(m, "q8_0", "q8_0") == 85 * 1024
    assert kv_bytes_per_cell(m, "q4_0", "q4_0") == 45 * 1024


def test_layer_devices_follow_llama_cpp() -> None:
    assert layer_devices(40, 41, [1]) == [0] * 41
    assert layer_devices(40, 1, [1]) == [None] * 40 + [0]  # only the output layer
    assert layer_devices(40, 0, [1]) == [None] * 41
    assert layer_devices(40, 99, []) == [None] * 41  # no GPU
    split = layer_devices(40, 41, [1, 1])  # two equal GPUs
    assert split[:20] == [0] * 20 and split[21:] == [1] * 20
    assert layer_devices(4, 5, [1, 1]) == [0, 0, 0, 1, 1]
    assert layer_devices(4, 5, [3, 1]) == [0, 0, 0, 0, 1]  # split by free memory, as upper_bound does


def test_partial_offload_moves_weights_and_kv_with_layers() -> None:
    hw = box("rtx4060-laptop-8gb")
    gpus, pools = devices_of(hw)
    m = catalog(["Q4_K_M"])[0]
    mem = {d.device: d for d in predict(m, Settings(8192, 11, "f16", "f16"), gpus)}
    assert mem["CUDA0"].layers == 10 and mem["CPU"].layers == 30
    assert mem["CUDA0"].weights == sum(m.bytes_per_layer[30:]) + m.output_bytes
    assert mem["CPU"].weights == sum(m.bytes_per_layer[:30]) + m.token_embd_bytes
    assert mem["CUDA0"].kv_cache * 3 == mem["CPU"].kv_cache
    use = {u.pool: u.need for u in pool_use(list(mem.values()), gpus, pools)}
    assert use == {"RAM": mem["CPU"].total, "CUDA0": mem["CUDA0"].total}


def test_flash_attention_off_costs_compute_memory() -> None:
    m = catalog(["Q4_K_M"])[0]
    on = predict(m, Settings(32768, 0, flash_attn=True), [])[0].compute
    off = predict(m, Settings(32768, 0, flash_attn=False), [])[0].compute
    assert on < 400 * MiB and off > 2000 * MiB  # llama.cpp logged 266 vs 2152 MiB on an H200 at 32k


def test_catalog_sizes_match_the_reference_measurements() -> None:
    sizes = {c.quant: c.file_size for c in catalog()}
    assert sizes["Q4_K_M"] / GiB == pytest.approx(13.34, abs=0.02)  # the published file: 13.34 GiB
    assert sizes["Q8_0"] / GiB == pytest.approx(23.33, abs=0.02)  # 23.33 GiB
    assert sizes["BF16"] / 1e9 == pytest.approx(47.2, abs=0.1)  # 23.6 B parameters at 2 bytes
    assert sizes["Q5_K_M"] / 1e9 == pytest.approx(16.8, abs=0.1)
    assert sizes["Q3_K_M"] < sizes["IQ4_XS"] < sizes["Q4_K_M"]
    q4 = catalog(["Q4_K_M"])[0]
    assert q4.token_embd_bytes == 360 * MiB  # llama.cpp keeps 360 MiB of token embeddings on the host


# --------------------------------------------------- the catalog's type mix vs llama.cpp's quantizer

SMALL = Architecture(
    n_layers=16, n_embd=256, n_head=4, n_head_kv=1, head_dim=64, n_ff=512, n_vocab=512, context_length=4096
)


@pytest.fixture(scope="module")
def small_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("small")
    return write_shaped_gguf(d / "small-F16.gguf", SMALL, tensor_specs(SMALL, "F16"), "F16", fill="random")


@pytest.mark.parametrize("quant", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M"])
def test_catalog_type_mix_is_llama_cpps(small_f16: Path, tmp_path: Path, quant: str) -> None:
    from edge_magistral.build.quantize import quantize

    out = quantize(small_f16, tmp_path / f"small-{quant}.gguf", quant, nthread=2)
    info = read_info(out)
    real = {t.name: t.type_name for t in info.tensors}
    ours = {s.name: s.type_name for s in tensor_specs(SMALL, quant)}
    assert real == ours
    assert from_gguf_info(info).bytes_per_layer == [
        sum(s.n_bytes for s in tensor_specs(SMALL, quant) if s.name.startswith(f"blk.{i}."))
        for i in range(16)
    ]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_plan_for_another_box(tmp_path: Path) -> None:
    from edge_magistral.cli import (
        cli,
        plan_cmds,  # noqa: F401
    )

    hw_file = tmp_path / "orin.json"
    hw_file.write_text(box("jetson-agx-orin-64gb").to_json())
    r = CliRunner().invoke(cli, ["plan", "--hardware", str(hw_file)])
    assert r.exit_code == 0, r.output
    assert "jetson-agx-orin-64gb" in r.output and "alternatives:" in r.output and "why:" in r.output
    r = CliRunner().invoke(cli, ["plan", "--json", "--hardware", str(hw_file), "--ctx", "8192"])
    d = json.loads(r.output)
    assert r.exit_code == 0 and d["fits"] and d["n_ctx"] == 8192


def test_cli_plan_refusal_shows_alternatives_and_exits_5(tmp_path: Path) -> None:
    from edge_magistral.cli import (
        cli,
        plan_cmds,  # noqa: F401
    )

    hw_file = tmp_path / "small.json"
    hw_file.write_text(box("rtx3050-laptop-4gb").to_json())
    r = CliRunner().invoke(cli, ["plan", "--hardware", str(hw_file)])
    assert r.exit_code == 5
    assert "alternatives:" in r.output and "GiB is missing" in r.output


def test_cli_plan_with_a_broken_hardware_file(tmp_path: Path) -> None:
    from edge_magistral.cli import (
        cli,
        plan_cmds,  # noqa: F401
    )

    bad = tmp_path / "hw.json"
    bad.write_text('{"os": "linux", "machine": "x86_64", "cpu": {"model": "x"}}')
    r = CliRunner().invoke(cli, ["plan", "--hardware", str(bad)])
    assert r.exit_code == 2 and "error:" in r.output and "hw.json" in r.output


# ------------------------------------------------------------------------------ parallel slots


def test_kv_streams_are_padded_as_llama_cpp_pads_them() -> None:
    """llama_context: the total context padded to 256, split across the streams, each padded to 256."""
    assert kv_streams(Settings(4096, 0)) == (1, 4096)
    assert kv_streams(Settings(1000, 0)) == (1, 1024)
    assert kv_streams(Settings(4096, 0, n_slots=2)) == (3, 4096)
    assert kv_streams(Settings(1000, 0, n_slots=2)) == (3, 1024)  # 3000 -> 3072 -> 1024
    assert kv_streams(Settings(300, 0, n_slots=2)) == (3, 512)  # 900 -> 1024 -> 341 -> 512


def test_n_slots_costs_n_plus_one_kv_streams_and_a_logits_row_each() -> None:
    m = next(c for c in catalog() if c.quant == "Q4_K_M")
    one = predict(m, Settings(8192, 0), [])[0]
    four = predict(m, Settings(8192, 0, n_slots=4), [])[0]
    assert four.kv_cache == 5 * one.kv_cache and four.weights == one.weights
    rows = 4 * m.n_vocab * 4  # one logits row per extra stream; the rest: the ubatch rounded 512 -> 515
    assert one.compute + rows < four.compute < one.compute + rows + 5 * MiB
    assert four.overhead < one.overhead  # with slots, the Llama object keeps 256 rows of scores, not 512


def test_one_slot_plans_exactly_as_before_slots_existed() -> None:
    """n_slots=1 is one KV stream: same settings, same memory, whatever the profile says."""
    for name in ("rtx4090-desktop", "h200-nvml", "cpu-only-32gb", "rtx4060-laptop-8gb", "macbook-m2-max-32gb"):
        p = plan_for(name, Request(parallel=1))
        d = p.to_dict()
        assert p.n_slots == 1 and p.reasons["parallel"] == "1: one request at a time (requested)"
        m = next(c for c in catalog() if c.quant == p.quant)
        s = Settings(p.n_ctx, p.n_gpu_layers, p.type_k, p.type_v, p.flash_attn, p.n_batch, p.n_ubatch)
        assert [x.total for x in predict(m, s, devices_of(box(name))[0])] == [x["total"] for x in d["memory"]]


def test_profile_slots_fit_on_top_of_the_single_request_plan() -> None:
    """The datacenter profile's 4 slots fit beside Q8_0 at 40k; quant and context are unchanged."""
    single, p = plan_for("h200-nvml", Request(parallel=1)), plan_for("h200-nvml")
    assert p.n_slots == 4 and (p.quant, p.n_ctx) == (single.quant, single.n_ctx) == ("Q8_0", 40960)
    gpu = next(d for d in p.memory if d.device != "CPU")
    assert gpu.kv_cache == 5 * next(d for d in single.memory if d.device != "CPU").kv_cache
    assert_accepted(p, "h200-nvml")
    assert p.to_dict()["n_slots"] == 4 and "5 KV streams of 40960 cells" in p.reasons["parallel"]


def test_profile_slots_are_given_up_before_context() -> None:
    """rtx-24gb asks for 2 slots; at its 32k target only 1 fits, so it serves one at a time at 32k."""
    p = plan_for("rtx4090-desktop")
    assert p.n_slots == 1 and p.n_ctx == 32768
    assert "the profile's 2 slots do not fit at context 32768" in p.reasons["parallel"]
    small = plan_for("rtx4090-desktop", Request(ctx=8192))
    assert small.n_slots == 2 and small.n_ctx == 8192  # where they fit, the profile's slots are used


def test_explicit_slots_trade_context_down_to_the_minimum_or_are_refused() -> None:
    p = plan_for("amd-7900xtx-sysfs", Request(parallel=4))
    assert p.n_slots == 4 and 8192 <= p.n_ctx < 32768
    assert "context reduced from 32768" in p.reasons["parallel"]
    assert_accepted(p, "amd-7900xtx-sysfs")
    with pytest.raises(DoesNotFitError, match=r"^--parallel 8 cannot fit: 8 slots of Q5_K_M at context 8192 "
                       r"\(ROCm0 needs .* GiB of .* GiB\); use at most --parallel 4, or a smaller --ctx$"):
        plan_for("amd-7900xtx-sysfs", Request(parallel=8))
    with pytest.raises(BadInputError, match="--parallel 0 is out of range"):
        plan_for("cpu-only-32gb", Request(parallel=0))


def test_cli_plan_parallel(tmp_path: Path) -> None:
    from edge_magistral.cli import (
        cli,
        plan_cmds,  # noqa: F401
    )

    hw_file = tmp_path / "h200.json"
    hw_file.write_text(box("h200-nvml").to_json())
    r = CliRunner().invoke(cli, ["plan", "--json", "--hardware", str(hw_file), "--parallel", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_slots"] == 2
    r = CliRunner().invoke(cli, ["plan", "--hardware", str(hw_file), "--parallel", "3"])
    assert "slots        3 (requests decoded at once)" in r.output and "40960 per slot" in r.output
    r = CliRunner().invoke(cli, ["plan", "--hardware", str(hw_file), "--parallel", "64", "--ctx", "131072"])
    assert r.exit_code == 5 and r.output.count("\n") == 1 and "use at most --parallel 4" in r.output
