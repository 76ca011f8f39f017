"""Tool calling through the OpenAI-compatible service, end to end on the tiny Magistral
(`tiny_server`): the official `openai` client (calls, streamed calls, "none"), a conversation
that sends calls and results back, the audit record of both, OpenAI-style 400s, a non-Magistral
model refusing tools (SmolLM2), and a whole agent loop run by the official `openai-agents` SDK.

The tiny model's weights are random: its calls are grammar-made, not meaningful. So each case
tries a few seeds until a call completes (max_tokens may cut one; such a turn must then report
no call), and every call that completes must validate against its tool's schema."""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
import serve_harness
from serve_harness import API_KEY

from edge_magistral.audit import AuditLog, AuditRecord, record_body, verify_file
from edge_magistral.generation import ParsedCall, ToolUse
from edge_magistral.server.api import chat_job
from edge_magistral.server.errors import ApiError
from edge_magistral.server.schemas import ChatCompletionRequest

pytestmark = pytest.mark.timeout(300)

PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"}},
          "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
SCHEMAS = {"get_weather": PARAMS, "get_time": TIME["function"]["parameters"]}
USER = [{"role": "user", "content": "Weather in Paris?"}]
NO_THINKING = {"max_thinking_tokens": 0}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
SEEDS = range(8)


