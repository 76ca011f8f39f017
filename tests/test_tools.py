"""Function calling prompts, token for token against mistral-common's v13 encoding.

The reference is mistral-common itself: the same OpenAI-style request body goes through
``ChatCompletionRequest.from_openai`` and ``MistralTokenizer.encode_chat_completion`` (its
validator included) over the tiny checkpoint's tekken.json (Magistral's vocabulary and control
tokens); ours goes through :func:`edge_magistral.tools.conversation_from_request` and the GGUF's
tokenizer. The system prompt is ours to choose (Magistral's default when none is given), so the
reference gets the same one: the default as text and [THINK] chunks, a given one as text.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_magistral import tekken as t
from edge_magistral.chat import DEFAULT_SYSTEM_PROMPT, Message, magistral_prompt, render_template
from edge_magistral.errors import BadInputError
from edge_magistral.generation import MAX_TOOLS
from edge_magistral.tekken import TekkenTokenizer
from edge_magistral.tools import Conversation, conversation_from_request


@pytest.fixture(scope="module")
def tok(tiny_gguf_f32: Path) -> TekkenTokenizer:
    return TekkenTokenizer.from_gguf(tiny_gguf_f32)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json"))


def _system_message(text: str | None, mode: str):
    """mistral-common's system message for ours: the default's [THINK]…[/THINK] as a ThinkChunk."""
    from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
    from mistral_common.protocol.instruct.messages import SystemMessage

    if text is not None and mode == "replace":
        return [SystemMessage(content=text)] if text else []
    a, rest = DEFAULT_SYSTEM_PROMPT.split("[THINK]")
    thought, b = rest.split("[/THINK]")
    b = b if text is None else f"{b}\n\n{text}"
    return [SystemMessage(content=[TextChunk(text=a), ThinkChunk(thinking=thought, closed=True), TextChunk(text=b)])]


def reference_ids(reference, body: dict) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    messages = body["messages"]
    system = None
    if messages[0]["role"] in ("system", "developer"):
        system, messages = messages[0]["content"], messages[1:]
    req = ChatCompletionRequest.from_openai(copy.deepcopy(messages), copy.deepcopy(body.get("tools")))
    req = ChatCompletionRequest(messages=[*_system_message(system, body.get("system_mode", "replace")),
                                          *req.messages], tools=req.tools)
    return reference.encode_chat_completion(req).tokens


def ours(tok: TekkenTokenizer, body: dict) -> list[int]:
    return conversation_from_request(body).prompt_ids(tok.encode)


# ------------------------------------------------------------------------------ the conversations

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}, "strict": True}}
TIME = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
SEARCH = {"type": "function", "function": {
    "name": "search-docs", "description": "Recherche « plein texte » 📚",
    "parameters": {"properties": {"q": {"type": "string"}, "k": {"type": "integer", "minimum": 1}},
                   "type": "object", "required": ["q"], "additionalProperties": False}}}
BARE = {"type": "function", "function": {"name": "ping"}}  # no description, no parameters
TOOLS = [WEATHER, TIME, SEARCH]


def call(cid: str, name: str, arguments: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def result(cid: str, content) -> dict:
    return {"role": "tool", "tool_call_id": cid, "content": content}


def user(text) -> dict:
    return {"role": "user", "content": text}


def assistant(content=None, calls=None, reasoning=None) -> dict:
    m = {"role": "assistant", "content": content}
    if calls:
        m["tool_calls"] = calls
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    return m


CONVERSATIONS = {
    "tools, the official system prompt": {"tools": TOOLS, "messages": [user("Weather in Paris?")]},
    "tools, own system prompt": {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are a terse weather bot."}, user("Weather in Paris?")]},
    "tools, no system prompt": {"tools": TOOLS, "messages": [{"role": "system", "content": ""}, user("Hi")]},
    "tools, system prompt extended": {"tools": [WEATHER], "system_mode": "extend", "messages": [
        {"role": "developer", "content": "Use metric units."}, user("Weather in Oslo?")]},
    "call, result, answer, next question": {"tools": TOOLS, "messages": [
        user("Weather in Paris?"),
        assistant(None, [call("a1b2c3d4e", "get_weather", '{"city": "Paris"}')], "I need the weather tool."),
        result("a1b2c3d4e", "18 °C, cloudy"),
        assistant("It is 18 °C and cloudy in Paris.", reasoning="The tool says 18 °C."),
        user("And in Lyon?")]},
    "parallel calls, prompt ends at the results": {"tools": TOOLS, "messages": [
        user("Weather in Paris and Rome, and the time?"),
        assistant("", [call("aaaaaaaa1", "get_weather", '{"city":"Paris"}'),
                       call("aaaaaaaa2", "get_weather", '{"city":"Rome","unit":"C"}'),
                       call("aaaaaaaa3", "now", "")]),
        result("aaaaaaaa1", "18"), result("aaaaaaaa2", "24"), result("aaaaaaaa3", "12:00")]},
    "results out of order": {"tools": TOOLS, "messages": [
        user("Three things please"),
        assistant(None, [call("bbbbbbbb1", "now", "{}"), call("bbbbbbbb2", "get_weather", '{"city": "Bern"}'),
                         call("bbbbbbbb3", "search-docs", '{"q": "tokens", "k": 3}')], "Three calls."),
        result("bbbbbbbb3", "[]"), result("bbbbbbbb1", "09:30"), result("bbbbbbbb2", "rain")]},
    "thinking kept in earlier turns": {"tools": TOOLS, "messages": [
        user("What time is it?"),
        assistant(None, [call("ccccccccc", "now", "{}")], "Let me check the clock.\n\nOne call."),
        result("ccccccccc", "07:15"),
        assistant([{"type": "text", "text": "It is"}, {"type": "text", "text": "07:15. "}],
                  reasoning="The tool answered 07:15; say it."),
        user("Thanks! Weather?"),
        assistant(None, [call("ddddddddd", "get_weather", '{"city": "Nice"}')], ""),
        result("ddddddddd", "sunny"),
        user("Great")]},
    "unicode in arguments": {"tools": TOOLS, "messages": [
        user("Wetter in Zürich? 東京は？"),
        assistant(None, [call("eeeeeeee1", "get_weather", '{"city": "Z\\u00fcrich"}'),
                         call("eeeeeeee2", "search-docs", '{"q":"東京 👨\u200d👩\u200d👧 «é» \\ud83d\\ude00","k":2}')]),
        result("eeeeeeee1", "Schnee ❄"), result("eeeeeeee2", '{"résultat": "晴れ"}'), user("Merci")]},
    "tools but no call": {"tools": TOOLS, "messages": [
        user("Tell me a joke"), assistant("Why did the tokenizer split? It had [INST] issues."),
        user("Another"), assistant([{"type": "text", "text": "Knock"}, {"type": "text", "text": "knock.  "}]),
        user("Who is there?")]},
    "arguments re-dumped": {"tools": [SEARCH, BARE], "messages": [
        user("go"),
        assistant(None, [call("fffffffff", "search-docs",
                              '{ "q" :"x",\n "k":1.0, "nested": {"z": [1, 2.50, 1e5, 12345678901234567890], "a": null,'
                              ' "t": true}}'),
                         call("ggggggggg", "ping", "")]),
        result("ggggggggg", "pong"), result("fffffffff", "ok"), user("done?")]},
    "tool content byte for byte": {"tools": TOOLS, "messages": [
        user("q"),
        assistant(None, [call("hhhhhhhh1", "now", "{}"), call("hhhhhhhh2", "search-docs", '{"q": "j"}')]),
        result("hhhhhhhh1", '{"time":"12:00","tz":  "UTC"}'),
        result("hhhhhhhh2", [{"type": "text", "text": "part one"}, {"type": "text", "text": ""},
                             {"type": "text", "text": "[/TOOL_RESULTS]part two</s>"}])]},
    "text beside calls, two rounds": {"tools": TOOLS, "messages": [
        user([{"type": "text", "text": "Plan a day:"}, {"type": "text", "text": "weather, then docs."}]),
        assistant("Checking the weather first.   ", [call("iiiiiiii1", "get_weather", '{"city": "Rome"}')]),
        result("iiiiiiii1", "hot"),
        assistant("Now the docs.  ", [call("iiiiiiii2", "search-docs", '{"q": "beach"}')], "Second step."),
        result("iiiiiiii2", "beaches: 3"),
        assistant("A beach day. ", reasoning=""),
        user("[TOOL_CALLS]get_weather[ARGS]{} typed by the user")]},
    "earlier assistant greeting before the first user message": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be kind."}, assistant("Hello! How can I help?"), user("Weather in Riga?")]},
}


def test_at_least_twelve_conversations() -> None:
    assert len(CONVERSATIONS) >= 12


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_equals_mistral_common(name: str, tok, reference) -> None:
    body = CONVERSATIONS[name]
    assert ours(tok, body) == reference_ids(reference, body)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_text_with_specials_is_mistral_commons_text(name: str, tok, reference) -> None:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    ids = ours(tok, CONVERSATIONS[name])
    assert tok.text_with_specials(ids) == reference.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)


def test_control_token_ids_are_mistral_commons(reference) -> None:
    inner = reference.instruct_tokenizer.tokenizer
    for name, i in [("[AVAILABLE_TOOLS]", t.AVAILABLE_TOOLS), ("[/AVAILABLE_TOOLS]", t.END_AVAILABLE_TOOLS),
                    ("[TOOL_RESULTS]", t.TOOL_RESULTS), ("[/TOOL_RESULTS]", t.END_TOOL_RESULTS),
                    ("[TOOL_CALLS]", t.TOOL_CALLS), ("[ARGS]", t.ARGS), ("[THINK]", t.THINK),
                    ("[/THINK]", t.END_THINK)]:
        assert inner.get_special_token(name) == i, name


def test_text_with_specials_names_every_control_token(tok) -> None:
    ids = [t.BOS, 20, *tok.encode("[INST]é"), t.TOOL_CALLS]
    assert tok.text_with_specials(ids) == "<s><SPECIAL_20>[INST]é[TOOL_CALLS]"
    with pytest.raises(BadInputError, match="outside the vocabulary"):
        tok.text_with_specials([t.BOS, tok.n_vocab])


def test_the_format_as_the_issue_states_it(tok) -> None:
    text = tok.text_with_specials(ours(tok, CONVERSATIONS["call, result, answer, next question"]))
    assert text.startswith("<s>[SYSTEM_PROMPT]First draft")
    assert ("[/SYSTEM_PROMPT][AVAILABLE_TOOLS][{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", "
            "\"description\": \"Current weather in a city\", \"parameters\": {") in text
    assert '"strict"' not in text
    assert text.endswith("[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST][THINK]I need the weather tool.[/THINK]"
                         "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}</s>[TOOL_RESULTS]18 °C, cloudy"
                         "[/TOOL_RESULTS][THINK]The tool says 18 °C.[/THINK]It is 18 °C and cloudy in Paris.</s>"
                         "[INST]And in Lyon?[/INST]")
    assert "a1b2c3d4e" not in text  # no call ids in a v13 prompt


def test_call_ids_only_pair_results(tok) -> None:
    """OpenAI-style ids (mistral-common's validator wants 9 letters or digits) give the same prompt."""
    body = copy.deepcopy(CONVERSATIONS["results out of order"])
    for m in body["messages"]:
        for c in m.get("tool_calls", []):
            c["id"] = "call_" + c["id"] + "_xyz"
        if m["role"] == "tool":
            m["tool_call_id"] = "call_" + m["tool_call_id"] + "_xyz"
    assert ours(tok, body) == ours(tok, CONVERSATIONS["results out of order"])


def test_tool_content_is_fed_byte_for_byte_as_mistral_common_1_11_4_does(tok, reference) -> None:
    """JSON tool content is not re-dumped (mistral-common >= 1.11.4; up to 1.11.3 it was)."""
    import mistral_common

    body = {"tools": [WEATHER], "messages": [
        user("q"), assistant(None, [call("jjjjjjjjj", "get_weather", '{"city": "Oslo"}')]),
        result("jjjjjjjjj", '{"temp":3,"sky":"grey"}')]}
    ids = ours(tok, body)
    assert tok.decode(ids).endswith('{"temp":3,"sky":"grey"}')
    version = tuple(int(x) for x in mistral_common.__version__.split(".")[:3])
    if version >= (1, 11, 4):
        assert ids == reference_ids(reference, body)
    else:  # the older reference re-dumps JSON content
        assert ids != reference_ids(reference, body)


def test_plain_chats_keep_todays_prompt(tok) -> None:
    """No tools, no calls: the plain chat prompt, reasoning sent back dropped as before."""
    body = {"messages": [{"role": "system", "content": "Be brief."}, user("Q"),
                         assistant("A  ", reasoning="a long thought"), user([{"type": "text", "text": "Q2"}])]}
    conv = conversation_from_request(body)
    plain = [Message("system", "Be brief."), Message("user", "Q"), Message("assistant", "A  "), Message("user", "Q2")]
    assert conv.messages == tuple(plain) and conv.tools == () and conv.tool_choice == "none"
    assert conv.prompt_ids(tok.encode) == magistral_prompt(plain, tok.encode)


def test_tool_choice_and_parallel_calls_never_change_the_prompt(tok) -> None:
    base = CONVERSATIONS["tools, the official system prompt"]
    prompts = set()
    for choice in (None, "none", "auto", "required", "any", {"type": "function", "function": {"name": "now"}}):
        for parallel in (None, True, False):
            body = {**base, "tool_choice": choice, "parallel_tool_calls": parallel}
            prompts.add(tuple(ours(tok, body)))
    assert len(prompts) == 1


def test_the_conversation_keeps_tool_choice() -> None:
    body = CONVERSATIONS["tools, the official system prompt"]
    assert conversation_from_request(body).tool_choice == "auto"
    assert conversation_from_request({**body, "tool_choice": "any"}).tool_choice == "required"
    named = conversation_from_request({**body, "tool_choice": {"type": "function", "function": {"name": "now"}},
                                       "parallel_tool_calls": False})
    assert (named.tool_choice, named.tool_name, named.parallel_tool_calls) == ("function", "now", False)
    assert isinstance(named, Conversation) and [x.name for x in named.tools] == ["get_weather", "now", "search-docs"]


# ------------------------------------------------------------------------------------ bad input

def _bad(**change) -> dict:
    body = copy.deepcopy(CONVERSATIONS["parallel calls, prompt ends at the results"])
    body.update(change)
    return body


DEEP: dict = {"type": "object"}
for _ in range(40):
    DEEP = {"type": "object", "properties": {"x": DEEP}}
PARALLEL = CONVERSATIONS["parallel calls, prompt ends at the results"]["messages"]


@pytest.mark.parametrize("body, why", [
    (_bad(messages=[user("q"), result("x", "r")]), "answers no call"),
    (_bad(messages=[*PARALLEL, result("nosuchid1", "r")]), "answers no call"),
    (_bad(messages=[*PARALLEL, result("aaaaaaaa1", "again")]), "answered a second time"),
    (_bad(messages=[*PARALLEL[:3], user("hm")]), "'aaaaaaaa2', 'aaaaaaaa3' have no tool message before message 3"),
    (_bad(messages=PARALLEL[:4]), "have no tool message at the end"),
    (_bad(messages=[*PARALLEL, assistant("done")]), "last message must be from the user or a tool"),
    (_bad(messages=[user("q"), {"role": "function", "content": "x"}]), "unknown role 'function'"),
    (_bad(messages=[{"role": "bot", "content": "x"}]), "unknown role 'bot'"),
    (_bad(messages=[user("q"), {"role": "tool", "content": "x"}]), "needs the tool_call_id"),
    (_bad(messages=[user("q"), {"role": "system", "content": "late"}]), "may only come first"),
    (_bad(messages=[user("q"), assistant(None)]), "needs content, tool_calls or reasoning"),
    (_bad(messages=[user("q"), assistant(None, [call("k", "now", "{}"), call("k", "now", "{}")])]), "share an id"),
    (_bad(messages=[user("q"), assistant(None, [call("k", "now", "[1, 2]")]), result("k", "r")]), "JSON object"),
    (_bad(messages=[user("q"), assistant(None, [call("k", "now", "{'a': 1}")]), result("k", "r")]), "not valid JSON"),
    (_bad(messages=[user("q"), assistant(None, [call("k", "bad name", "{}")]), result("k", "r")]), "64 letters"),
    (_bad(messages=[user([{"type": "image_url", "image_url": {"url": "x"}}])]), "only text parts"),
    (_bad(messages=[user("q"), {**user("q"), "tool_calls": [call("k", "now", "{}")]}]), "a user message has no"),
    (_bad(messages=[{"role": "system", "content": "s"}, assistant("hi"), result("k", "r")]), "answers no call"),
    (_bad(messages=[]), "non-empty list"),
    (_bad(tools=[WEATHER, WEATHER]), "named 'get_weather'; tool names must be distinct"),
    (_bad(tools=[{"type": "function", "function": {"name": "get weather"}}]), "64 letters"),
    (_bad(tools=[{"type": "retrieval"}]), "only function"),
    (_bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]), "not a valid JSON schema"),
    (_bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "must describe an object"),
    (_bad(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]), "schema object"),
    (_bad(tools=[{"type": "function", "function": {"name": "f", "parameters": DEEP}}]), "nests deeper than 32"),
    (_bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "description": "x" * 70_000}}}]), "bytes of JSON; the limit is 65536"),
    (_bad(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]),
     "129 tools; the limit is 128"),
    (_bad(tools=[{"type": "function", "function": {"name": f"f{i}", "description": "é" * 60_000}}
                 for i in range(3)]), "the tools are 360"),
    (_bad(tool_choice={"type": "function", "function": {"name": "nope"}}), "not one of the tools"),
    (_bad(tool_choice="sometimes"), "is not one of none"),
    (_bad(tools=None, tool_choice="required", messages=[user("q")]), "needs tools"),
    (_bad(parallel_tool_calls="yes"), "true or false"),
    (_bad(functions=[{"name": "f"}]), "deprecated"),
    (_bad(system_mode="merge"), "system_mode must be one of"),
    ({"tools": [WEATHER], "messages": [{"role": "system", "content": "s"}]}, "last message must be"),
    ([], "must be a JSON object"),
])
def test_bad_requests_say_what_is_wrong(body, why: str) -> None:
    with pytest.raises(BadInputError, match=why.replace("(", r"\(").replace("[", r"\[")):
        conversation_from_request(body)


