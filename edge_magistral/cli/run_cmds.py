"""``run`` (one-shot) and ``chat`` (interactive): load through the planner, stream, report.

Both build their requests as the service does (:mod:`edge_magistral.cli.tool_io`), tools included:
``run`` prints the assistant message with its calls and exits 10, ``chat`` asks for the results."""

from __future__ import annotations

import functools
import itertools
import json
import sys
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import click
from rich.markup import escape

from edge_magistral import loader
from edge_magistral.cli import tool_io
from edge_magistral.cli.cluster_opts import CLUSTER_OPTIONS, cluster_of
from edge_magistral.cli.group import cli, stacked
from edge_magistral.cli.render import err_console
from edge_magistral.cli.speculate_opts import SPECULATE_OPTIONS, speculation
from edge_magistral.errors import TOOL_CALLS_EXIT, BadInputError, ToolCallError, WatchdogStopError
from edge_magistral.generation import DEFAULT_LIMITS


def _load(model: str | None, ctx: int | None, n_gpu_layers: int | None, profile: str | None, quiet: bool,
          yes: bool = False, speculate: tuple[str | None, str | None] = (None, None), cluster=None):
    """Open the model for one request at a time; unless quiet, say what the planner decided and
    show a spinner while it loads. ``speculate``: the mode and draft model asked (:func:`speculation`);
    ``cluster``: the RPC workers to place layers on (:func:`cluster_of`)."""
    req = loader.ModelRequest(model=model, ctx=ctx, n_gpu_layers=n_gpu_layers, parallel=1, profile=profile,
                              speculate=speculate[0], draft_model=speculate[1], cluster=cluster)
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