@pytest.fixture
def oai(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _valid(name: str, arguments: str) -> dict:
    """The arguments of a call, checked: JSON, an object, valid against its tool's parameters."""
    value = json.loads(arguments)
    jsonschema.validate(value, SCHEMAS[name])
    return value


def _audit_records(server, n: int) -> list[dict]:
    """The last ``n`` records of the server's audit log, once written (off the event loop)."""
    path = server.log.parent / "audit.jsonl"
    serve_harness.until(lambda: path.exists() and verify_file(path).records >= n, what="the audit records")
    return [json.loads(line) for line in path.read_text().splitlines()[-n:]]


def _audit_count(server) -> int:
    path = server.log.parent / "audit.jsonl"
    return verify_file(path).records if path.exists() else 0


# ------------------------------------------------------------------------------ the openai client

@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_forced_calls_through_the_sdk_are_schema_valid(oai, choice):
    """Every seed: the answer is calls (or was cut: then no call). Seeds that complete: a
    parseable, schema-valid call of the tool, content null, finish_reason tool_calls."""
    complete = 0
    for seed in SEEDS:
        r = oai.chat.completions.create(model="tiny-F32", messages=USER, tools=[WEATHER, TIME], tool_choice=choice,
                                        max_tokens=60, seed=seed, extra_body=NO_THINKING)
        choice0, msg = r.choices[0], r.choices[0].message
        assert r.model_extra["watchdog"]["tool_error"] is None
        if choice0.finish_reason == "length":
            assert not msg.tool_calls  # a turn cut by max_tokens reports no call
            continue
        assert choice0.finish_reason == "tool_calls" and msg.content is None and msg.tool_calls
        for call in msg.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name == "get_weather" or choice == "required"
            _valid(call.function.name, call.function.arguments)
        assert len({c.id for c in msg.tool_calls}) == len(msg.tool_calls)
        complete += 1
    assert complete >= 2, f"only {complete} of {len(SEEDS)} seeds completed a call"


def _reassemble(chunks) -> tuple[dict[int, dict], str | None, str]:
    """OpenAI's streamed ``delta.tool_calls`` pieces put back together, as a client does."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for piece in c.delta.tool_calls or []:
            if piece.id is not None:  # the first piece of a call: its id, type and whole name
                assert piece.index not in calls and piece.type == "function" and piece.function.arguments == ""
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments
        finish = c.finish_reason or finish
    return calls, finish, content


def test_streamed_calls_reassemble_to_the_same_calls(tiny_server, oai):
    """The streamed pieces of a seed's calls reassemble to the calls the same seed gets without
    streaming (names, JSON-equal arguments), and the audit record has the streamed ids."""
    compared = 0
    for seed in SEEDS:
        kw = dict(model="tiny-F32", messages=USER, tools=[WEATHER], tool_choice=NAMED, max_tokens=60, seed=seed,
                  extra_body=NO_THINKING)
        whole = oai.chat.completions.create(**kw)
        if whole.choices[0].finish_reason != "tool_calls":
            continue
        before = _audit_count(tiny_server)
        calls, finish, content = _reassemble(oai.chat.completions.create(**kw, stream=True,
                                                                         stream_options={"include_usage": True}))
        assert finish == "tool_calls" and content == ""
        expected = whole.choices[0].message.tool_calls
        assert sorted(calls) == list(range(len(expected)))
        for i, call in enumerate(expected):
            assert calls[i]["name"] == call.function.name == "get_weather" and calls[i]["id"].startswith("call_")
            assert _valid("get_weather", calls[i]["arguments"]) == json.loads(call.function.arguments)
        (record,) = _audit_records(tiny_server, before + 1)[-1:]
        assert record["finish_reason"] == "tool_calls"
        assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in record["output"]["tool_calls"]] == \
            [(calls[i]["id"], calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
        compared += 1
        if compared == 2:
            return
    pytest.fail(f"only {compared} seeds completed a call")


def test_tool_choice_none_never_calls(oai):
    for seed in range(4):
        r = oai.chat.completions.create(model="tiny-F32", messages=USER, tools=[WEATHER, TIME], tool_choice="none",
                                        max_tokens=24, seed=seed, extra_body=NO_THINKING)
        assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
        assert r.choices[0].message.content


def test_a_conversation_with_calls_and_results_is_answered_and_audited(tiny_server, oai):
    """An assistant message with two calls and their results sent back out of order: 200, and the
    audit record keeps the tools, the calls and the results (in call order: as the model read them)."""
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city":"Paris","unit":"celsius"}'}},
             {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": calls, "reasoning_content": "Two tools."},
                {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 21 C"}]
    before = _audit_count(tiny_server)
    r = oai.chat.completions.create(model="tiny-F32", messages=messages, tools=[WEATHER, TIME], max_tokens=16,
                                    seed=1, extra_body=NO_THINKING)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    (record,) = _audit_records(tiny_server, before + 1)[-1:]
    prompt = record["prompt"]
    assert [t["function"]["name"] for t in prompt["tools"]] == ["get_weather", "get_time"]
    assert prompt["tools"][0]["function"]["parameters"] == PARAMS and prompt["tool_choice"] == "auto"
    assistant = prompt["messages"][1]
    assert assistant["reasoning_content"] == "Two tools." and assistant["content"] == ""
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in assistant["tool_calls"]] \
        == [("call_a", "get_weather", {"city": "Paris", "unit": "celsius"}), ("call_b", "get_time", {"zone": "CET"})]
    assert [(m["role"], m["tool_call_id"], m["content"]) for m in prompt["messages"][2:]] == \
        [("tool", "call_a", "sunny, 21 C"), ("tool", "call_b", "12:00")]


# -------------------------------------------------------------------------------------- 400s

TOOL = [WEATHER]
BAD_REQUESTS = [
    ({"tools": TOOL, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names 'nope', which is not one of the tools"),
    ({"messages": [*USER, {"role": "tool", "tool_call_id": "call_x", "content": "r"}]}, "messages",
     "answers no call"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}]}, "tools", "is not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "must describe an object"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "128"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "letters, digits"),
    ({"functions": [{"name": "f"}]}, None, "use tools and tool_choice"),
    ({"function_call": "auto"}, None, "use tools and tool_choice"),
    ({"tool_choice": "required"}, "tool_choice", "'required' needs tools"),
    ({"tools": TOOL, "tool_choice": {"type": "function", "function": {"name": "get_weather"}, "x": 1}},
     "tool_choice", '{"type": "function", "function": {"name": ...}}'),
    ({"tools": TOOL, "response_format": {"type": "json_object"}}, "response_format", "set tool_choice to none"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}, {"role": "tool", "tool_call_id": "c", "content": "r"}]},
     "messages", "is not valid JSON"),
    ({"messages": [*USER, {"role": "assistant", "content": "hi"}, {"role": "user", "content": None}]}, "messages",
     "messages.2.content"),
    ({"messages": [*USER, {"role": "tool", "content": "r"}]}, "messages", "messages.1.tool_call_id: Field required"),
    ({"messages": [{"role": "robot", "content": "r"}]}, "messages", "role must be system, developer, user, assistant"),
]


@pytest.mark.parametrize("extra,param,message", BAD_REQUESTS)
def test_bad_tool_requests_are_openai_400s(tiny_server, extra, param, message):
    body = {"messages": USER, "max_tokens": 4, **extra}
    with tiny_server.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"].split(".")[0] == param


def test_the_sdk_reads_a_refused_tool_request(oai):
    with pytest.raises(openai.BadRequestError, match="not one of the tools") as e:
        oai.chat.completions.create(model="tiny-F32", messages=USER, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert e.value.param == "tool_choice"


def test_response_format_with_tools_is_allowed_when_tool_choice_is_none(oai):
    r = oai.chat.completions.create(model="tiny-F32", messages=USER, tools=[WEATHER], tool_choice="none",
                                    response_format={"type": "json_object"}, max_tokens=200, seed=1,
                                    extra_body=NO_THINKING)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.fixture(scope="module")
def smol_server(smollm2_gguf, tmp_path_factory):
    server = serve_harness.start(smollm2_gguf, tmp_path_factory.mktemp("smol"))
    yield server
    assert server.stop() == 0, server.log_text()


@pytest.mark.parametrize("extra", [
    {"tools": TOOL},
    {"tools": TOOL, "tool_choice": "none"},
    {"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c", "content": "r"}]},
], ids=["tools", "tools-none", "tool-turns"])
def test_tools_on_a_model_that_is_not_magistral_are_refused(smol_server, extra):
    with smol_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **extra})
        assert r.status_code == 400 and "need a Magistral model" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4}).status_code == 200


# ------------------------------------------------------------------------------ an agent loop

def _agent_run(url: str, seed: int, ran: list) -> object:
    """One run of an `openai-agents` Agent with one function tool against the service."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # it would otherwise send traces to OpenAI

    @function_tool
    def get_weather(city: Literal["Paris", "London", "Tokyo"], days: int) -> str:
        """The weather in a city for the next days."""
        ran.append((city, days))
        return f"Sunny in {city} for {days} days"

    async def run() -> object:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        try:
            # tool_choice "required" on the first turn; the SDK resets it to auto after a call, so
            # the second turn may answer in text, which ends the run
            agent = Agent(name="weather", instructions="Use the weather tool, then answer.", tools=[get_weather],
                          model=OpenAIChatCompletionsModel(model="tiny-F32", openai_client=client),
                          model_settings=ModelSettings(tool_choice="required", max_tokens=40,
                                                       extra_body={"seed": seed, "max_thinking_tokens": 0}))
            return await Runner.run(agent, "Weather in Paris?", max_turns=4)
        finally:
            await client.close()
    return asyncio.run(run())


def test_an_openai_agents_loop_runs_to_its_final_output(tiny_server):
    """The Agents SDK drives the loop: the model calls the tool (the function really runs with the
    model's arguments), the result goes back, and the next turn's text is the final output."""
    from agents.exceptions import ModelBehaviorError
    from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem

    for seed in (2, 3, 5, 0, 6, 7):
        ran: list = []
        before = _audit_count(tiny_server)
        try:
            result = _agent_run(tiny_server.url, seed, ran)
        except ModelBehaviorError:  # the first turn was cut by max_tokens inside its call
            assert not ran
            continue
        kinds = [type(item) for item in result.new_items]
        assert kinds[:2] == [ToolCallItem, ToolCallOutputItem] and kinds[-1] is MessageOutputItem
        assert len(ran) == 1 and ran[0][0] in ("Paris", "London", "Tokyo") and isinstance(ran[0][1], int)
        assert isinstance(result.final_output, str) and result.final_output
        first, second = _audit_records(tiny_server, before + 2)[-2:]
        call = first["output"]["tool_calls"][0]
        assert first["finish_reason"] == "tool_calls" and json.loads(call["arguments"]) == \
            {"city": ran[0][0], "days": ran[0][1]}
        sent = second["prompt"]["messages"]
        assert sent[-2]["tool_calls"][0]["id"] == call["id"] and sent[-1] == {
            "role": "tool", "tool_call_id": call["id"], "content": f"Sunny in {ran[0][0]} for {ran[0][1]} days"}
        return
    pytest.fail("no seed completed the agent loop")


# ----------------------------------------------------------------------------------- units

INFO = {"n_ctx": 4096, "think_budget": 512, "is_magistral": True}


def test_a_chat_job_carries_its_conversation_and_what_it_may_call():
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": "Be brief."}, *USER], tools=[WEATHER],
                                tool_choice=NAMED, parallel_tool_calls=False)
    spec = pickle.loads(pickle.dumps(chat_job(req, INFO, 100)))
    assert spec.limits.tools == ToolUse((("get_weather", PARAMS),), "function", "get_weather", False)
    assert [m.role for m in spec.conversation.messages] == ["system", "user"]
    assert spec.conversation.tools[0].name == "get_weather"
    none = chat_job(ChatCompletionRequest(messages=USER, tools=[WEATHER], tool_choice="none"), INFO, 100)
    assert none.limits.tools is None and none.conversation.tools  # the tools stay in the prompt
    assert chat_job(ChatCompletionRequest(messages=USER), INFO, 100).limits.tools is None
    with pytest.raises(ApiError, match="need a Magistral model"):
        chat_job(req, {**INFO, "is_magistral": False}, 100)


