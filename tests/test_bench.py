"""``edge-magistral bench`` on the tiny Magistral with small sizes: structure, reps, skips, JSON.
Timing relations between figures are not asserted (shared machines are noisy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_magistral import bench  # first: it imports the engine, which loads llama_cpp before numpy
from edge_magistral.errors import BadInputError
from edge_magistral.generation import LoadSettings


def _settings(path: Path, n_ctx: int = 512) -> LoadSettings:
    return LoadSettings(str(path), n_ctx=n_ctx, n_threads=2, n_threads_batch=2, n_batch=2048, n_ubatch=512)


def test_library_bench_honours_reps_and_sizes(tiny_gguf_quants: dict[str, Path]) -> None:
    r = bench.run_bench(_settings(tiny_gguf_quants["Q8_0"]), bench.Sizes(pp=64, tg=16, ttft=(256, 1024)), reps=2)
    assert (r.reps, r.pp_tokens, r.tg_tokens) == (2, 64, 16)
    for s in (r.load_s, r.pp_tokens_per_s, r.tg_tokens_per_s):
        assert len(s.values) == 2 and min(s.values) > 0 and s.mean > 0 and s.stdev >= 0
    short, long = r.ttft
    assert short.prompt_tokens == 256 and short.skipped is None and len(short.seconds.values) == 2
    assert min(short.seconds.values) > 0
    assert long.seconds is None and "1025" in long.skipped and "512" in long.skipped
    if os.path.exists("/proc/self/status"):
        assert r.peak_rss_bytes is not None and r.peak_rss_bytes.mean > 10 * bench.MiB
    assert r.gpu_bytes is None or r.gpu_bytes.mean > 0
    assert "CPU" in r.system_info


def test_sizes_beyond_the_context_are_refused_before_loading(tiny_gguf_quants: dict[str, Path]) -> None:
    with pytest.raises(BadInputError, match="pp1024"):
        bench.run_bench(_settings(tiny_gguf_quants["Q8_0"]), bench.Sizes(pp=1024, tg=16, ttft=()), reps=1)
    with pytest.raises(BadInputError, match="reps"):
        bench.run_bench(_settings(tiny_gguf_quants["Q8_0"]), bench.Sizes(pp=64, tg=16, ttft=()), reps=0)


def test_the_plan_asks_for_9216_and_says_when_it_cannot(tiny_gguf_quants: dict[str, Path]) -> None:
    plan, note = bench.plan_for_bench(str(tiny_gguf_quants["Q8_0"]))  # the tiny model is trained to 4096
    assert plan.n_ctx <= 4096 and "9216" in note
    plan, note = bench.plan_for_bench(str(tiny_gguf_quants["Q8_0"]), ctx=1024)
    assert plan.n_ctx == 1024 and note == ""
    s = bench.bench_settings(plan, threads=3)
    assert (s.n_batch, s.n_ubatch, s.n_threads, s.n_threads_batch, s.n_ctx) == (2048, 512, 3, 3, 1024)


def test_cli_json_parses_and_text_lists_every_figure(tiny_gguf_quants: dict[str, Path]) -> None:
    from edge_magistral.cli import bench_cmds, cli  # noqa: F401

    args = ["bench", "--model", str(tiny_gguf_quants["Q8_0"]), "--threads", "2", "--ctx", "1024",
            "--pp", "64", "--tg", "16", "--ttft", "256,8192"]
    r = CliRunner().invoke(cli, [*args, "--reps", "2", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["reps"] == 2 and len(out["tg_tokens_per_s"]["values"]) == 2 and out["quant"] == "Q8_0"
    assert out["settings"]["n_ctx"] == 1024 and out["settings"]["n_threads"] == 2
    assert [t["prompt_tokens"] for t in out["ttft"]] == [256, 8192] and out["ttft"][1]["seconds"] is None
    text = CliRunner().invoke(cli, [*args, "--reps", "1"], catch_exceptions=False)
    assert text.exit_code == 0, text.output
    for label in ("load", "pp64", "tg16", "ttft 256", "ttft 8192", "skipped", "peak RSS", "GPU memory"):
        assert label in text.stdout
