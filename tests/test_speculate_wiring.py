"""Speculative decoding where a user meets it: ``--speculate``/``--draft-model`` on run, chat,
serve and bench reach the engine's LoadSettings; /metrics counts drafted and accepted guesses and
/health says the mode; bench measures tg with and without. On the tiny random Magistral, whose
n-gram guesses rarely come: counts with guesses come from forced ones, or the model as its own draft."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from edge_magistral import bench  # first: it imports the engine, which loads llama_cpp before numpy
from edge_magistral.cli import bench_cmds, run_cmds, serve_cmds  # noqa: F401  (registers the commands)
from edge_magistral.cli.group import cli
from edge_magistral.errors import BadInputError, ModelNotFoundError
from edge_magistral.generation import Done, Limits, LoadSettings
from edge_magistral.loader import ModelRequest, open_model, plan_model
from edge_magistral.server.metrics import Metrics
from edge_magistral.speculate import VerifyCost

REPEATING = "abc " * 60  # its last tokens occur earlier: n-gram guesses from the first step


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGE_MAGISTRAL_MODEL", raising=False)
    monkeypatch.setenv("EDGE_MAGISTRAL_STORE", str(tmp_path / "store"))


def cli_run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ----------------------------------------------------------------------- the request and the loader

def test_a_draft_model_alone_means_draft_and_mismatches_are_refused() -> None:
    assert ModelRequest(draft_model="d.gguf").speculate == "draft"
    assert ModelRequest().speculate is None  # the plan's (ngram)
    with pytest.raises(BadInputError, match="--speculate draft needs a draft model"):
        ModelRequest(speculate="draft")
    with pytest.raises(BadInputError, match="--draft-model goes with --speculate draft"):
        ModelRequest(speculate="ngram", draft_model="d.gguf")
    with pytest.raises(BadInputError, match="speculate must be one of"):
        ModelRequest(speculate="medusa")


def test_the_request_reaches_the_load_settings(tiny_gguf_f32: Path, tmp_path: Path) -> None:
    model = str(tiny_gguf_f32)
    assert plan_model(ModelRequest(model=model, ctx=512))[1].speculate == "ngram"  # the default
    plan, settings = plan_model(ModelRequest(model=model, ctx=512, draft_model=model))
    assert (settings.speculate, settings.draft_model) == ("draft", model)
    assert plan.draft is not None and plan.draft.model_path == model  # planned: its memory is in the plan
    assert settings.draft_gpu_layers == plan.draft.n_gpu_layers
    with pytest.raises(ModelNotFoundError, match="no such draft model.*--draft-model"):
        plan_model(ModelRequest(model=model, ctx=512, draft_model=str(tmp_path / "none.gguf")))
    opened = open_model(ModelRequest(model=model, ctx=512, threads=2, speculate="off"))
    try:
        assert opened.settings.speculate == "off" and opened.engine.settings.speculate == "off"
        assert opened.engine.drafter is None
    finally:
        opened.close()


# ----------------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("command", ["run", "chat", "serve", "bench"])
def test_speculate_draft_without_a_draft_model_is_one_line_and_exit_2(tiny_gguf_f32: Path, command: str) -> None:
    r = CliRunner().invoke(cli, [command, "--model", str(tiny_gguf_f32), "--speculate", "draft", *(
        ["Hi"] if command == "run" else [])], input="")
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and "--speculate draft needs a draft model" in r.stderr


def test_run_json_says_the_mode_and_counts_guesses(tiny_gguf_f32: Path) -> None:
    base = ["run", "--model", str(tiny_gguf_f32), "--ctx", "512", "--max-tokens", "8", "--think-budget", "0",
            "--seed", "1", "--json"]
    off = json.loads(cli_run(*base, "--speculate", "off", REPEATING).stdout)
    assert off["model"]["speculate"] == "off" and off["model"]["draft_model"] is None
    assert off["timings"]["drafted_tokens"] == off["timings"]["accepted_tokens"] == 0
    on = json.loads(cli_run(*base, REPEATING).stdout)
    assert on["model"]["speculate"] == "ngram"
    assert 0 <= on["timings"]["accepted_tokens"] <= on["timings"]["drafted_tokens"]
    assert on["answer"] == off["answer"]  # the same tokens either way


# ------------------------------------------------------------------------------------ /metrics

def speculative_done(path: Path) -> Done:
    """A turn of the real engine whose guesses are verified at full length (cost fixed at 0,
    single-token lookups): it drafts from its first step."""
    from edge_magistral.engine import Engine

    e = Engine(LoadSettings(str(path), n_ctx=1024, n_threads=2, speculate="ngram"))
    e.verify_cost, e.ngram_sizes = VerifyCost(fixed=0.0), (2, 1)
    try:
        done = [ev for ev in e.generate_ids(e.raw_prompt_ids(REPEATING), Limits(raw=True, max_tokens=24, seed=1))
                if isinstance(ev, Done)][0]
    finally:
        e.close()
    assert done.timings.drafted_tokens > 0
    return done


def sample(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_metrics_count_drafted_and_accepted_and_the_rate(tiny_gguf_f32: Path) -> None:
    m = Metrics()
    text = m.render().decode()
    assert sample(text, "edge_magistral_speculative_drafted_tokens_total") == 0
    assert sample(text, "edge_magistral_speculative_acceptance_rate") == 0
    m.worker_ready({"plan": {"speculate": "ngram"}})
    done = speculative_done(tiny_gguf_f32)
    m.finished(done, None, 1.0)
    m.finished(done, None, 1.0)
    text = m.render().decode()
    drafted, accepted = done.timings.drafted_tokens, done.timings.accepted_tokens
    assert sample(text, "edge_magistral_speculative_drafted_tokens_total") == 2 * drafted
    assert sample(text, "edge_magistral_speculative_accepted_tokens_total") == 2 * accepted
    assert sample(text, "edge_magistral_speculative_acceptance_rate") == pytest.approx(accepted / drafted)
    assert sample(text, 'edge_magistral_speculate_mode{mode="ngram"}') == 1


@pytest.fixture(scope="module")
def servers(tiny_gguf_f32: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two live services: the tiny model as its own draft (with an audit log), and --speculate off."""
    import serve_harness

    d = tmp_path_factory.mktemp("serve-speculate")
    draft = serve_harness.start(tiny_gguf_f32, d, "--draft-model", str(tiny_gguf_f32),
                                "--audit-log", str(d / "audit.jsonl"), wait=False)
    off = serve_harness.start(tiny_gguf_f32, d, "--speculate", "off")
    draft.wait_ready()
    yield draft, off
    assert draft.stop() == 0, draft.log_text()
    assert off.stop() == 0, off.log_text()


