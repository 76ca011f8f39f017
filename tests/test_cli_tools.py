"""Tool calling from the command line, on the tiny random Magistral (the real engine, no fake).

``run --tools`` prints the assistant message with its calls and exits 10; the message and a
tool result fed back with ``--messages`` run again; ``chat --tools`` shows a call and takes its
result from the user. The random model's calls are valid because decoding makes them so: every
complete call is checked against the tool's schema with jsonschema. It rarely ends a turn on its
own, so some seeds run into --max-tokens (exit 6, no call reported): the tests try a few seeds
until one completes, and check every run on the way.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner, Result

from edge_magistral.errors import TOOL_CALLS_EXIT, BadInputError, ToolCallError, WatchdogStopError

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": WEATHER}}]
SMALL = ("--ctx", "1024", "--think-budget", "0", "--max-tokens", "48")
SEEDS = (2, 3, 1, 4, 5, 6)  # 2 and 3 complete one call in 48 tokens; the rest are spares


def cli_run(*args: str, input: str | None = None) -> Result:
    from edge_magistral.cli import cli, run_cmds  # noqa: F401  (registers run and chat)

    return CliRunner().invoke(cli, list(args), input=input)


def write(path: Path, value: object) -> str:
    path.write_text(json.dumps(value), encoding="utf-8")
    return str(path)


def check_calls(message: dict) -> list[dict]:
    """The message's calls, each an OpenAI tool call whose arguments the schema accepts."""
    assert message["role"] == "assistant" and message["tool_calls"], message
    for call in message["tool_calls"]:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    return message["tool_calls"]


def run_until_calls(model: Path, *args: str) -> tuple[int, Result]:
    """The first seed whose run exits 10. Every other run must be a cut turn (exit 6) with no call."""
    for seed in SEEDS:
        r = cli_run("run", "--model", str(model), *SMALL, "--seed", str(seed), *args)
        if r.exit_code == TOOL_CALLS_EXIT:
            return seed, r
        assert r.exit_code == WatchdogStopError.exit_code, r.output
        assert "tool_calls" not in r.stdout
    pytest.fail("no seed completed a tool call")


@pytest.fixture
def tools_file(tmp_path: Path) -> str:
    return write(tmp_path / "tools.json", TOOLS)


def test_required_prints_the_assistant_message_and_exits_10(tiny_gguf_f32: Path, tools_file: str,
                                                             tmp_path: Path) -> None:
    saved = tmp_path / "conversation.json"
    _, r = run_until_calls(tiny_gguf_f32, "--tools", tools_file, "--tool-choice", "required",
                           "--no-parallel-tool-calls", "--save-conversation", str(saved), "Weather in Paris?")
    message = json.loads(r.stdout)  # stdout is the message and nothing else
    assert message["content"] is None and len(check_calls(message)) == 1
    assert json.loads(saved.read_text()) == [{"role": "user", "content": "Weather in Paris?"}, message]


def test_tool_choice_none_never_calls(tiny_gguf_f32: Path, tools_file: str) -> None:
    """The seed that calls under required answers in text under none (same prompt, same sampling)."""
    seed, called = run_until_calls(tiny_gguf_f32, "--tools", tools_file, "--tool-choice", "required", "--json", "Hi")
    assert check_calls(json.loads(called.stdout)["message"])
    r = cli_run("run", "--model", str(tiny_gguf_f32), *SMALL, "--seed", str(seed), "--tools", tools_file,
                "--tool-choice", "none", "--json", "Hi")
    assert r.exit_code in (0, WatchdogStopError.exit_code), r.output
    out = json.loads(r.stdout)
    assert out["finish_reason"] in ("stop", "length") and out["tool_error"] is None
    assert out["message"] == {"role": "assistant", "content": out["answer"]}


def test_a_tool_result_fed_back_runs_the_next_turn(tiny_gguf_f32: Path, tools_file: str, tmp_path: Path) -> None:
    """The loop a script runs: exit 10, run the tool, append its result, run again with --messages
    (here a request body with the tools in it, which is saved back as a body)."""
    conv = tmp_path / "conversation.json"
    run_until_calls(tiny_gguf_f32, "--tools", tools_file, "--tool-choice", "get_weather", "--no-parallel-tool-calls",
                    "--save-conversation", str(conv), "Weather in Paris?")
    messages = json.loads(conv.read_text())
    [call] = check_calls(messages[-1])
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'})
    body = write(tmp_path / "request.json", {"messages": messages, "tools": TOOLS, "tool_choice": "required",
                                             "parallel_tool_calls": False, "note": "kept"})
    audit, out = tmp_path / "audit.jsonl", tmp_path / "next.json"
    _, second = run_until_calls(tiny_gguf_f32, "--messages", body, "--save-conversation", str(out),
                                "--audit-log", str(audit))
    record = json.loads(audit.read_text().splitlines()[-1])  # the turn's prompt, as the service logs it
    assert record["prompt"]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": call["id"]}]
    assert record["prompt"]["tool_choice"] == "required" and record["prompt"]["parallel_tool_calls"] is False
    [new] = json.loads(second.stdout)["tool_calls"]
    assert record["output"]["tool_calls"] == [{"id": new["id"], "name": "get_weather",
                                               "arguments": new["function"]["arguments"]}]
    saved = json.loads(out.read_text())
    assert saved["note"] == "kept" and saved["tools"] == TOOLS
    assert saved["messages"] == [*messages, json.loads(second.stdout)]
    assert len(check_calls(saved["messages"][-1])) == 1  # parallel_tool_calls false