def test_surrogates_in_tool_fields_are_refused():
    for body in ({"tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]},
                 {"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "\udfff", "function": {
                     "name": "f", "arguments": "{}"}}]}]}):
        with pytest.raises(ValueError, match="surrogate|unicode"):
            ChatCompletionRequest(**{"messages": USER, **body})


@pytest.mark.parametrize("redact", ["none", "all"])
def test_the_audit_record_keeps_the_calls_or_their_hash(tmp_path: Path, redact: str):
    call = ParsedCall(0, "call_1", "get_weather", '{"city": "Paris"}', '{"city":"Paris"}')
    record = AuditRecord("r", "0" * 64, "F32", {}, {}, USER, "", "", tool_calls=(call,), tool_error=None)
    log = AuditLog(tmp_path / "audit.jsonl", redact=redact)
    log.append(record)
    log.append(AuditRecord("s", "0" * 64, "F32", {}, {}, USER, "", "oops", tool_error="unknown tool 'x'"))
    assert verify_file(tmp_path / "audit.jsonl").ok
    first, second = (json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines())
    calls = [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]
    if redact == "none":
        assert first["output"]["tool_calls"] == calls and "tool_error" not in first["output"]
        assert second["output"]["tool_error"] == "unknown tool 'x'" and "tool_calls" not in second["output"]
    else:
        assert first["output"]["tool_calls"]["redacted"] == "sha256" and "Paris" not in json.dumps(first)
        assert second["output"]["tool_error"]["redacted"] == "sha256"
    plain = record_body(AuditRecord("t", "", "", {}, {}, USER, "a", "b"), "none")["output"]
    assert plain == {"thinking": "a", "answer": "b"}  # a plain answer's record is as it always was



