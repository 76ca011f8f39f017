"""Speed of the engine on this box, measured the way llama-bench measures llama.cpp.

Figures are comparable with ``llama-bench`` run on the same file and settings: prompt processing
(pp) is a prompt of random ids decoded from an empty KV cache in ``n_batch`` pieces, timed until
its logits are ready; generation (tg) is a real engine turn from a one-token prompt, timed from its
first token to its last, decoded plainly (speculate=off, as llama-bench decodes), and again with
the speculative decoding the settings ask for, on the same load (the acceptance of its guesses
beside it). Unlike llama-bench, each
generated token also goes through the sampler, the watchdog and the detokenizer (what a real turn
pays). Both run after a short warm-up, as llama-bench's do. Time to first token runs a
whole engine turn (``generate_ids``) on a random prompt from an empty cache. Every figure is the
mean and standard deviation over ``reps`` fresh loads of the model.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
from dataclasses import dataclass, field, replace
from typing import Any

# The engine before anything that imports numpy: it loads llama_cpp first (the other order
# segfaults model loads on CUDA builds).
from edge_magistral.engine import Engine  # isort: skip
import llama_cpp  # isort: skip

from edge_magistral.errors import BackendError, BadInputError, DoesNotFitError
from edge_magistral.generation import Done, Limits, LoadSettings
from edge_magistral.units import MiB

DEFAULT_CTX = 9216  # room for the 8k TTFT prompt and its first token


@dataclass(frozen=True)
class Sizes:
    """Token counts of each test (llama-bench's pp512/tg128, and TTFT at 1k and 8k by default)."""

    pp: int = 512
    tg: int = 128
    ttft: tuple[int, ...] = (1024, 8192)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for a single rep) of the per-rep values."""

    mean: float
    stdev: float
    values: list[float]


@dataclass(frozen=True)
class TTFT:
    """Time to first token for one prompt length; ``skipped`` says why there is no figure."""

    prompt_tokens: int
    seconds: Stat | None
    skipped: str | None = None


@dataclass(frozen=True)
class SpeculativeTG:
    """tg with speculative decoding, measured on the same loads as the plain tg: its speed, and
    the guesses verified (drafted) and accepted over every rep."""

    mode: str  # "ngram" | "draft"
    tokens_per_s: Stat
    drafted_tokens: int
    accepted_tokens: int
    acceptance: float | None  # accepted / drafted (None: no guess was verified)
    speedup: float  # mean tokens/s over the plain tg's


@dataclass(frozen=True)
class BenchResult:
    model_path: str
    settings: LoadSettings
    reps: int
    system_info: str  # llama.cpp's backends and CPU features: what the figures were measured on
    load_s: Stat
    pp_tokens: int
    pp_tokens_per_s: Stat
    tg_tokens: int
    tg_tokens_per_s: Stat  # speculate=off: comparable with llama-bench's tg
    ttft: list[TTFT]
    peak_rss_bytes: Stat | None  # VmHWM, reset before each load where the kernel allows
    gpu_bytes: Stat | None  # device memory this process holds at the end of a rep (None: no NVIDIA GPU seen)
    notes: list[str] = field(default_factory=list)
    backend_sampling: bool = False  # whether top-k ran on the device (settings.backend_sampling resolved)
    tg_speculative: SpeculativeTG | None = None  # None when the settings say speculate=off


# ----------------------------------------------------------------------------------- planning

def plan_for_bench(model_path: str, ctx: int | None = None, n_gpu_layers: int | None = None,
                   speculate: str | None = None, draft_model: str | None = None) -> tuple[Any, str]:
    """Plan like ``run`` does, asking for a context that holds the 8k TTFT prompt unless ``ctx``
    is given; when the model or the box cannot, take the planner's own context and say so."""
    from edge_magistral.loader import ModelRequest, plan_model

    req = ModelRequest(model=model_path, ctx=ctx, n_gpu_layers=n_gpu_layers, parallel=1, speculate=speculate,
                       draft_model=draft_model)
    if ctx is not None:
        return plan_model(req)[0], ""
    try:
        return plan_model(replace(req, ctx=DEFAULT_CTX))[0], ""
    except (BadInputError, DoesNotFitError) as e:
        p = plan_model(req)[0]
        return p, f"context {p.n_ctx}, not {DEFAULT_CTX}: {e}"


def bench_settings(plan: Any, threads: int | None = None, n_batch: int = 2048, n_ubatch: int = 512) -> LoadSettings:
    """The plan's load settings with llama-bench's batch defaults; ``threads`` sets both pools
    (llama-bench uses one thread count for prompt and generation)."""
    s = replace(LoadSettings.from_plan(plan), n_batch=n_batch, n_ubatch=n_ubatch)
    return replace(s, n_threads=threads, n_threads_batch=threads) if threads else s


# ---------------------------------------------------------------------------------- the tests