def test_a_call_that_breaks_its_schema_is_no_call_and_exits_9(tiny_gguf_f32: Path, tmp_path: Path) -> None:
    """multipleOf is checked after the call (the grammar cannot say it): the random model's integer
    is rarely a multiple of 7, and such a call is refused, not printed, not saved."""
    lucky = {"type": "object", "required": ["n"], "additionalProperties": False,
             "properties": {"n": {"type": "integer", "multipleOf": 7}}}
    tools = write(tmp_path / "lucky.json", [{"type": "function", "function": {"name": "lucky", "parameters": lucky}}])
    for seed in SEEDS:
        saved = tmp_path / f"conversation-{seed}.json"
        r = cli_run("run", "--model", str(tiny_gguf_f32), *SMALL, "--seed", str(seed), "--tools", tools,
                    "--tool-choice", "required", "--save-conversation", str(saved), "Pick a number")
        if r.exit_code == ToolCallError.exit_code:
            break
        assert r.exit_code in (TOOL_CALLS_EXIT, WatchdogStopError.exit_code), r.output
        for call in json.loads(r.stdout)["tool_calls"] if r.exit_code == TOOL_CALLS_EXIT else ():
            jsonschema.validate(json.loads(call["function"]["arguments"]), lucky)
    else:
        pytest.fail("every seed's call was a multiple of 7")
    assert "tool_calls" not in r.stdout and not saved.exists()
    [error] = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # after the plan's line
    assert "not a multiple of 7" in error, r.stderr


@pytest.mark.parametrize(("files", "args", "says"), [
    ({"tools.json": {"x": 1}}, ["--tools", "tools.json", "hi"], "'tools' key"),
    ({"tools.json": "[not json"}, ["--tools", "tools.json", "hi"], "not JSON"),
    ({"tools.json": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     ["--tools", "tools.json", "hi"], "must describe an object"),
    ({"tools.json": TOOLS}, ["--tools", "tools.json", "--tool-choice", "get_time", "hi"], "not one of the tools"),
    ({}, ["--tool-choice", "required", "hi"], "needs tools"),
    ({}, ["--tools", "missing.json", "hi"], "cannot read"),
    ({"m.json": {"msgs": []}}, ["--messages", "m.json"], "messages list"),
    ({"m.json": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "user", "content": "and?"}]}, ["--messages", "m.json"], "have no tool message"),
    ({"m.json": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
     ["--messages", "m.json", "--system", "be long"], "give one of them"),
    ({}, ["--messages", "-", "-"], "reads stdin"),
    ({"tools.json": TOOLS, "s.json": {"type": "object"}}, ["--tools", "tools.json", "--json-schema", "s.json", "hi"],
     "not supported"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_gguf_f32: Path, tmp_path: Path, monkeypatch, files: dict,
                                          args: list[str], says: str) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in files.items():
        Path(name).write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    r = cli_run("run", "--model", str(tiny_gguf_f32), *args)
    assert r.exit_code == BadInputError.exit_code, r.output
    assert r.stdout == "" and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_chat_shows_a_call_and_takes_its_result(tiny_gguf_f32: Path, tools_file: str, tmp_path: Path) -> None:
    """The typed result becomes the tool message of the next turn (read back from the audit log)."""
    for seed in SEEDS:
        audit = tmp_path / f"audit-{seed}.jsonl"
        r = cli_run("chat", "--model", str(tiny_gguf_f32), *SMALL, "--seed", str(seed), "--tools", tools_file,
                    "--tool-choice", "required", "--no-parallel-tool-calls", "--audit-log", str(audit),
                    input='Weather in Paris?\n{"temp": 21}\n/exit\n')
        assert r.exit_code == 0, r.output
        if "tool call: get_weather (call_" in r.stdout:
            break
    else:
        pytest.fail("no seed made a call")
    first, second = (json.loads(line) for line in audit.read_text().splitlines())
    [call] = first["output"]["tool_calls"]  # the first turn called; the second read the typed result
    assert first["finish_reason"] == "tool_calls" and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    assert f"tool call: get_weather ({call['id']})" in r.stdout
    assert f"result of get_weather ({call['id']})> " in r.stdout
    assert second["prompt"]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": call["id"], "type": "function", "function": {
            "name": "get_weather", "arguments": call["arguments"]}}]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": call["id"]}]
    # required held for the first turn only: after the result the model may answer
    assert (first["prompt"]["tool_choice"], second["prompt"]["tool_choice"]) == ("required", "auto")

def test_save_conversation_keeps_the_file_form_and_writes_whole_files(tmp_path: Path) -> None:
    from edge_magistral.cli import tool_io
    from edge_magistral.errors import StorageError

    msgs = write(tmp_path / "m.json", [{"role": "user", "content": "hi"}])
    as_list = tool_io.build_request(tool_io.RequestOptions(messages_path=msgs, prompt="and?"))
    reply = {"role": "assistant", "content": "yes"}
    tool_io.save_conversation(msgs, as_list, reply)  # over its own input
    assert json.loads(Path(msgs).read_text()) == [{"role": "user", "content": "hi"},
                                                  {"role": "user", "content": "and?"}, reply]
    body = write(tmp_path / "b.json", {"messages": [{"role": "user", "content": "hi"}], "seed": 3})
    as_body = tool_io.build_request(tool_io.RequestOptions(messages_path=body, system="be brief"))
    out = tmp_path / "out.json"
    tool_io.save_conversation(str(out), as_body, {"role": "assistant", "content": ""})  # nothing said: not kept
    assert json.loads(out.read_text()) == {"messages": [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "hi"}], "seed": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "m.json", "out.json"]  # no temporary left
    with pytest.raises(StorageError):
        tool_io.save_conversation(str(tmp_path / "no-such-dir" / "c.json"), as_list, reply)
