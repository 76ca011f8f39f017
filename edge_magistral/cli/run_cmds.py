"""``run`` (one-shot) and ``chat`` (interactive): load through the planner, stream, report."""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import click
from rich.markup import escape

from edge_magistral import loader
from edge_magistral.cli.group import cli
from edge_magistral.cli.render import err_console
from edge_magistral.errors import BadInputError, WatchdogStopError
from edge_magistral.generation import DEFAULT_LIMITS


def _load(model: str | None, ctx: int | None, n_gpu_layers: int | None, profile: str | None, quiet: bool,
          yes: bool = False):
    """Open the model for one request at a time; unless quiet, say what the planner decided and
    show a spinner while it loads."""
    req = loader.ModelRequest(model=model, ctx=ctx, n_gpu_layers=n_gpu_layers, parallel=1, profile=profile)
    try:
        opened = _open(req, quiet)
    except loader.NoModelError:  # first run: the pull asks first, outside the spinner
        from edge_magistral.cli.store_cmds import model_for_run

        opened = _open(replace(req, model=model_for_run(None, yes, profile)), quiet)
    return opened.engine, opened.plan


def _open(req, quiet: bool):
    if quiet:
        return loader.open_model(req)

    def announce(p) -> None:
        err_console().print(f"[bold]{escape(Path(p.model_path).name)}[/bold] ({p.quant}): {p.n_gpu_layers} layers "
                            f"on GPU, context {p.n_ctx}, KV {p.type_k}, profile {p.profile}")

    with err_console().status("loading model…"):
        return loader.open_model(req, on_plan=announce)


