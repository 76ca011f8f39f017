"""``bench``: llama-bench-style speed figures for the engine (edge_magistral.bench does the work)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import click

from edge_magistral.cli.group import cli
from edge_magistral.cli.render import err_console
from edge_magistral.cli.speculate_opts import speculate_options, speculation
from edge_magistral.errors import BadInputError
from edge_magistral.units import MiB


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInputError(f"--ttft {text!r}: give prompt lengths like 1024,8192") from None


def _pm(s, scale: float = 1.0, fmt: str = ".1f") -> str:
    return "n/a" if s is None else f"{s.mean / scale:{fmt}} ± {s.stdev / scale:{fmt}}"


def _lines(r) -> list[str]:
    s = r.settings
    out = [f"{Path(r.model_path).name}: {s.n_gpu_layers} layers on GPU, context {s.n_ctx}, "
           f"batch {s.n_batch}/{s.n_ubatch}, threads {s.n_threads}/{s.n_threads_batch}, "
           f"flash attention {'on' if s.flash_attn else 'off'}, KV {s.type_k}, "
           f"top-k on {'the device' if r.backend_sampling else 'the host'}, {r.reps} reps",
           f"{'load':<14}{_pm(r.load_s, fmt='.3f')} s",
           f"{'pp' + str(r.pp_tokens):<14}{_pm(r.pp_tokens_per_s)} tokens/s",
           f"{'tg' + str(r.tg_tokens):<14}{_pm(r.tg_tokens_per_s)} tokens/s (speculate off)",
           *_speculative_lines(r)]
    for t in r.ttft:
        out.append(f"{'ttft ' + str(t.prompt_tokens):<14}" +
                   (f"{_pm(t.seconds, fmt='.3f')} s" if t.seconds else f"skipped: {t.skipped}"))
    out.append(f"{'peak RSS':<14}{_pm(r.peak_rss_bytes, MiB, '.0f')} MiB")
    out.append(f"{'GPU memory':<14}{_pm(r.gpu_bytes, MiB, '.0f')} MiB" if r.gpu_bytes else f"{'GPU memory':<14}n/a")
    return out + [f"note: {n}" for n in r.notes]


def _speculative_lines(r) -> list[str]:
    sp = r.tg_speculative
    if sp is None:
        return []
    accepted = (f"{sp.accepted_tokens} of {sp.drafted_tokens} guesses accepted ({sp.acceptance:.0%})"
                if sp.acceptance is not None else "no guess verified (they did not pay)")
    return [f"{'tg' + str(r.tg_tokens) + ' ' + sp.mode:<14}{_pm(sp.tokens_per_s)} tokens/s "
            f"({sp.speedup:.2f}x; {accepted})"]


@cli.command()
@click.option("--model", default=None, help="GGUF file, or a quant in the model store (as for `run`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--n-gpu-layers", type=click.IntRange(min=0), default=None, help="Override planned GPU layers.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for prompt and generation (default: the plan's).")
@click.option("--reps", type=click.IntRange(min=1), default=3, show_default=True, help="Loads to average over.")
@click.option("--ctx", type=click.IntRange(min=256), default=None,
              help="Context to plan (default: 9216 for the 8k TTFT when the model and box allow).")
@click.option("--pp", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt-processing tokens.")
@click.option("--tg", type=click.IntRange(min=1), default=128, show_default=True, help="Generated tokens.")
@click.option("--ttft", default="1024,8192", show_default=True, help="Prompt lengths for time to first token.")
@click.option("--n-batch", type=click.IntRange(min=1), default=2048, show_default=True, help="As llama-bench's -b.")
@click.option("--n-ubatch", type=click.IntRange(min=1), default=512, show_default=True, help="As llama-bench's -ub.")
@click.option("--backend-sampling", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Top-k on the device holding the logits (auto: when the output layer is on a GPU).")
@speculate_options
def bench(model, as_json, n_gpu_layers, threads, reps, ctx, pp, tg, ttft, n_batch, n_ubatch, backend_sampling,
          speculate, draft_model) -> None:
    """Prompt processing (pp512) and generation (tg128) like llama-bench, time to first token,
    load time and peak memory; each figure is the mean ± stddev over --reps loads. tg is
    measured plainly (as llama-bench decodes) and again with --speculate's mode (ngram unless
    told), with the share of guesses accepted."""
    from edge_magistral import bench as b  # imports the engine (llama_cpp) before numpy
    from edge_magistral.loader import ModelRequest, resolve_model, with_speculation

    mode, draft = speculation(speculate, draft_model)
    path = resolve_model(model)
    plan, note = b.plan_for_bench(path, ctx, n_gpu_layers, mode, draft)
    settings = b.bench_settings(plan, threads, n_batch, n_ubatch)
    settings = with_speculation(settings, ModelRequest(speculate=mode, draft_model=draft))
    settings = replace(settings, backend_sampling={"auto": None, "on": True, "off": False}[backend_sampling])
    sizes = b.Sizes(pp, tg, _sizes(ttft))
    if as_json:
        result = b.run_bench(settings, sizes, reps, notes=[note] if note else [])
        click.echo(json.dumps({**asdict(result), "quant": plan.quant}, indent=2))
        return
    with err_console().status(f"benchmarking {Path(path).name} ({reps} reps)…"):
        result = b.run_bench(settings, sizes, reps, notes=[note] if note else [])
    click.echo("\n".join(_lines(result)))
