"""The planner across boxes (a head and its llama.cpp RPC workers) on recorded boxes: what fits
together that fits no box alone, llama.cpp's device order and split, the links' cost, the first
load, and the refusal."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_magistral.catalog import ModelCandidate, catalog
from edge_magistral.errors import DoesNotFitError
from edge_magistral.generation import LoadSettings
from edge_magistral.hardware import Hardware, RecordedReader, detect
from edge_magistral.planner import NoFitError, Plan, Request, kv_bytes_per_cell, kv_streams, layer_devices, plan
from edge_magistral.planner.cluster import Link, WorkerBox, llama_split, plan_cluster
from edge_magistral.planner.link import HASH_THRESHOLD
from edge_magistral.profiles import BUILTIN_DIR, choose_profile, load_profiles

DATA = Path(__file__).parent / "data" / "hardware"
PROFILES = load_profiles([BUILTIN_DIR])
Q4 = Request(quant="Q4_K_M")
N_LAYERS = 40


def box(name: str) -> Hardware:
    return detect(RecordedReader(DATA / name))


def q4() -> list[ModelCandidate]:
    return catalog(["Q4_K_M"])


def alone(name: str, request: Request = Q4) -> Plan:
    hw = box(name)
    return plan(hw, choose_profile(hw, PROFILES), q4(), request)


def across(head: str, workers: list[str], request: Request = Q4, link: Link | None = None,
           candidates: list[ModelCandidate] | None = None) -> Plan:
    hw = box(head)
    ws = [WorkerBox(f"10.0.0.{i + 2}:50052", box(n), link or Link()) for i, n in enumerate(workers)]
    return plan_cluster(hw, ws, candidates or q4(), request, choose_profile(hw, PROFILES), PROFILES)


def assert_consistent(p: Plan) -> None:
    """llama.cpp's split of the plan's tensor_split and n_gpu_layers puts exactly the planned
    layers on each device; every pool of every box is within its budget."""
    c = p.cluster
    assert c is not None
    where = layer_devices(N_LAYERS, p.n_gpu_layers, [round(x) for x in p.tensor_split])
    per_device = [sum(1 for d in where[:-1] if d == i) for i in range(len(c.device_order))]
    planned = {dm.device: dm.layers for dm in p.memory}
    assert per_device == [planned[n] for n in c.device_order]
    assert sum(1 for d in where[:-1] if d is None) == c.head_cpu_layers == planned["CPU"]
    # llama.cpp's output layer is on the last device; a head without a GPU keeps its weights home
    home = c.output_device == "CPU" and p.n_gpu_layers > 0
    assert (c.device_order[where[-1]] if where[-1] is not None and not home else "CPU") == c.output_device
    assert all(u.fits for u in p.pools), p.pools
    assert sum(dm.layers for dm in p.memory) == N_LAYERS


def test_two_jetson_orin_nx_hold_q4_k_m_that_one_cannot() -> None:
    with pytest.raises(DoesNotFitError):
        alone("jetson-orin-nx-16gb")  # not even at the profile's minimum context
    p = across("jetson-orin-nx-16gb", ["jetson-orin-nx-16gb"])
    assert_consistent(p)
    c = p.cluster
    assert c is not None and p.quant == "Q4_K_M"
    assert p.n_ctx >= choose_profile(box("jetson-orin-nx-16gb"), PROFILES).min_ctx
    worker, head_gpu = (next(d for d in p.memory if d.device == n) for n in c.device_order)
    assert worker.layers > 0 and head_gpu.layers > 0 and worker.kv_cache > 0 and head_gpu.kv_cache > 0
    assert c.output_device == "CUDA0" and p.n_gpu_layers == N_LAYERS + 1 and c.head_cpu_layers == 0
    # unified memory: each Jetson's GPU and RAM are one pool, counted once, with that box's reserve
    pools = {u.pool: u for u in p.pools}
    assert pools["RAM@10.0.0.2:50052"].need >= pools["CUDA0 (unified)@10.0.0.2:50052"].need
    assert pools["RAM"].need == sum(d.total for d in p.memory if "@" not in d.device)


def test_two_12gb_pcs_hold_q4_k_m_on_their_gpus() -> None:
    one = alone("rtx3060-12gb")
    assert one.n_gpu_layers < N_LAYERS + 1  # alone, a partial offload
    p = across("rtx3060-12gb", ["rtx3060-12gb"])
    assert_consistent(p)
    c = p.cluster
    assert c is not None
    assert c.head_cpu_layers == 0 and p.n_gpu_layers == N_LAYERS + 1 and p.n_ctx >= one.n_ctx
    assert c.workers[0].layers > 0 and c.workers[0].devices == ["CUDA0@10.0.0.2:50052"]
    assert c.tokens_per_s > one.tokens_per_s  # every layer on a GPU beats a partial offload


def test_a_cpu_only_head_with_two_cpu_workers() -> None:
    with pytest.raises(DoesNotFitError):
        alone("cpu-only-32gb-container-12g")
    p = across("cpu-only-32gb-container-12g", ["cpu-only-32gb-container-12g"] * 2)
    assert_consistent(p)
    c = p.cluster
    assert c is not None
    assert c.device_order == ["CPU@10.0.0.2:50052", "CPU@10.0.0.3:50052"]
    assert c.head_cpu_layers > 0 and c.workers[0].layers > 0
    # llama.cpp counts the output layer on the last device; its weights (and the logits) stay on
    # the head by a tensor override, so no logits row crosses a link
    assert c.output_device == "CPU" and p.n_gpu_layers == N_LAYERS + 1 - c.head_cpu_layers
    head_cpu = next(d for d in p.memory if d.device == "CPU")
    last = next(d for d in p.memory if d.device == "CPU@10.0.0.3:50052")
    m = q4()[0]
    assert head_cpu.weights >= m.output_bytes + m.token_embd_bytes
    assert last.weights <= last.layers * max(m.bytes_per_layer) < m.output_bytes + last.weights
    remote = next(d for d in p.memory if d.device == "CPU@10.0.0.2:50052")
    assert remote.compute > 0  # a remote CPU gets a compute buffer as a GPU does


def test_tensor_split_lists_the_workers_first_in_their_order() -> None:
    p = across("rtx3060-12gb", ["jetson-orin-nx-16gb", "rtx3060-12gb"], Request(quant="Q4_K_M", ctx=32768))
    c = p.cluster
    assert c is not None
    assert c.device_order == ["CUDA0@10.0.0.2:50052", "CUDA0@10.0.0.3:50052", "CUDA0"]
    assert [w.endpoint for w in c.workers] == ["10.0.0.2:50052", "10.0.0.3:50052"]
    assert len(p.tensor_split) == 3 and p.tensor_split[0] == c.workers[0].layers
    assert llama_split(p) == (p.tensor_split, p.n_gpu_layers)
    s = LoadSettings.from_plan(p)
    assert list(s.tensor_split) == p.tensor_split and s.n_gpu_layers == p.n_gpu_layers
    assert_consistent(p)


def test_refused_when_it_fits_nowhere_says_what_each_box_takes() -> None:
    with pytest.raises(NoFitError) as e:
        across("jetson-orin-nx-16gb", ["jetson-orin-nx-16gb"], Request(), candidates=catalog(["BF16"]))
    msg = str(e.value)
    assert "\n" not in msg and "head takes" in msg and "10.0.0.2:50052 takes" in msg and "GiB usable" in msg
    assert e.value.missing_bytes > 0


def test_tokens_per_s_falls_as_latency_grows() -> None:
    def tps(link: Link) -> tuple[float, float]:
        c = across("rtx3060-12gb", ["rtx3060-12gb"], link=link).cluster
        assert c is not None
        return c.tokens_per_s, c.tokens_per_s_no_link

    speeds = [tps(Link(1e9 / 8, ms / 1e3))[0] for ms in (0.1, 1.0, 10.0)]
    assert speeds[0] > speeds[1] > speeds[2]
    free, no_link = tps(Link(math.inf, 0.0))
    assert free == no_link
    # one worker in the middle: one round trip per token (GET_TENSOR; SET_TENSOR and GRAPH_COMPUTE do not wait)
    slow, _ = tps(Link(math.inf, 0.01))
    assert 1 / slow - 1 / no_link == pytest.approx(0.02, abs=1e-3)


def test_ttft_counts_the_prompts_activations_over_the_link() -> None:
    slow = across("rtx3060-12gb", ["rtx3060-12gb"], link=Link(100e6 / 8, 0.0)).cluster
    free = across("rtx3060-12gb", ["rtx3060-12gb"], link=Link(math.inf, 0.0)).cluster
    assert slow is not None and free is not None and slow.prompt_tokens == 512
    both_ways = 2 * 512 * 5120 * 4  # 10 MiB into the worker and 10 MiB back
    assert slow.ttft_s - free.ttft_s >= both_ways / (100e6 / 8) - 1e-3


def test_first_load_is_the_weights_on_each_worker() -> None:
    p = across("cpu-only-32gb-container-12g", ["cpu-only-32gb-container-12g"] * 2)
    c = p.cluster
    assert c is not None
    m = q4()[0]
    where = layer_devices(N_LAYERS, p.n_gpu_layers, [round(x) for x in p.tensor_split])
    for i, w in enumerate(c.workers):
        expected = sum(m.bytes_per_layer[il] for il in range(N_LAYERS) if where[il] == i)
        expected += m.output_bytes if where[-1] == i and c.output_device != "CPU" else 0
        assert w.first_load_bytes == expected == w.memory.weights
        assert 0 < w.reload_bytes < w.first_load_bytes or w.first_load_bytes == 0
        kv_layer = math.prod(kv_streams(p.settings)) * kv_bytes_per_cell(m, p.type_k, p.type_v) // N_LAYERS
        assert w.memory.kv_cache == kv_layer * w.layers
    assert c.first_load_bytes == sum(w.first_load_bytes for w in c.workers)
    assert m.output_bytes > HASH_THRESHOLD  # sent as a hash on later loads


def test_cli_plans_across_hardware_files(tmp_path: Path) -> None:
    from edge_magistral.cli import (
        cli,
        plan_cmds,  # noqa: F401
    )

    files = []
    for i, name in enumerate(["jetson-orin-nx-16gb", "jetson-orin-nx-16gb"]):
        f = tmp_path / f"box{i}.json"
        f.write_text(box(name).to_json())
        files += ["--hardware", str(f)]
    r = CliRunner().invoke(cli, ["plan", *files, "--quant", "Q4_K_M", "--link-mbit", "100", "--link-ms", "2",
                                 "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    w = d["cluster"]["workers"][0]
    assert w["endpoint"] == "box1" and w["link_mbit"] == 100 and w["link_ms"] == 2
    assert w["memory"]["total"] > w["memory"]["buffers"] > 0
    assert d["tensor_split"][0] == w["layers"]
    r = CliRunner().invoke(cli, ["plan", *files, "--quant", "Q4_K_M"])
    assert r.exit_code == 0 and "across boxes" in r.output and "first load" in r.output
    r = CliRunner().invoke(cli, ["plan", *files[:2], "--link-ms", "2"])
    assert r.exit_code != 0 and "second --hardware" in r.output


def test_a_single_box_plan_has_no_cluster() -> None:
    p = alone("rtx3060-12gb")
    assert p.cluster is None and p.to_dict()["cluster"] is None


def test_a_tied_output_layer_takes_a_copy_of_the_embeddings_to_its_device() -> None:
    m = q4()[0]
    tied = replace(m, output_bytes=m.n_embd * 4)  # the output norm only: the output reuses token_embd
    p = across("rtx3060-12gb", ["rtx3060-12gb"], Request(), candidates=[tied])
    c = p.cluster
    assert c is not None and c.output_device == "CUDA0"  # the head's GPU, last in llama.cpp's order
    gpu = next(d for d in p.memory if d.device == "CUDA0")
    layers = sum(m.bytes_per_layer[il] for il in range(N_LAYERS - gpu.layers, N_LAYERS))
    assert gpu.weights == layers + m.n_embd * 4 + m.token_embd_bytes


def test_pinned_worker_layers_are_placed_as_pinned() -> None:
    """The cluster file's ``layers`` wins over the fill (a CPU head would keep them all itself)."""
    hw = box("cpu-only-32gb")
    ws = [WorkerBox(f"10.0.0.{i + 2}:50052", box("cpu-only-32gb"), Link(), n) for i, n in enumerate((12, 9))]
    p = plan_cluster(hw, ws, q4(), Q4, choose_profile(hw, PROFILES), PROFILES)
    assert_consistent(p)
    assert [w.layers for w in p.cluster.workers] == [12, 9] and p.cluster.head_cpu_layers == N_LAYERS - 21
    too_many = [WorkerBox("10.0.0.2:50052", box("cpu-only-32gb"), Link(), N_LAYERS + 1)]
    with pytest.raises(DoesNotFitError):
        plan_cluster(hw, too_many, q4(), Q4, choose_profile(hw, PROFILES), PROFILES)


def test_across_boxes_q4_k_m_comes_first_where_the_heads_profile_leaves_it_out() -> None:
    """The Orin NX profile offers only IQ4_XS and Q3_K_M (what one box can hold); two of them hold
    Q4_K_M, the quant the issue's pair is for, at the profile's target context."""
    assert "Q4_K_M" not in choose_profile(box("jetson-orin-nx-16gb"), PROFILES).quants
    p = across("jetson-orin-nx-16gb", ["jetson-orin-nx-16gb"], Request(),
               candidates=catalog(["IQ4_XS", "Q3_K_M", "Q4_K_M"]))
    assert p.quant == "Q4_K_M" and "target context" in p.reasons["quant"]