def _limits(think_budget, max_tokens, temperature, seed, json_schema, system_mode):
    from edge_magistral.generation import Limits

    schema = None
    if json_schema is not None:
        try:
            schema = json.loads(Path(json_schema).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadInputError(f"{json_schema}: cannot read a JSON schema ({e})") from None
    return Limits(think_budget=think_budget, max_tokens=max_tokens, temperature=temperature, seed=seed,
                  json_schema=schema, system_mode=system_mode)


def _stream(engine, messages, limits, show_thinking: bool, echo: bool):
    """Run one turn; stream the answer to stdout (and thinking, dimmed, to stderr)."""
    from edge_magistral.generation import AnswerText, Done, ThinkingText, WatchdogAction

    answer, reasoning, done = [], [], None
    for ev in engine.generate(messages, limits):
        if isinstance(ev, ThinkingText):
            reasoning.append(ev.text)
            if show_thinking:
                err_console().print(ev.text, style="dim", end="", markup=False)
        elif isinstance(ev, AnswerText):
            answer.append(ev.text)
            if echo:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        elif isinstance(ev, WatchdogAction) and show_thinking:
            err_console().print(f"\n[watchdog: {ev.action} ({ev.reason})]", style="yellow", markup=False)
        elif isinstance(ev, Done):
            done = ev
    if echo:
        sys.stdout.write("\n")
    return "".join(answer), "".join(reasoning), done


def _audit(path: str | None, redact: str, plan, messages, reasoning, answer, done, sha: str) -> None:
    if not path:
        return
    from edge_magistral.audit import AuditLog, AuditRecord

    AuditLog(Path(path), redact=redact).append(AuditRecord(
        request_id=uuid.uuid4().hex, model_sha256=sha, quant=plan.quant, plan=plan.to_dict(),
        sampling=done.sampling, prompt=[asdict(m) for m in messages], thinking=reasoning, answer=answer,
        watchdog_events=done.watchdog_events, usage=asdict(done.usage), finish_reason=done.finish_reason,
        timings=asdict(done.timings)))


_common = [
    click.option("--model", default=None,
                 help=f"GGUF file, or a quant in the model store (default: ${loader.MODEL_ENV}, else the store; "
                      "with no model at all, a first run offers to pull one)."),
    click.option("--think-budget", type=click.IntRange(min=0), default=None,
                 help="Max thinking tokens per turn (0: answer without thinking; default: the profile's)."),
    click.option("--max-tokens", type=click.IntRange(min=1), default=DEFAULT_LIMITS.max_tokens, show_default=True,
                 help="Max generated tokens per turn (thinking + answer)."),
    click.option("--system", default=None, help="System prompt (see --system-mode)."),
    click.option("--system-mode", type=click.Choice(["replace", "extend"]), default="replace", show_default=True,
                 help="replace: your system prompt replaces Magistral's default (and its reasoning template); "
                      "extend: it is appended to the default."),
    click.option("--temperature", type=float, default=DEFAULT_LIMITS.temperature, show_default=True,
                 help="Sampling temperature (raised to 0.5 while thinking: greedy reasoning loops)."),
    click.option("--seed", type=int, default=None, help="Sampling seed (reproducible runs)."),
    click.option("--ctx", type=click.IntRange(min=256), default=None, help="Override the planned context."),
    click.option("--n-gpu-layers", type=click.IntRange(min=0), default=None, help="Override planned GPU layers."),
    click.option("--profile", default=None, help="Hardware profile to plan with."),
    click.option("--show-thinking", is_flag=True, help="Show the reasoning, dimmed, on stderr."),
    click.option("--audit-log", default=None, type=click.Path(dir_okay=False),
                 help="Append a hash-chained record of each turn to this JSONL file."),
    click.option("--redact", type=click.Choice(["none", "thinking", "prompt", "all"]), default="none",
                 show_default=True, help="What the audit record stores only as a sha256."),
]


def common_options(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@cli.command()
@click.argument("prompt", required=False)
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Append this document to the prompt (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option("--json-schema", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Constrain the answer (not the thinking) to this JSON schema.")
@click.option("--yes", "-y", is_flag=True, help="First run with no model: pull the planned one without asking.")
@common_options
def run(prompt, files, as_json, json_schema, yes, model, think_budget, max_tokens, system, system_mode,
        temperature, seed, ctx, n_gpu_layers, profile, show_thinking, audit_log, redact) -> None:
    """Answer one PROMPT (or stdin) and exit. The answer streams to stdout.

    Exit codes: 2 bad input, 3 no model, 5 does not fit, 6 stopped by the watchdog (answer cut),
    130 interrupted."""
    from edge_magistral.chat import Message

    text = prompt if prompt not in (None, "-") else (sys.stdin.read() if not sys.stdin.isatty() else "")
    for f in files:
        text += f"\n\n{Path(f).read_text(encoding='utf-8', errors='replace')}"
    if not text.strip():
        raise BadInputError("no prompt: give it as an argument, on stdin, or with --file")
    limits = _limits(think_budget, max_tokens, temperature, seed, json_schema, system_mode)
    engine, plan = _load(model, ctx, n_gpu_layers, profile, quiet=as_json, yes=yes)
    messages = ([Message("system", system)] if system else []) + [Message("user", text)]
    try:
        answer, reasoning, done = _stream(engine, messages, limits, show_thinking and not as_json, not as_json)
    finally:
        engine.close()
    sha = loader.model_sha256(engine.settings.model_path) if (as_json or audit_log) else ""
    _audit(audit_log, redact, plan, messages, reasoning, answer, done, sha)
    if as_json:
        click.echo(json.dumps({
            "answer": answer, "reasoning": reasoning, "finish_reason": done.finish_reason,
            "stop_reason": done.stop_reason, "reasoning_truncated": done.reasoning_truncated,
            "watchdog_events": done.watchdog_events, "usage": {**asdict(done.usage),
                                                                "completion_tokens": done.usage.completion_tokens},
            "timings": asdict(done.timings), "sampling": done.sampling, "plan": plan.to_dict(),
            "model": {"path": engine.settings.model_path, "sha256": sha, "quant": plan.quant},
        }, indent=2, ensure_ascii=False))
    if done.finish_reason == "length":
        raise WatchdogStopError(f"the answer was cut: {done.stop_reason} "
                                f"(raise --max-tokens or --think-budget, or check the watchdog events)")


@cli.command()
@common_options
def chat(model, think_budget, max_tokens, system, system_mode, temperature, seed, ctx, n_gpu_layers, profile,
         show_thinking, audit_log, redact) -> None:
    """Interactive multi-turn chat. Commands: /reset (forget the conversation), /think N (think
    budget for the next turns; 0 = no thinking), /exit. Earlier turns' thinking is not kept."""
    from edge_magistral.chat import Message

    engine, plan = _load(model, ctx, n_gpu_layers, profile, quiet=False)
    history: list[Message] = [Message("system", system)] if system else []
    budget = think_budget
    sha = loader.model_sha256(engine.settings.model_path) if audit_log else ""
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history = history[:1] if system else []
                err_console().print("conversation reset")
                continue
            if cmd.startswith("/think"):
                parts = cmd.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    err_console().print("usage: /think N")
                    continue
                budget = int(parts[1])
                err_console().print(f"think budget: {budget} tokens")
                continue
            history.append(Message("user", line))
            limits = _limits(budget, max_tokens, temperature, seed, None, system_mode)
            try:
                answer, reasoning, done = _stream(engine, history, limits, show_thinking, True)
            except KeyboardInterrupt:
                history.pop()
                err_console().print("\n(interrupted)")
                continue
            except BadInputError as e:
                history.pop()
                err_console().print(f"error: {e}", style="red", markup=False)
                continue
            history.append(Message("assistant", answer))
            _audit(audit_log, redact, plan, history[:-1], reasoning, answer, done, sha)
            if done.finish_reason == "length":
                err_console().print(f"[answer cut: {done.stop_reason}]", style="yellow", markup=False)
    finally:
        engine.close()
