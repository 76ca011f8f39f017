"""The pure parts of the comparison scripts (benchmarks/compare_llama.py, compare_batched.py,
bandwidth.py, results_md.py, before_after.py): parsing the llama.cpp tools' output, the
statistics, the bandwidth floor and the markdown tables, on small fixtures (no model loads)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SMOL = Path(__file__).resolve().parent.parent / ".cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(BENCH))
    try:
        yield {n: importlib.import_module(n) for n in ("bandwidth", "compare_llama", "results_md", "before_after")}
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def batched():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("compare_batched")  # imports the engine (llama_cpp), loads no model
    finally:
        sys.path.remove(str(BENCH))


# ------------------------------------------------------------------------------ llama-bench

LLAMA_BENCH_OUT = """ggml_cuda_init: found 1 CUDA devices
[
  {"n_prompt": 512, "n_gen": 0, "avg_ts": 100.0, "stddev_ts": 1.0, "samples_ts": [99.0, 101.0], "n_threads": 2},
  {"n_prompt": 0, "n_gen": 128, "avg_ts": 10.0, "stddev_ts": 0.1, "samples_ts": [9.9, 10.1], "n_threads": 2}
]
"""


def test_llama_bench_json_parsed_past_log_lines(mods):
    cl = mods["compare_llama"]
    rows = cl.parse_json_out(LLAMA_BENCH_OUT)
    assert cl.llama_bench_samples(rows) == {"pp": [99.0, 101.0], "tg": [9.9, 10.1]}
    with pytest.raises(ValueError):
        cl.parse_json_out("no json here\n")


def test_llama_bench_command_matches_our_settings(mods):
    cmd = mods["compare_llama"].llama_bench_cmd("lb", "m.gguf", 512, 128, 3, 2, 0)
    s = " ".join(cmd)
    for part in ("-p 512", "-n 128", "-fa 1", "-b 2048", "-ub 512", "-r 3", "-o json", "-t 2", "-ngl 0"):
        assert part in s
    ours = " ".join(mods["compare_llama"].our_bench_cmd("py", "m.gguf", 512, 128, 3, 2, None, "1024", None))
    assert "-m edge_magistral bench" in ours and "--threads 2" in ours and "--n-gpu-layers" not in ours


def test_compare_ratio_and_paired_rounds(mods):
    c = mods["compare_llama"].compare([[9.0, 11.0], [10.0]], [[10.0, 10.0], [20.0]])
    assert c["ours"]["mean"] == pytest.approx(10.0) and c["llama"]["mean"] == pytest.approx(40 / 3)
    assert c["ratio_of_means"] == pytest.approx(0.75)
    assert c["ratio_rounds"] == [1.0, 0.5] and c["ratio"] == pytest.approx(0.75)
    # with the share of the CPUs others used per round, only the quiet rounds count (two at least)
    c = mods["compare_llama"].compare([[10.0], [5.0], [9.8], [1.0]], [[10.0]] * 4, [0.0, 0.6, 0.05, 0.9])
    assert c["ratio"] == pytest.approx(0.99) and c["quiet_rounds"] == 2 and "quiet" in c["ratio_basis"]
    c = mods["compare_llama"].compare([[10.0], [5.0], [9.0]], [[10.0]] * 3, [0.0, 0.6, 0.9])
    assert c["ratio"] == pytest.approx(0.9) and c["ratio_basis"] == "median of 3 rounds"


def test_others_busy(mods):
    cl = mods["compare_llama"]
    # 10 s on 2 CPUs; the machine was busy 14 CPU-seconds, 8 of them ours: others used 30% of it
    assert cl.others_busy((0.0, 100.0, 5.0), (10.0, 114.0, 13.0), 2) == pytest.approx(0.3)
    assert cl.others_busy((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), 2) == 0.0
    wall, busy, own = cl.cpu_snapshot()
    assert wall > 0 and own > 0


def test_abba_order(mods):
    assert mods["compare_llama"].order(3) == ["ours", "llama", "llama", "ours", "ours", "llama"]


# ------------------------------------------------------------------------------ before_after

def test_before_after_tree_goes_first_on_pythonpath(mods):
    ba = mods["before_after"]
    env = ba.tree_env(Path("/src/old"), {"PYTHONPATH": "/x", "HOME": "/root"})
    assert env["PYTHONPATH"].split(":") == ["/src/old", "/x"] and env["HOME"] == "/root"
    assert ba.tree_env(Path("/src/old"), {})["PYTHONPATH"] == "/src/old"


def test_before_after_refuses_a_package_from_elsewhere(mods, tmp_path):
    ba = mods["before_after"]
    (tmp_path / "tree" / "edge_magistral").mkdir(parents=True)
    (tmp_path / "site" / "edge_magistral").mkdir(parents=True)
    assert ba.check_module_file(tmp_path / "tree", str(tmp_path / "tree/edge_magistral/__init__.py\n")) is None
    why = ba.check_module_file(tmp_path / "tree", str(tmp_path / "site/edge_magistral/__init__.py"))
    assert why and str(tmp_path / "site") in why


def test_before_after_abba_and_paired_ratio(mods):
    ba = mods["before_after"]
    assert ba.side_order(2) == ["before", "after", "after", "before"]
    c = ba.paired([[9.0, 11.0], [10.0]], [[10.0, 10.0], [20.0]])  # after, before
    assert c["after"]["mean"] == pytest.approx(10.0) and c["before"]["mean"] == pytest.approx(40 / 3)
    assert c["ratio_rounds"] == [1.0, 0.5] and c["ratio"] == pytest.approx(0.75) and "ours" not in c
    c = ba.paired([[10.0], [5.0], [9.8]], [[10.0]] * 3, [0.0, 0.6, 0.05])  # the busy round left out
    assert c["ratio"] == pytest.approx(0.99) and c["quiet_rounds"] == 2


def test_before_after_ttft_over_runs(mods):
    runs = [{"ttft": [{"prompt_tokens": 1024, "seconds": {"values": [0.5, 0.7]}},
                      {"prompt_tokens": 8192, "seconds": None}]},
            {"ttft": [{"prompt_tokens": 1024, "seconds": {"values": [0.6]}},
                      {"prompt_tokens": 8192, "seconds": None}]}]
    t = mods["before_after"].ttft_of(runs)
    assert t["1024"]["mean"] == pytest.approx(0.6) and t["1024"]["n"] == 3 and t["8192"] is None


# ---------------------------------------------------------------------- llama-batched-bench

BATCHED_MD = """
main: n_kv_max = 2048, n_batch = 2048, n_ubatch = 512, flash_attn = 1, is_pp_shared = 0

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.050 |  2560.00 |    1.000 |   128.00 |    1.050 |   243.81 |
|   128 |    128 |    2 |    512 |    0.090 |  2844.44 |    1.280 |   200.00 |    1.370 |   373.72 |
"""

BATCHED_JSONL = ('{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, '
                 '"n_gpu_layers": 0, "n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 128, "pl": 4, '
                 '"n_kv": 1024, "t_pp": 0.2, "speed_pp": 2560.0, "t_tg": 2.0, "speed_tg": 256.0, "t": 2.2, '
                 '"speed": 465.45}\n')


def test_batched_bench_table_and_jsonl(batched):
    rows = batched.parse_batched_bench(BATCHED_MD)
    assert [(r["pl"], r["speed_tg"], r["speed_pp"]) for r in rows] == [(1, 128.0, 2560.0), (2, 200.0, 2844.44)]
    (r,) = batched.parse_batched_bench("llama_perf...\n" + BATCHED_JSONL)
    assert (r["pl"], r["speed_tg"], r["t_tg"]) == (4, 256.0, 2.0)


def test_batched_command_context_holds_every_sequence(batched):
    cmd = batched.batched_bench_cmd("bb", "m.gguf", [1, 2, 4, 8], 128, 128, 2, 0)
    c = int(cmd[cmd.index("-c") + 1])
    assert c == 8 * 512 and c // 8 >= 128 + 128 + 2  # one KV stream per sequence, as ours
    assert cmd[cmd.index("-npl") + 1] == "1,2,4,8" and "-pps" not in cmd


def test_our_rates_follow_batched_bench_definitions(batched):
    # two streams submitted at t=0 and 0.001, first tokens at 0.1 and 0.101 (the prefill step's end),
    # last tokens both at 1.1; 11 tokens each: 10 decode steps after the prefill
    r = batched.rates([(0.0, 0.1, 1.0, 11), (0.001, 0.1, 0.999, 11)], npp=100, ntg=10)
    assert r["t_pp"] == pytest.approx(0.101) and r["speed_pp"] == pytest.approx(200 / 0.101)
    assert r["t_tg"] == pytest.approx(0.999) and r["speed_tg"] == pytest.approx(20 / 0.999)
    assert r["complete"]
    assert not batched.rates([(0.0, 0.1, 1.0, 7)], 100, 10)["complete"]


def test_batched_table_ratios(batched):
    ours = {1: [{"speed_tg": 90.0, "speed_pp": 1000.0}], 2: [{"speed_tg": 170.0, "speed_pp": 1800.0}]}
    theirs = {1: [{"speed_tg": 100.0, "speed_pp": 1000.0}], 2: [{"speed_tg": 200.0, "speed_pp": 2000.0}]}
    rows = batched.table(ours, theirs, [{"speed_tg": 95.0, "speed_pp": 1000.0}])
    assert rows[0]["speed_tg"]["ratio"] == pytest.approx(0.9) and rows[1]["speed_tg"]["ratio"] == pytest.approx(0.85)
    assert rows[1]["speed_pp"]["ratio_of_means"] == pytest.approx(0.9)
    assert rows[0]["batch_vs_engine_tg"] == pytest.approx(90 / 95) and rows[0]["engine_ratio_tg"] == pytest.approx(0.95)


# --------------------------------------------------------------------------------- bandwidth

def test_floor_of_the_tiny_model(mods, tiny_gguf_quants):
    from edge_magistral.gguf_info import read_info

    tiny = tiny_gguf_quants["Q8_0"]
    bw = mods["bandwidth"]
    info = read_info(tiny)
    b = bw.bytes_per_token(tiny)
    assert not b["tied_output"]
    embd = b["token_embd_bytes"]
    # everything but the gathered embedding (one row of it is read)
    assert b["weights_read_bytes"] == info.tensor_bytes - embd + embd // info.n_vocab
    f = bw.bandwidth_floor(tiny, 10.0)
    assert f["max_tokens_per_s"] == pytest.approx(10e9 / b["weights_read_bytes"])
    assert bw.percent_of_floor(f["max_tokens_per_s"] / 2, b["weights_read_bytes"], 10.0) == pytest.approx(50.0)
    deep = bw.bandwidth_floor(tiny, 10.0, depth=64)
    assert deep["kv_read_bytes"] == 64 * 2 * info.n_layers * info.n_head_kv * info.head_dim * 2


@pytest.mark.skipif(not SMOL.exists(), reason="the SmolLM2 test model is not downloaded")
def test_tied_embeddings_are_read_whole(mods):
    b = mods["bandwidth"].bytes_per_token(SMOL)
    assert b["tied_output"] and b["weights_read_bytes"] == b["tensor_bytes"]


# ------------------------------------------------------------------------------- results_md

def _llama_result(pp_ratio: float, tg_ratio: float) -> dict:
    def test(ratio, theirs):
        return {"ours": {"mean": theirs * ratio, "sd": 0.0}, "llama": {"mean": theirs, "sd": 0.0}, "ratio": ratio}
    return {"kind": "compare_llama", "model_name": "tiny-Q8_0.gguf", "quant": "Q8_0", "file_size": 80 << 20,
            "weights_read_bytes": 50_000_000, "command": "python benchmarks/compare_llama.py --model tiny",
            "settings": {"threads": 2, "n_gpu_layers": 0},
            "tests": {"pp512": test(pp_ratio, 1000.0), "tg128": test(tg_ratio, 100.0)},
            "ours": {"ttft_s": {"1024": {"mean": 0.5, "sd": 0.0}, "8192": None}, "load_s": {"mean": 1.0, "sd": 0},
                     "peak_rss_bytes": {"mean": 300 << 20, "sd": 0}, "gpu_bytes": None},
            "system": {"host": "box", "cpu_name": "Xeon", "cpu_count": 2, "gpu": None},
            "runs": [{"side": "ours", "cmd": "edge-magistral bench", "loadavg_before": [1.0]},
                     {"side": "llama", "cmd": "llama-bench -m tiny", "loadavg_before": [1.5]}]}


BANDWIDTH = {"kind": "bandwidth", "host": "box", "cpu_name": "Xeon",
             "cpu": {"copy_gbps": 10.0, "read_gbps": 12.0, "threads": 2, "method": "numpy"}}

BATCHED = {"kind": "compare_batched", "model_name": "tiny-Q8_0.gguf", "command": "python compare_batched.py",
           "llama_batched_bench_command": "llama-batched-bench -npl 1,2",
           "settings": {"npp": 128, "ntg": 128, "rounds": 3, "threads": 2, "n_gpu_layers": 0, "eos": "banned"},
           "system": {"host": "box", "cpu_name": "Xeon", "cpu_count": 2, "gpu": None},
           "rows": [{"npl": 1,
                     "speed_tg": {"ours": {"mean": 90, "sd": 1}, "llama": {"mean": 100, "sd": 1}, "ratio": 0.9},
                     "speed_pp": {"ours": {"mean": 900, "sd": 1}, "llama": {"mean": 1000, "sd": 1}, "ratio": 0.9},
                     "engine_speed_tg": {"mean": 95, "sd": 1}, "batch_vs_engine_tg": 90 / 95, "engine_ratio_tg": 0.95},
                    {"npl": 2,
                     "speed_tg": {"ours": {"mean": 170, "sd": 1}, "llama": {"mean": 200, "sd": 1}, "ratio": 0.85},
                     "speed_pp": {"ours": {"mean": 900, "sd": 1}, "llama": {"mean": 1000, "sd": 1}, "ratio": 0.9}}]}

PLAN = [{"scenario": "h200", "profile": "datacenter-80gb", "fits": True, "quant": "Q8_0", "n_ctx": 40960,
         "type_k": "f16", "type_v": "f16", "n_gpu_layers": 41, "predicted_gpu": {"total": 1030},
         "llama_cpp_gpu": {"process_gpu_used": 1000}},
        {"scenario": "8gb", "profile": "nvidia-8gb", "fits": True, "quant": "Q4_K_M", "n_ctx": 16384,
         "type_k": "q8_0", "type_v": "q8_0", "n_gpu_layers": 14, "predicted_gpu": {"total": 1100},
         "llama_cpp_gpu": {"process_gpu_used": 1000}, "error_total_vs_process": 0.1}]


def test_verdicts(mods):
    md = mods["results_md"]
    assert md.verdict(0.97, 0.97) == "PASS" and md.verdict(0.969, 0.97) == "MISS" and md.verdict(None, 0.9) == "n/a"
    assert md.memory_verdict(-0.05) == "PASS" and md.memory_verdict(0.051) == "MISS"


def test_classify(mods):
    md = mods["results_md"]
    assert md.classify(BATCHED) == "compare_batched" and md.classify(PLAN) == "plan_vs_gpu"
    assert md.classify({"kind": "other"}) is None and md.classify([]) is None


def test_llama_rows_floor_and_verdicts(mods):
    md = mods["results_md"]
    (r,) = md.llama_rows([_llama_result(0.96, 0.95)], [BANDWIDTH])
    assert (r["pp_verdict"], r["tg_verdict"]) == ("PASS", "MISS")
    assert r["floor_tokens_per_s"] == pytest.approx(200.0)  # 10 GB/s ÷ 50 MB
    assert r["llama_tg_of_floor"] == pytest.approx(0.5) and r["memory_kind"] == "peak RSS"


def test_plan_rows(mods):
    rows = mods["results_md"].plan_rows(PLAN)
    assert rows[0]["error"] == pytest.approx(0.03) and rows[0]["verdict"] == "PASS"
    assert rows[1]["verdict"] == "MISS"


def test_render_and_load(mods, tmp_path):
    md = mods["results_md"]
    for name, obj in (("cpu_llama.json", _llama_result(0.99, 0.98)), ("cpu_batched.json", BATCHED),
                      ("bw.json", BANDWIDTH), ("plan_vs_gpu.json", PLAN), ("junk.json", {"x": 1})):
        (tmp_path / name).write_text(json.dumps(obj))
    (tmp_path / "broken.json").write_text("{")
    data = md.load([str(tmp_path)])
    assert [len(data[k]) for k in ("compare_llama", "compare_batched", "bandwidth", "plan_vs_gpu")] == [1, 1, 1, 1]
    text = md.render(data)
    assert "| tiny-Q8_0.gguf | Q8_0 | CPU, 2 threads |" in text
    assert "99.0% | PASS" in text and "98.0% | PASS" in text and "50.0%" in text  # llama-bench at half the floor
    assert "| 2 | 170.0 ± 1.0 | 200.0 ± 1.0 | 85.0% | MISS |" in text and "| 90.0% | – |" in text
    assert "| 1 |" in text and "95.0% of llama-batched-bench" in text
    assert "| h200 | datacenter-80gb | Q8_0 |" in text and "3.00% | PASS" in text
    assert "llama-bench -m tiny" in text and "llama-batched-bench -npl 1,2" in text


def test_batched_wording_follows_the_engines_of_the_result(mods):
    md = mods["results_md"]
    old = md.render({"compare_llama": [], "bandwidth": [], "plan_vs_gpu": [], "compare_batched": [("old", BATCHED)]})
    assert "the BatchEngine at one stream is 94.7% of it" in old
    new = dict(BATCHED, settings={**BATCHED["settings"], "engines": "N-slot/1-slot"})
    text = md.render({"compare_llama": [], "bandwidth": [], "plan_vs_gpu": [], "compare_batched": [("new", new)]})
    assert "npl 1 through a one-slot engine: 95.0 ± 1.0 t/s" in text and "the N-slot engine at one stream" in text


# ------------------------------------------------------------------------- speculate.py (issue 13)

@pytest.fixture(scope="module")
def spec():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("speculate")  # imports llama_cpp, loads no model
    finally:
        sys.path.remove(str(BENCH))


def test_speculate_matches_replay_the_ngram_draft(spec):
    # after 3: "1 2 3" occurred, proposes 1 2 3 1 2 ... (2 right); after 1: 2 3 1 ... (1 right); after 2: 3 (wrong)
    assert spec.matches([1, 2, 3, 1, 2], [3, 1, 2, 9]) == [2, 1, 0]
    assert spec.matches([1], [2, 3, 4]) == [-1, -1]  # nothing ever repeats: no proposal


def test_speculate_walk_counts_steps_tokens_and_cost(spec):
    free = spec.walk([2, 1, 0], 16, lambda k: 1.0)
    assert (free.tokens, free.steps, free.drafted, free.accepted) == (3, 1, 2, 2)  # no guess past the end
    one = spec.walk([2, 1, 0], 1, lambda k: 1.0 + 0.5 * k)  # one guess (right), then a plain last step
    assert (one.tokens, one.steps, one.drafted, one.accepted, one.cost) == (3, 2, 1, 1, 2.5)
    assert one.speedup == pytest.approx(1.2) and free.per_step == pytest.approx(3.0)
    gaps = spec.walk([-1, 3, 0, -1], 2, lambda k: 1.0)  # no proposal: a plain step
    assert (gaps.tokens, gaps.steps, gaps.drafted, gaps.accepted) == (4, 2, 2, 2)
    assert spec.per_guess_rate([[2, 1, 0]]) == pytest.approx(1.0)  # both verified guesses right
    assert spec.per_guess_rate([[0, 0, 0]], k=1) == pytest.approx(0.0)


def test_speculate_engine_policy_follows_cost(spec):
    out = [5, 6, 7] * 10
    cheap = spec.engine_walk([5, 6, 7, 5, 6, 7], out, 0.0, lambda k: 1.0)
    assert cheap.tokens == len(out) - 1 and cheap.accepted == cheap.drafted and cheap.steps < 6
    dear = spec.engine_walk([5, 6, 7, 5, 6, 7], out, 5.0, lambda k: 1.0 + 5.0 * k)
    assert dear.drafted == 0 and dear.steps == len(out) - 1 and dear.speedup == pytest.approx(1.0)


def test_speculate_geometric_slope_and_best_of(spec):
    assert spec.geometric(0.0, lambda k: 1.0)["best_k"] == 0
    assert spec.geometric(0.9, lambda k: 1.0, k_max=16)["best_k"] == 16
    g = spec.geometric(0.6, lambda k: 1.0 + 0.1 * k, draft_cost=0.05)
    assert 0 < g["best_k"] < 16 and g["best_speedup"] == pytest.approx(
        (1 - 0.6 ** (g["best_k"] + 1)) / 0.4 / (1 + 0.15 * g["best_k"]))
    assert spec.slope({k: 1.0 + 0.1 * k for k in range(17)}) == pytest.approx(0.1)
    assert spec.curve({0: 1.0, 1: 1.5, 2: 2.0})(4) == pytest.approx(3.0)
    a = {"generation_s": 2.0, "completion_tokens": 11}
    b = {"generation_s": 1.0, "completion_tokens": 11}
    assert spec.best_of([[a, b], [b, a]]) == [b, b]


def _costs(depth: int = 512) -> dict:
    """A cost part shaped like the H100's: cheap replayed steps, dear shape changes (ms)."""
    replay = {k: 9.0 * (1 + 0.1 * k) for k in range(9)}
    return {"depth": depth, "t_replay_ms": replay, "t_after_switch_1_ms": 10.5,
            "t_switch_ms": {k: v * 1.15 if k else 13.5 for k, v in replay.items()},
            "t_ms": {k: v * 1.6 if k else 9.0 for k, v in replay.items()},
            "c": {k: v * 1.15 / 9.0 if k else 1.5 for k, v in replay.items()}}


