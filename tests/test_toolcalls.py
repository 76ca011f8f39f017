"""The v13 output parser on hand-written token id streams (offline, no model, no llama.cpp).

Most tests use a tiny fake vocabulary: every text is cut into 3-byte tokens with ids from 1000 up,
so names, JSON and multi-byte characters all arrive split across tokens as they do from a model.
One test runs the real Tekken vocabulary (Magistral's table over mistral-common's BPE file) and
checks the parse against mistral-common's own decoder of v13 calls.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from edge_magistral import tekken as tk
from edge_magistral.generation import AnswerText, ThinkingText
from edge_magistral.toolcalls import (
    CallArguments,
    CallDone,
    CallStart,
    CallTruncated,
    Finish,
    ParseError,
    ToolCallParser,
    as_tool_call,
    parse_arguments,
    random_call_id,
)

TOOLS = ("get_weather", "now", "search-docs")
THINK, END_THINK, CALL, ARGS, EOS = tk.THINK, tk.END_THINK, tk.TOOL_CALLS, tk.ARGS, tk.EOS


class FakeVocab:
    """Text → fake tokens of ``chunk`` bytes (ids ≥ 1000); ``piece`` maps them back to bytes."""

    def __init__(self, chunk: int = 3):
        self.chunk = chunk
        self.table: dict[int, bytes] = {}

    def ids(self, *parts: int | str) -> list[int]:
        out: list[int] = []
        for p in parts:
            if isinstance(p, int):
                out.append(p)
                continue
            b = p.encode("utf-8")
            for i in range(0, len(b), self.chunk):
                tid = tk.NUM_SPECIAL + len(self.table)
                self.table[tid] = b[i:i + self.chunk]
                out.append(tid)
        return out

    def piece(self, tid: int) -> bytes:
        return self.table[tid]


def ids_source():
    """Deterministic call ids: call_0, call_1, ..."""
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parse(*parts: int | str, reason: str = "stop", chunk: int = 3, **kw) -> list:
    """All events of one turn: the parts (control ids or text), then end(reason)."""
    vocab = FakeVocab(chunk)
    p = ToolCallParser(TOOLS, vocab.piece, new_id=ids_source(), **kw)
    events = [ev for t in vocab.ids(*parts) for ev in p.push(t)]
    return events + p.end(reason)


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def text(events: list, kind: type) -> str:
    return "".join(e.text for e in of(events, kind))


def finish(events: list) -> Finish:
    (f,) = of(events, Finish)
    assert events[-1] is f
    return f


# ------------------------------------------------------------------------------ the grammar

def test_text_before_a_call_is_the_answer_and_the_thought_is_reasoning() -> None:
    ev = parse(THINK, "The user wants the weather.", END_THINK, "Let me check that for you.",
               CALL, "get_weather", ARGS, '{"city": "Paris"}', EOS)
    assert text(ev, ThinkingText) == "The user wants the weather."
    assert text(ev, AnswerText) == "Let me check that for you."
    assert of(ev, CallStart) == [CallStart(0, "call_0", "get_weather")]
    f = finish(ev)
    assert f.reason == "tool_calls" and f.error is None and f.truncated is None
    assert f.content == "Let me check that for you."
    assert [(c.index, c.id, c.name, c.arguments) for c in f.calls] == [(0, "call_0", "get_weather",
                                                                         '{"city": "Paris"}')]
    assert [d.call for d in of(ev, CallDone)] == list(f.calls)


def test_a_call_right_after_the_thought_has_no_content() -> None:
    ev = parse(THINK, "hm", END_THINK, CALL, "now", ARGS, "{}", EOS)
    assert of(ev, AnswerText) == []
    f = finish(ev)
    assert f.reason == "tool_calls" and f.content == "" and f.calls[0].arguments == "{}"


def test_two_parallel_calls() -> None:
    ev = parse(CALL, "get_weather", ARGS, '{"city": "Paris", "unit": "C"}',
               CALL, "get_weather", ARGS, '{"city": "Lyon"}', EOS)
    f = finish(ev)
    assert f.reason == "tool_calls"
    assert [(c.index, c.id, c.name) for c in f.calls] == [(0, "call_0", "get_weather"), (1, "call_1", "get_weather")]
    assert [json.loads(c.arguments) for c in f.calls] == [{"city": "Paris", "unit": "C"}, {"city": "Lyon"}]
    # Each call is done when the next [TOOL_CALLS] (or </s>) arrives, before the next one starts.
    kinds = [type(e).__name__ for e in ev if not isinstance(e, CallArguments)]
    assert kinds == ["CallStart", "CallDone", "CallStart", "CallDone", "Finish"]


def test_unicode_arguments_split_inside_characters() -> None:
    args = {"city": "Zürich", "note": "雪 ❄️ 🌨 — « ok »", "q": "naïve café"}
    dumped = json.dumps(args, ensure_ascii=False)
    for chunk in (1, 2, 3, 5):  # every way of cutting the UTF-8 bytes across tokens
        ev = parse(CALL, "search-docs", ARGS, dumped, EOS, chunk=chunk)
        (call,) = finish(ev).calls
        assert call.arguments == dumped == call.raw_arguments
        assert text(ev, CallArguments) == dumped
        assert "\ufffd" not in text(ev, CallArguments)


def test_escaped_unicode_is_re_dumped_as_the_prompt_carries_it() -> None:
    ev = parse(CALL, "get_weather", ARGS, '{"city":"Z\\u00fcrich"}', EOS)
    (call,) = finish(ev).calls
    assert call.arguments == '{"city": "Zürich"}'
    assert call.raw_arguments == '{"city":"Z\\u00fcrich"}' == text(ev, CallArguments)


def test_streaming_increments_concatenate_to_the_final_arguments() -> None:
    first = json.dumps({"city": "Paris", "days": [1, 2, 3], "opts": {"unit": "C", "x": None}}, ensure_ascii=False)
    second = json.dumps({"q": "tokenizer", "k": 5})
    ev = parse("Checking both.", CALL, "get_weather", ARGS, first, CALL, "search-docs", ARGS, second, EOS)
    calls = finish(ev).calls
    streamed: dict[int, dict] = {}
    for e in ev:  # what a server turns into delta.tool_calls: name once, then argument pieces
        if isinstance(e, CallStart):
            assert e.index not in streamed
            streamed[e.index] = {"id": e.id, "name": e.name, "arguments": ""}
        elif isinstance(e, CallArguments):
            streamed[e.index]["arguments"] += e.text
    assert len(of(ev, CallArguments)) > 4  # really in pieces
    assert streamed == {c.index: {"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls}


def test_streamed_pieces_are_the_raw_text_when_the_model_spaces_json_otherwise() -> None:
    ev = parse(CALL, "get_weather", ARGS, ' {"city":"Paris",\n "unit" : "C"} ', EOS)
    (call,) = finish(ev).calls
    assert text(ev, CallArguments) == call.raw_arguments == ' {"city":"Paris",\n "unit" : "C"} '
    assert call.arguments == '{"city": "Paris", "unit": "C"}'


def test_an_answer_without_calls_finishes_as_given() -> None:
    ev = parse(THINK, "easy", END_THINK, "It is 4.", EOS)
    f = finish(ev)
    assert (f.reason, f.calls, f.content) == ("stop", (), "It is 4.")
    assert finish(parse("It is", reason="length")).reason == "length"
    assert finish(parse(THINK, "still thinking", reason="length")).reason == "length"


def test_a_prompt_that_ends_in_think_starts_in_the_thought() -> None:
    ev = parse("reasoning", END_THINK, "answer", EOS, thinking=True)
    assert text(ev, ThinkingText) == "reasoning" and text(ev, AnswerText) == "answer"


# ------------------------------------------------------------------------------ truncation

def test_max_tokens_inside_args_is_no_call_and_length() -> None:
    ev = parse("Let me look.", CALL, "get_weather", ARGS, '{"city": "Par', reason="length")
    f = finish(ev)
    assert f.reason == "length" and f.calls == () and of(ev, CallDone) == []
    assert f.truncated == CallTruncated(0, "get_weather", '{"city": "Par')
    assert f.content == "Let me look."


def test_max_tokens_before_args_is_no_call_and_length() -> None:
    for parts in ((CALL,), (CALL, "get_wea")):
        ev = parse("text", *parts, reason="length")
        f = finish(ev)
        assert f.reason == "length" and f.calls == () and of(ev, CallStart) == []
        assert f.truncated is not None and f.truncated.index == 0


def test_a_cut_second_call_keeps_the_first_and_says_length() -> None:
    ev = parse(CALL, "now", ARGS, "{}", CALL, "get_weather", ARGS, '{"ci', reason="length")
    f = finish(ev)
    assert f.reason == "length" and [c.name for c in f.calls] == ["now"]
    assert f.truncated is not None and f.truncated.index == 1


def test_a_cut_call_is_length_even_when_the_engine_says_stop() -> None:
    # e.g. a deadline or a stop reason that is not max_tokens: a half call is never a call
    f = finish(parse(CALL, "now", ARGS, "{", reason="stop"))
    assert f.reason == "length" and f.calls == ()
    assert finish(parse(CALL, "now", ARGS, "{", reason="cancelled")).reason == "cancelled"


# ------------------------------------------------------------------------------ refusals

def refused(ev: list, code: str) -> ParseError:
    (err,) = of(ev, ParseError)
    assert err.code == code, err
    f = finish(ev)
    assert f.error == err and f.calls == () and f.reason != "tool_calls"
    assert isinstance(ev[-2], ParseError)  # nothing but Finish after the error
    return err


def test_unknown_tool_name() -> None:
    ev = parse(CALL, "rm_rf", ARGS, "{}", EOS)
    err = refused(ev, "unknown_tool")
    assert "rm_rf" in err.message and "get_weather" in err.message and err.index == 0
    assert of(ev, CallStart) == []
    assert refused(parse(CALL, "x" * 200, ARGS, "{}", EOS), "unknown_tool").message.count("x") <= 70
    vocab = FakeVocab()
    p = ToolCallParser([f"tool_{i}" for i in range(100)], vocab.piece)
    (err,) = [e for t in vocab.ids(CALL, "nope", ARGS) for e in p.push(t)]
    assert len(err.message) < 300 and "and 90 more" in err.message  # a long tool list is not pasted whole


def test_names_must_match_exactly() -> None:
    refused(parse(CALL, " get_weather", ARGS, "{}", EOS), "unknown_tool")
    refused(parse(CALL, "Get_Weather", ARGS, "{}", EOS), "unknown_tool")


def test_bad_json_arguments() -> None:
    for bad in ('{"city": Paris}', '{"city": "Paris"', "", "   ", '{"x": NaN}', '{"x": -Infinity}', '{"x": 1e400}',
                '{"city": "\\ud800"}'):
        err = refused(parse(CALL, "get_weather", ARGS, bad, EOS), "bad_arguments")
        assert err.index == 0 and "get_weather" in err.message


def test_arguments_must_be_an_object() -> None:
    for bad, kind in (('["Paris"]', "array"), ('"Paris"', "string"), ("42", "number"), ("null", "null")):
        assert f"a JSON {kind}," in refused(parse(CALL, "get_weather", ARGS, bad, EOS), "not_an_object").message


def test_text_after_a_call() -> None:
    err = refused(parse(CALL, "get_weather", ARGS, '{"city": "Paris"} I called the tool.', EOS), "text_after_call")
    assert "I called" in err.message
    # ... and the error stops a second, well-formed call from counting
    refused(parse(CALL, "now", ARGS, "{} oops", CALL, "now", ARGS, "{}", EOS), "text_after_call")


def test_think_after_content_and_calls_inside_the_thought() -> None:
    refused(parse("Answer first.", THINK, "then thinking", END_THINK, EOS), "think_after_content")
    refused(parse(CALL, "now", ARGS, "{}", THINK, EOS), "think_after_content")
    refused(parse(THINK, "let me call", CALL, "now", ARGS, "{}", EOS), "call_in_thinking")


def test_stray_control_tokens() -> None:
    refused(parse("text", END_THINK, EOS), "unexpected_token")
    refused(parse(THINK, "a", THINK, EOS), "unexpected_token")
    refused(parse("text", tk.INST, EOS), "unexpected_token")
    refused(parse("text", ARGS, "{}", EOS), "unexpected_token")
    refused(parse(CALL, "now", ARGS, "{}", ARGS, EOS), "unexpected_token")
    refused(parse(CALL, "now", EOS), "missing_arguments")
    refused(parse(CALL, CALL, "now", ARGS, "{}", EOS), "unexpected_token")
    refused(parse("done", EOS, "more"), "after_end")


def test_one_call_when_parallel_calls_are_off() -> None:
    assert finish(parse(CALL, "now", ARGS, "{}", EOS, max_calls=1)).reason == "tool_calls"
    refused(parse(CALL, "now", ARGS, "{}", CALL, "now", ARGS, "{}", EOS, max_calls=1), "too_many_calls")


def test_after_an_error_the_rest_is_ignored_and_end_happens_once() -> None:
    vocab = FakeVocab()
    p = ToolCallParser(TOOLS, vocab.piece)
    ev = [e for t in vocab.ids(CALL, "nope", ARGS) for e in p.push(t)]
    assert [e.code for e in ev] == ["unknown_tool"] and p.failed
    assert [e for t in vocab.ids('{"a": 1}', EOS) for e in p.push(t)] == []
    assert len(p.end("stop")) == 1 and p.end("stop") == []


# ------------------------------------------------------------------------------ the engine's side

def test_the_engine_can_pass_the_text_it_decoded() -> None:
    p = ToolCallParser(TOOLS, new_id=ids_source())  # no piece: text comes with each token
    stream = [(1000, "Sure."), (CALL, ""), (1001, "get_"), (1002, "weather"), (ARGS, ""), (1003, '{"city"'),
              (1004, ""), (1005, ': "Oslo"}'), (EOS, "")]
    ev = [e for t, s in stream for e in p.push(t, s)] + p.end("stop")
    f = finish(ev)
    assert f.reason == "tool_calls" and f.calls[0].arguments == '{"city": "Oslo"}' and f.content == "Sure."
    with pytest.raises(ValueError):
        ToolCallParser(TOOLS).push(1000)


def test_generated_call_ids_have_openais_shape() -> None:
    ids = {random_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    vocab = FakeVocab()
    ev = ToolCallParser(["now"], vocab.piece)
    out = [e for t in vocab.ids(CALL, "now", ARGS, "{}", EOS) for e in ev.push(t)] + ev.end()
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", finish(out).calls[0].id)


def test_a_parsed_call_goes_back_into_a_conversation() -> None:
    (call,) = finish(parse(CALL, "now", ARGS, '{"tz":"UTC"}', EOS)).calls
    tc = as_tool_call(call)
    assert (tc.id, tc.name, tc.arguments) == ("call_0", "now", '{"tz": "UTC"}')


def test_parse_arguments_is_strict() -> None:
    assert parse_arguments(' {"a": [1, 2.5, true, null]} \n') == ('{"a": [1, 2.5, true, null]}', None)
    assert parse_arguments("[" * 100_000)[1][0] == "bad_arguments"
    assert "out of range" in parse_arguments('{"x": 1e400}')[1][1]
    assert "surrogate" in parse_arguments('{"x": "\\udc00"}')[1][1]
    assert parse_arguments('{"x": "\\ud83d\\ude00"}') == ('{"x": "😀"}', None)  # a pair is one character


# ------------------------------------------------------------------------------ the real vocabulary

@pytest.fixture(scope="module")
def tekken(tmp_path_factory: pytest.TempPathFactory):
    """mistral-common's Tekkenizer over Magistral's tekken.json (v13 control tokens)."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    path = Path(tmp_path_factory.mktemp("tekken")) / "tekken.json"
    tk.write_magistral_tekken(path)
    return Tekkenizer.from_file(path)