class Prompts:
    """Random prompts whose first token differs from every earlier one's: no turn shares a prefix
    with what the engine's KV cache holds, so each starts from an empty cache (the engine keeps
    only a common prefix)."""

    def __init__(self, rng: random.Random, n_vocab: int):
        self.rng, self.n_vocab, self.count = rng, n_vocab, 0

    def __call__(self, n: int) -> list[int]:
        self.count += 1
        return [self.count % self.n_vocab] + [self.rng.randrange(self.n_vocab) for _ in range(n - 1)]


def _evaluated(e: Engine, n: int, before: int, what: str) -> None:
    """A figure is only worth its token count: refuse one where llama.cpp evaluated another."""
    if e.tokens_evaluated - before != n:
        raise BackendError(f"{what}: {e.tokens_evaluated - before} tokens evaluated, expected {n}")


def prompt_rate(e: Engine, n: int, prompts: Prompts) -> float:
    """pp: tokens/s of one n-token prompt from an empty cache (a one-token turn), decoded in
    n_batch pieces on the engine's own thread and timed until its logits are ready on the device,
    as llama-bench's pp. Every decode stays on the engine's thread: on a CPU build, a second thread
    that decodes keeps an OpenMP pool of its own spinning beside the engine's (measured: generation
    at 0.4x on two cores)."""
    before = e.tokens_evaluated
    # The turns' own sampling (the warm-up's and tg's): a different top-k would attach another
    # device-side sampler, and llama.cpp re-reserves its graphs for that (~12% of pp512 on an H100).
    done = _last_done(e.generate_ids(prompts(n), Limits(raw=True, max_tokens=1, seed=1)))
    _evaluated(e, n, before, "pp")  # the prompt only: the one token sampled ends the turn unevaluated
    if done.timings.cached_prompt_tokens or done.timings.prompt_s <= 0:
        raise BackendError(f"pp: the prompt of {n} tokens was not evaluated from an empty cache")
    return n / done.timings.prompt_s


def generation_rate(e: Engine, n: int, prompts: Prompts, seed: int, speculate: bool = True) -> float:
    """tg: n tokens of a real engine turn (raw, EOS ignored, the default sampler) after a
    one-token prompt, timed from its first token to its last: every step pays what a user's turn
    pays (the sampler, the watchdog, the detokenizer, the events), as llama-bench's does not.
    ``speculate``: with the engine's own speculate mode, else plainly (see :func:`generation_turn`)."""
    return n / generation_turn(e, n, prompts, seed, speculate).timings.generation_s


def generation_turn(e: Engine, n: int, prompts: Prompts, seed: int, speculate: bool = True) -> Done:
    """The tg turn (:func:`generation_rate`), checked, with its timings (and guesses)."""
    before = e.tokens_evaluated
    limits = Limits(raw=True, max_tokens=n + 1, seed=seed, ignore_eos=True, speculate=speculate)
    done = _last_done(e.generate_ids(prompts(1), limits))
    t = done.timings
    if not speculate or e.settings.speculate == "off":
        _evaluated(e, n + 1, before, "tg")  # the prompt token and the n generated tokens fed back
    elif e.tokens_evaluated - before < n + 1 + t.drafted_tokens - t.accepted_tokens:  # + rejected guesses
        raise BackendError(f"tg: {e.tokens_evaluated - before} tokens evaluated, fewer than the turn's")
    if done.usage.completion_tokens != n + 1 or t.generation_s <= 0:
        raise BackendError(f"tg: the turn generated {done.usage.completion_tokens} tokens, expected {n + 1}")
    return done


def _last_done(events: Any) -> Done:
    done = None
    for ev in events:
        if isinstance(ev, Done):
            done = ev
    if done is None:
        raise BackendError("the turn ended without a result")
    return done


def warm_up(e: Engine, prompts: Prompts, seed: int) -> None:
    """One short prompt and a few tokens before timing, as llama-bench warms up: the first
    decodes on a GPU pay for kernel loading and graph capture."""
    _last_done(e.generate_ids(prompts(32), Limits(raw=True, max_tokens=4, seed=seed)))


def time_to_first_token(e: Engine, n: int, prompts: Prompts, seed: int) -> float:
    """Seconds from a turn's start to its first token, for a random n-token raw prompt."""
    done = _last_done(e.generate_ids(prompts(n), Limits(raw=True, max_tokens=1, seed=seed)))
    if done.timings.ttft_s is None or done.timings.cached_prompt_tokens:
        raise BackendError(f"ttft {n}: the turn produced no first token from an empty cache")
    return done.timings.ttft_s


# ------------------------------------------------------------------------------------ memory