def test_speculate_shape_costs_follow_the_graph_replays(spec):
    f = spec.shape_costs(_costs())
    assert f(0, 3) == pytest.approx(1.0) and f(0, 1) == pytest.approx(10.5 / 9) and f(0, 2) == pytest.approx(1.5)
    assert f(2, 1) == pytest.approx(1.2 * 1.15) and f(2, 2) == pytest.approx(1.2 * 1.6)
    assert f(2, 5) == pytest.approx(1.2)


def test_speculate_at_rate_scripts_guesses_at_the_rate(spec):
    import random

    import speculate_at_rate as sar

    class Source:
        cheap = True

        def __init__(self) -> None:
            self.pushed, self.asked = [], []

        def push(self, t: int) -> None:
            self.pushed.append(t)

        def propose(self, k: int) -> list[int]:
            self.asked.append(k)
            return []

    script = list(range(100, 200))
    src = Source()
    always = sar.Scripted(src, script, 10, 1.0, random.Random(0), 1000)
    assert always.propose(3) == [110, 111, 112] and src.asked == [3]  # the source still works
    always.push(110)
    assert always.propose(2) == [111, 112] and src.pushed == [110]
    never = sar.Scripted(Source(), script, 10, 0.0, random.Random(0), 1000)
    assert never.propose(2) == [111, 112]  # every guess wrong: the true token + 1
    half = sar.Scripted(Source(), script, 0, 0.5, random.Random(3), 1000)
    firsts = [half.propose(1)[0] == 100 for _ in range(400)]
    assert 150 < sum(firsts) < 250


def test_speculate_held_beats_per_step_where_shape_changes_cost(spec, tmp_path):
    import speculate_at_rate as sar

    f = tmp_path / "cost.json"
    f.write_text(json.dumps({"cost": [_costs()]}))
    p = sar.predict(f, [0.7], n=120, outputs=4)["512"]
    assert p["ngram-held 0.7"] > p["ngram-free 0.7"] > 1.0