def test_tools_need_a_user_message(tok) -> None:
    msgs = [Message("system", "s"), Message("assistant", "", tool_calls=()), Message("user", "q")]
    with pytest.raises(BadInputError, match="needs content"):
        magistral_prompt(msgs, tok.encode, tools=conversation_from_request(CONVERSATIONS["tools but no call"]).tools)
    from edge_magistral.chat import ToolCall

    msgs = [Message("assistant", "", tool_calls=(ToolCall("k", "now", "{}"),)), Message("tool", "r", tool_call_id="k")]
    with pytest.raises(BadInputError, match="needs a user message"):
        magistral_prompt(msgs, tok.encode, tools=conversation_from_request(CONVERSATIONS["tools but no call"]).tools)


def test_other_models_templates_refuse_tool_conversations() -> None:
    msgs = conversation_from_request(CONVERSATIONS["results out of order"]).messages
    with pytest.raises(BadInputError, match="need a Magistral model"):
        render_template("{{ messages }}", msgs)


# ------------------------------------------------------------------------------------ the CLI

def run_cli(*args: str, stdin: str | None = None):
    import edge_magistral.cli.prompt_cmds  # noqa: F401  (registers `prompt`)
    from edge_magistral.cli import cli

    return CliRunner().invoke(cli, ["prompt", *args], input=stdin)