def _reset_peak_rss() -> None:
    """Start a new VmHWM high-water mark (Linux ≥ 4.0); elsewhere the mark stays cumulative."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int | None:
    """The process's resident-set high-water mark (VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_bytes(pid: int | None = None) -> int | None:
    """NVIDIA device memory held by ``pid`` (all GPUs): NVML, else nvidia-smi; None if neither
    sees the process (no GPU, no driver, or a container that hides host pids)."""
    pid = pid or os.getpid()
    used = _nvml_bytes(pid)
    return used if used is not None else _smi_bytes(pid)


def _nvml_bytes(pid: int) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, no library, no driver
        return None
    try:
        used = [p.usedGpuMemory or 0
                for i in range(pynvml.nvmlDeviceGetCount())
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))
                if p.pid == pid]
        return sum(used) if used else None
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def _smi_bytes(pid: int) -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(cols[1]) * MiB for line in out.splitlines()
            if len(cols := [c.strip() for c in line.split(",")]) == 2 and cols[0] == str(pid) and cols[1].isdigit()]
    return sum(used) if used else None


# ------------------------------------------------------------------------------------ the run

def stat(values: list[float]) -> Stat:
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)


def _check_sizes(settings: LoadSettings, sizes: Sizes, reps: int) -> None:
    if reps < 1:
        raise BadInputError("reps must be at least 1")
    if min(sizes.pp, sizes.tg, *sizes.ttft) < 1:
        raise BadInputError("every test size must be at least 1 token")
    for name, n in (("pp", sizes.pp), ("tg", sizes.tg)):
        if n > settings.n_ctx:
            raise BadInputError(f"{name}{n} needs a context of {n}; the planned one is {settings.n_ctx}")


def run_bench(settings: LoadSettings, sizes: Sizes = Sizes(), reps: int = 3, seed: int = 1234,
              notes: list[str] | None = None) -> BenchResult:
    """Load the model ``reps`` times; each time run pp, tg and the TTFT prompts that fit."""
    _check_sizes(settings, sizes, reps)
    fits = [n for n in sizes.ttft if n < settings.n_ctx]  # a prompt needs one free cell for its token
    rng = random.Random(seed)
    runs: dict[str, list[float]] = {}
    system_info, on_device = "", False
    for rep in range(reps):
        _reset_peak_rss()
        e = Engine(settings)
        try:
            system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
            on_device = e.backend_sampling
            prompts = Prompts(rng, e.n_vocab)
            warm_up(e, prompts, seed)
            figures = {"load_s": e.load_s, "pp": prompt_rate(e, sizes.pp, prompts),
                       **_tg_figures(e, sizes.tg, prompts, seed + rep)}
            figures |= {f"ttft{n}": time_to_first_token(e, n, prompts, seed + rep) for n in fits}
            figures |= {"rss": peak_rss(), "gpu": gpu_bytes()}
        finally:
            e.close()
        for k, v in figures.items():
            runs.setdefault(k, []).append(v)
    n_ctx = settings.n_ctx
    ttft = [TTFT(n, stat(runs[f"ttft{n}"])) if n in fits else
            TTFT(n, None, f"a prompt of {n} tokens needs a context of {n + 1}; the planned one is {n_ctx}")
            for n in sizes.ttft]
    maybe = {k: stat(runs[k]) if None not in runs[k] else None for k in ("rss", "gpu")}
    return BenchResult(
        model_path=settings.model_path, settings=settings, reps=reps, system_info=system_info,
        load_s=stat(runs["load_s"]), pp_tokens=sizes.pp, pp_tokens_per_s=stat(runs["pp"]),
        tg_tokens=sizes.tg, tg_tokens_per_s=stat(runs["tg"]), ttft=ttft,
        peak_rss_bytes=maybe["rss"], gpu_bytes=maybe["gpu"], notes=list(notes or []), backend_sampling=on_device,
        tg_speculative=speculative_tg(settings.speculate, runs))


def _tg_figures(e: Engine, n: int, prompts: Prompts, seed: int) -> dict[str, float]:
    """tg plain (speculate=off), then with the engine's own mode unless that is off: tokens/s
    and the guesses drafted and accepted."""
    figures = {"tg": generation_rate(e, n, prompts, seed, speculate=False)}
    if e.settings.speculate != "off":
        t = generation_turn(e, n, prompts, seed).timings
        figures |= {"tg_spec": n / t.generation_s, "drafted": t.drafted_tokens, "accepted": t.accepted_tokens}
    return figures


def speculative_tg(mode: str, runs: dict[str, list[float]]) -> SpeculativeTG | None:
    """The speculative tg of every rep's figures (None for speculate=off)."""
    if mode == "off":
        return None
    drafted, accepted = int(sum(runs["drafted"])), int(sum(runs["accepted"]))
    rate = stat(runs["tg_spec"])
    return SpeculativeTG(mode, rate, drafted, accepted, accepted / drafted if drafted else None,
                         rate.mean / statistics.fmean(runs["tg"]))