def metrics_text(server) -> str:
    return httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10).text


def test_live_metrics_and_health_say_what_was_speculated(servers) -> None:
    """The model as its own draft is always right; a draft that costs as much as the model does
    not pay, yet it verifies one guess every 16 tokens (a count, not a timing): 32 greedy tokens
    per request draft at least once. The counters are the sums of the audit log's timings."""
    import serve_harness

    draft, off = servers
    assert serve_harness.health(draft)["plan"]["speculate"] == "draft"
    assert serve_harness.health(off)["plan"]["speculate"] == "off"
    body = {"prompt": REPEATING, "max_tokens": 32, "temperature": 0}
    for server in (draft, off):
        with server.client() as c:
            for _ in range(3):
                assert c.post("/v1/completions", json=body).status_code == 200
    text = metrics_text(off)
    assert sample(text, "edge_magistral_speculative_drafted_tokens_total") == 0
    assert sample(text, "edge_magistral_speculative_accepted_tokens_total") == 0
    assert sample(text, 'edge_magistral_speculate_mode{mode="off"}') == 1
    audit = draft.log.parent / "audit.jsonl"
    serve_harness.until(lambda: audit.exists() and len(audit.read_text().splitlines()) == 3, what="3 audit records")
    timings = [json.loads(line)["timings"] for line in audit.read_text().splitlines()]
    drafted, accepted = (sum(t[k] for t in timings) for k in ("drafted_tokens", "accepted_tokens"))
    assert drafted >= 3 and accepted == drafted
    text = metrics_text(draft)
    assert sample(text, "edge_magistral_speculative_drafted_tokens_total") == drafted
    assert sample(text, "edge_magistral_speculative_accepted_tokens_total") == accepted
    assert sample(text, "edge_magistral_speculative_acceptance_rate") == 1
    assert sample(text, 'edge_magistral_speculate_mode{mode="draft"}') == 1


# -------------------------------------------------------------------------------------- bench

def test_bench_json_has_tg_with_and_without_speculation(tiny_gguf_f32: Path) -> None:
    args = ["bench", "--model", str(tiny_gguf_f32), "--threads", "2", "--ctx", "512", "--pp", "16", "--tg", "16",
            "--ttft", "64", "--reps", "1"]
    out = json.loads(cli_run(*args, "--json").stdout)
    assert out["settings"]["speculate"] == "ngram"
    assert len(out["tg_tokens_per_s"]["values"]) == 1 and out["tg_tokens_per_s"]["mean"] > 0
    spec = out["tg_speculative"]
    assert spec["mode"] == "ngram" and spec["tokens_per_s"]["mean"] > 0 and spec["speedup"] > 0
    assert 0 <= spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert spec["acceptance"] == (spec["accepted_tokens"] / spec["drafted_tokens"] if spec["drafted_tokens"] else None)
    text = cli_run(*args, "--speculate", "off").stdout
    assert "tg16" in text and "speculate off" in text and "ngram" not in text


def test_bench_acceptance_is_accepted_over_drafted_over_every_rep() -> None:
    runs = {"tg": [10.0, 10.0], "tg_spec": [15.0, 25.0], "drafted": [8, 12], "accepted": [2, 3]}
    s = bench.speculative_tg("ngram", runs)
    assert (s.drafted_tokens, s.accepted_tokens, s.acceptance, s.speedup) == (20, 5, 0.25, 2.0)
    assert bench.speculative_tg("ngram", {**runs, "drafted": [0, 0], "accepted": [0, 0]}).acceptance is None
    assert bench.speculative_tg("off", runs) is None