def _limits(think_budget, max_tokens, temperature, seed, json_schema, system_mode, tools=None):
    from edge_magistral.generation import Limits

    schema = None
    if json_schema is not None:
        if tools is not None:
            raise BadInputError("--json-schema and tool calls together are not supported: "
                                "drop --json-schema, or give --tool-choice none")
        try:
            schema = json.loads(Path(json_schema).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadInputError(f"{json_schema}: cannot read a JSON schema ({e})") from None
    return Limits(think_budget=think_budget, max_tokens=max_tokens, temperature=temperature, seed=seed,
                  json_schema=schema, system_mode=system_mode, tools=tools)


def _stream(engine, conv, limits, show_thinking: bool, echo: bool):
    """Run one turn of the conversation; stream the answer to stdout (and thinking, dimmed, to
    stderr). Tool calls come whole in the Done event (``done.tool_calls``)."""
    from edge_magistral.generation import AnswerText, Done, ThinkingText, WatchdogAction

    answer, reasoning, done = [], [], None
    ids = engine.prompt_ids(conv.messages, conv.system_mode, conv.tools)
    for ev in engine.generate_ids(ids, limits):
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


def _audit(path: str | None, redact: str, plan, conv, reasoning, answer, done, sha: str) -> None:
    """One turn's record, its prompt and calls in the form the service logs (audit.chat_prompt)."""
    if not path:
        return
    from edge_magistral.audit import AuditLog, AuditRecord, chat_prompt

    AuditLog(Path(path), redact=redact).append(AuditRecord(
        request_id=uuid.uuid4().hex, model_sha256=sha, quant=plan.quant, plan=plan.to_dict(),
        sampling=done.sampling, prompt=chat_prompt(conv), thinking=reasoning, answer=answer,
        tool_calls=done.tool_calls, tool_error=done.tool_error,
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
    *SPECULATE_OPTIONS,
    *CLUSTER_OPTIONS,
]


common_options = stacked(_common)


_run_tool_options = [
    click.option("--messages", "messages_path", default=None, metavar="CONVERSATION.json",
                 help="Start from this conversation: an OpenAI messages list, or a request body (messages, "
                      "tools, tool_choice, parallel_tool_calls, system_mode; other fields are ignored); "
                      "'-' reads stdin. A PROMPT given too is appended as a user message."),
    click.option("--tools", "tools_path", default=None, metavar="TOOLS.json",
                 help="Functions the model may call: an OpenAI tools list, or an object with a 'tools' key."),
    click.option("--tool-choice", default=None, metavar="auto|required|none|NAME",
                 help="auto (the default with tools): the model decides; required: it calls one or more tools; "
                      "none: it may not call; NAME: it calls that function."),
    click.option("--no-parallel-tool-calls", "no_parallel", is_flag=True, help="At most one tool call per turn."),
    click.option("--save-conversation", default=None, metavar="PATH", type=click.Path(dir_okay=False),
                 help="Write the conversation and the model's reply (its answer or its tool calls) to PATH, "
                      "atomically: a messages list, or a request body when --messages gave one."),
]


_tool_options = stacked(_run_tool_options)


@cli.command()
@click.argument("prompt", required=False)
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Append this document to the prompt (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option("--json-schema", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Constrain the answer (not the thinking) to this JSON schema.")
@_tool_options
@click.option("--yes", "-y", is_flag=True, help="First run with no model: pull the planned one without asking.")
@common_options
def run(prompt, files, as_json, json_schema, messages_path, tools_path, tool_choice, no_parallel, save_conversation,
        yes, model, think_budget, max_tokens, system, system_mode, temperature, seed, ctx, n_gpu_layers, profile,
        show_thinking, audit_log, redact, speculate, draft_model, workers, cluster_file, allow_public_worker) -> None:
    """Answer one PROMPT (or stdin, or the conversation of --messages) and exit. The answer
    streams to stdout.

    With --tools the model may call them instead of answering. Then stdout is the assistant
    message, OpenAI's JSON (content, reasoning_content, tool_calls with ids and arguments), and
    the exit code is 10. Run the calls, append that message and one {"role": "tool",
    "tool_call_id": ..., "content": ...} per call to the conversation (--save-conversation writes
    the message for you), and run again with --messages. While calls are possible the answer is
    printed when the turn ends, not streamed. With --json the object's "message" is that
    assistant message (and the exit code is 10 too).

    \b
    Exit codes: 0 answered, 10 tool calls (stdout: the assistant message), 2 bad input,
    3 no model, 5 does not fit, 6 stopped by the watchdog (answer cut), 7 cannot write
    --save-conversation, 9 the model botched a tool call (none was made), 130 interrupted."""
    spec = speculation(speculate, draft_model)  # refused before the prompt is read
    cluster = cluster_of(workers, cluster_file, allow_public_worker)
    req = tool_io.build_request(_request_options(prompt, files, messages_path, tools_path, tool_choice, no_parallel,
                                                 system, system_mode))
    use = req.conversation.tool_use()
    limits = _limits(think_budget, max_tokens, temperature, seed, json_schema, req.conversation.system_mode, use)
    engine, plan = _load(model, ctx, n_gpu_layers, profile, quiet=as_json, yes=yes, speculate=spec, cluster=cluster)
    try:
        answer, reasoning, done = _stream(engine, req.conversation, limits, show_thinking and not as_json,
                                          echo=not as_json and use is None)
    finally:
        engine.close()
    sha = loader.model_sha256(engine.settings.model_path) if (as_json or audit_log) else ""
    _audit(audit_log, redact, plan, req.conversation, reasoning, answer, done, sha)
    message = tool_io.reply_message(answer, reasoning, done)
    if as_json:
        click.echo(json.dumps(_json_result(answer, reasoning, done, message, plan, engine, sha),
                              indent=2, ensure_ascii=False))
    elif use is not None:  # held until the end: the turn might have become calls
        click.echo(json.dumps(message, indent=2, ensure_ascii=False) if message.get("tool_calls") else answer)
    _finish(done, req, message, save_conversation)


def _request_options(prompt, files, messages_path, tools_path, tool_choice, no_parallel, system,
                     system_mode) -> tool_io.RequestOptions:
    """The prompt text (argument, stdin, --file) and what the options add to the request."""
    from click.core import ParameterSource

    from_stdin = prompt == "-" or (prompt is None and messages_path is None)
    if from_stdin and messages_path == "-":
        raise BadInputError("--messages - reads stdin: give the prompt as an argument")
    text = prompt or ""
    if from_stdin:
        text = sys.stdin.read() if not sys.stdin.isatty() else ""
    for f in files:
        text += f"\n\n{Path(f).read_text(encoding='utf-8', errors='replace')}"
    if messages_path is None and not text.strip():
        raise BadInputError("no prompt: give it as an argument, on stdin, or with --file")
    mode_given = click.get_current_context().get_parameter_source("system_mode") is not ParameterSource.DEFAULT
    return tool_io.RequestOptions(messages_path=messages_path, tools_path=tools_path, tool_choice=tool_choice,
                                  parallel_tool_calls=False if no_parallel else None, system=system,
                                  system_mode=system_mode if mode_given else None, prompt=text)


def _json_result(answer, reasoning, done, message, plan, engine, sha: str) -> dict:
    return {
        "answer": answer, "reasoning": reasoning, "finish_reason": done.finish_reason,
        "stop_reason": done.stop_reason, "reasoning_truncated": done.reasoning_truncated,
        "message": message, "tool_error": done.tool_error,
        "watchdog_events": done.watchdog_events, "usage": {**asdict(done.usage),
                                                            "completion_tokens": done.usage.completion_tokens},
        "timings": asdict(done.timings), "sampling": done.sampling, "plan": plan.to_dict(),
        "model": {"path": engine.settings.model_path, "sha256": sha, "quant": plan.quant,
                  "speculate": engine.settings.speculate, "draft_model": engine.settings.draft_model},
    }


def _finish(done, req: tool_io.RunRequest, message: dict, save_path: str | None) -> None:
    """Save the conversation and exit: 10 for calls, 0 for an answer; 6 (cut) and 9 (a botched call) save nothing."""
    if done.finish_reason == "length":
        raise WatchdogStopError(f"the answer was cut: {done.stop_reason} "
                                f"(raise --max-tokens or --think-budget, or check the watchdog events)")
    if done.tool_error:
        raise ToolCallError(f"the model's tool call was unusable, so no call was made: {done.tool_error} "
                            f"(run again, or with another --seed)")
    if save_path:
        tool_io.save_conversation(save_path, req, message)
    if done.finish_reason == "tool_calls":
        click.get_current_context().exit(TOOL_CALLS_EXIT)


@cli.command()
@click.option("--tools", "tools_path", default=None, metavar="TOOLS.json",
              help="Functions the model may call (an OpenAI tools list, or an object with a 'tools' key): "
                   "you type each call's result.")
@click.option("--tool-choice", default=None, metavar="auto|required|none|NAME",
              help="For the model's first turn after each of your lines (later turns of the exchange are "
                   "auto, so it can answer): auto (default), required, none, or a function NAME.")
@click.option("--no-parallel-tool-calls", "no_parallel", is_flag=True, help="At most one tool call per turn.")
@common_options
def chat(tools_path, tool_choice, no_parallel, model, think_budget, max_tokens, system, system_mode, temperature,
         seed, ctx, n_gpu_layers, profile, show_thinking, audit_log, redact, speculate, draft_model, workers,
         cluster_file, allow_public_worker) -> None:
    """Interactive multi-turn chat. Commands: /reset (forget the conversation), /think N (think
    budget for the next turns; 0 = no thinking), /exit. Earlier answers' thinking is not kept.

    With --tools the model may call them: each call is shown (name, id, arguments) and you type
    its result on one line; the model goes on until it answers in text. The thinking that led to
    a call is kept in the conversation."""
    tools = tool_io.chat_tools(tools_path, tool_choice, False if no_parallel else None)  # bad input first
    engine, plan = _load(model, ctx, n_gpu_layers, profile, quiet=False, speculate=speculation(speculate, draft_model),
                         cluster=cluster_of(workers, cluster_file, allow_public_worker))
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    budget = think_budget
    sha = loader.model_sha256(engine.settings.model_path) if audit_log else ""
    audit = functools.partial(_audit, audit_log, redact, plan, sha=sha)
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
            elif cmd.startswith("/think"):
                budget = _think_command(cmd, budget)
            else:
                limits = _limits(budget, max_tokens, temperature, seed, None, system_mode)
                history = _chat_exchange(engine, history, line, tools, limits, show_thinking, audit)
    finally:
        engine.close()


def _think_command(cmd: str, budget: int | None) -> int | None:
    parts = cmd.split()
    if len(parts) != 2 or not parts[1].isdigit():
        err_console().print("usage: /think N")
        return budget
    err_console().print(f"think budget: {parts[1]} tokens")
    return int(parts[1])


def _chat_exchange(engine, history: list[dict], line: str, tools: tool_io.ChatTools, limits, show_thinking: bool,
                   audit) -> list[dict]:
    """One user line, answered: turns until the model answers in text, each call's result typed
    by the user. Returns the history with the exchange, or as it was after an interruption or
    an error (a half exchange is dropped)."""
    from edge_magistral.tools import conversation_from_request

    messages = [*history, {"role": "user", "content": line}]
    try:
        for turn in itertools.count():
            conv = conversation_from_request(tools.body(messages, limits.system_mode, first=turn == 0))
            answer, reasoning, done = _stream(engine, conv, replace(limits, tools=conv.tool_use()),
                                              show_thinking, True)
            audit(conv, reasoning, answer, done)
            message = tool_io.reply_message(answer, reasoning, done)
            if not message.get("tool_calls"):
                _chat_notes(done)
                return [*messages, message] if answer else messages
            messages += [message, *_ask_results(done.tool_calls)]
    except KeyboardInterrupt:
        err_console().print("\n(interrupted)")
    except EOFError:
        err_console().print("\n(no result given: this exchange is dropped)")
    except BadInputError as e:
        err_console().print(f"error: {e}", style="red", markup=False)
    return history


def _chat_notes(done) -> None:
    if done.finish_reason == "length":
        err_console().print(f"[answer cut: {done.stop_reason}]", style="yellow", markup=False)
    if done.tool_error:
        err_console().print(f"[no tool call: the output left the call format ({done.tool_error})]",
                            style="yellow", markup=False)


def _ask_results(calls) -> list[dict]:
    """Show the calls, then read each one's result (a line) from the user: the tool messages."""
    for text in tool_io.call_lines(calls):
        click.echo(f"tool call: {text}")
    return [{"role": "tool", "tool_call_id": c.id, "content": input(f"result of {c.name} ({c.id})> ")}
            for c in calls]