def test_real_tekken_ids_parse_as_mistral_common_parses_them(tekken) -> None:
    from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls

    def enc(s: str) -> list[int]:
        return tekken.encode(s, bos=False, eos=False)

    args1 = json.dumps({"city": "São Paulo", "unit": "C", "note": "雪 ❄️"}, ensure_ascii=False)
    args2 = json.dumps({"q": "[TOOL_CALLS] is text here", "k": 3})
    out = [THINK, *enc("Two cities: call twice."), END_THINK, *enc("Checking the weather…"),
           CALL, *enc("get_weather"), ARGS, *enc(args1), CALL, *enc("search-docs"), ARGS, *enc(args2), EOS]
    assert tekken.get_special_token("[TOOL_CALLS]") == CALL and tekken.get_special_token("[ARGS]") == ARGS

    piece = tekken.id_to_byte_piece
    p = ToolCallParser(TOOLS, piece, new_id=ids_source())
    ev = [e for t in out for e in p.push(t)] + p.end("stop")
    f = finish(ev)

    content_ids, call_ids = _split_content_and_tool_calls(out, CALL)
    ref = _decode_tool_calls(call_ids, tekken)
    assert [(c.name, json.loads(c.arguments)) for c in f.calls] == [
        (r.function.name, json.loads(r.function.arguments)) for r in ref]
    assert f.content == tekken.decode(content_ids[content_ids.index(END_THINK) + 1:])
    assert text(ev, ThinkingText) == "Two cities: call twice."
    # The re-dumped arguments are the prompt's form: encoded back, they are the model's own tokens.
    assert [enc(c.arguments) for c in f.calls] == [enc(args1), enc(args2)]