def _done(finish: str, calls: tuple = (), tool_error: str | None = None):
    from edge_magistral.generation import Done, Timings, Usage

    return Done(finish, "eos", Usage(3, 0, 5), Timings(0.0, 0.0, None, 0.0, 0.0, 0.0, 0), False, tool_calls=calls,
                tool_error=tool_error)


def test_a_botched_call_or_a_cut_turn_reports_no_call():
    """The body of a turn that ended in a tool_error (finish stop, the message in the extension
    object) or was cut after a complete call (length): no tool_calls either way."""
    from edge_magistral.server.api import CHAT, Outcome, Reply

    call = ParsedCall(0, "call_1", "get_weather", '{"city": "Paris"}', '{"city":"Paris"}')
    reply = Reply(CHAT, "tiny")
    ok = reply.whole(Outcome(done=_done("tool_calls", (call,))))
    assert ok["choices"][0]["finish_reason"] == "tool_calls" and ok["choices"][0]["message"]["content"] is None
    assert ok["choices"][0]["message"]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    botched = reply.whole(Outcome(answer=["Hi"], done=_done("stop", tool_error="unknown tool 'x'")))
    assert botched["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in botched["choices"][0]["message"]
    assert botched["watchdog"]["tool_error"] == "unknown tool 'x'"
    assert botched["choices"][0]["message"]["content"] == "Hi"
    cut = reply.whole(Outcome(done=_done("length", (call,))))
    assert cut["choices"][0]["finish_reason"] == "length" and "tool_calls" not in cut["choices"][0]["message"]
    assert reply.whole(Outcome(done=_done("cancelled")))["choices"][0]["finish_reason"] == "length"