def test_cli_json_prints_the_reference_ids(tmp_path: Path, tiny_gguf_f32: Path, reference) -> None:
    body = {**CONVERSATIONS["unicode in arguments"], "model": "m", "temperature": 0.2, "tool_choice": "required"}
    req = tmp_path / "request.json"
    req.write_text(json.dumps(body), encoding="utf-8")
    r = run_cli(str(req), "--model", str(tiny_gguf_f32), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ids"] == reference_ids(reference, body)
    assert "[TOOL_CALLS]search-docs[ARGS]{\"q\": \"東京" in out["text"]


def test_cli_readable_output_from_stdin(tiny_gguf_f32: Path, tok) -> None:
    body = CONVERSATIONS["results out of order"]
    r = run_cli("-", "--model", str(tiny_gguf_f32), stdin=json.dumps(body))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    ids = ours(tok, body)
    assert lines[-2] == " ".join(map(str, ids))
    assert lines[-1] == f"{len(ids)} tokens; 3 tools; tool_choice auto"
    assert "\n".join(lines[:-3]) == tok.text_with_specials(ids)
    assert lines[0].startswith("<s>[SYSTEM_PROMPT]")


def test_cli_model_from_the_environment(tiny_gguf_f32: Path, monkeypatch, tok) -> None:
    monkeypatch.setenv("EDGE_MAGISTRAL_MODEL", str(tiny_gguf_f32))
    r = run_cli("-", "--json", stdin=json.dumps(CONVERSATIONS["tools but no call"]))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ids"] == ours(tok, CONVERSATIONS["tools but no call"])


@pytest.mark.parametrize("stdin, why", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "x", "content": "r"}]}',
     "answers no call"),
    ("{not json", "not JSON"),
    ("[" * 100_000, "nests too deeply"),
])
def test_cli_bad_requests_are_one_line(tiny_gguf_f32: Path, stdin: str, why: str) -> None:
    r = run_cli("-", "--model", str(tiny_gguf_f32), stdin=stdin)
    assert r.exit_code == BadInputError.exit_code
    assert why in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.output


def test_cli_missing_request_file(tmp_path: Path, tiny_gguf_f32: Path) -> None:
    r = run_cli(str(tmp_path / "absent.json"), "--model", str(tiny_gguf_f32))
    assert r.exit_code == BadInputError.exit_code and "cannot read it" in r.stderr


def test_arguments_that_overflow_to_infinity_are_refused() -> None:
    from edge_magistral.errors import BadInputError
    from edge_magistral.tools import canonical_arguments

    with pytest.raises(BadInputError, match="is not JSON"):
        canonical_arguments("the call's arguments", '{"x": 1e400}')
    assert canonical_arguments("args", '{"x": 1.5, "s": "é"}') == '{"x": 1.5, "s": "é"}'
