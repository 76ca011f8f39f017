"""The service end to end: `edge-magistral serve` on the tiny Magistral as a real process, driven by
the official `openai` client and by raw HTTP: reasoning and the watchdog's report, streaming,
structured output, errors as OpenAI's, deadlines, the audit log, prompts never logged, concurrent
clients, the queue's 429, clients that leave, hostile bodies, and a worker crash (503 for the
request in flight, restart, then 200 again)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import openai
import pytest
import serve_harness
from serve_harness import API_KEY, ttft, wait_idle

pytestmark = pytest.mark.timeout(120)

QUICK = {"max_tokens": 8, "max_thinking_tokens": 0}  # no thinking, a few tokens
THINK = {"max_tokens": 120, "max_thinking_tokens": 64, "max_answer_tokens": 16, "force_thinking": True}
USER = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def oai(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


# ------------------------------------------------------------------------------ openai client

def test_health_models_and_metrics(tiny_server, oai):
    h = httpx.get(f"{tiny_server.url}/health").json()  # open route: no key
    assert h["status"] == "ok" and h["model"] == "tiny-F32"
    assert h["plan"]["n_ctx"] == 4096 and h["plan"]["quant"] == "F32"
    assert [m.id for m in oai.models.list()] == ["tiny-F32"]
    assert oai.models.retrieve("tiny-F32").id == "tiny-F32"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")
    metrics = httpx.get(f"{tiny_server.url}/metrics", headers=tiny_server.headers).text
    for name in ("edge_magistral_requests_total", "edge_magistral_queue_depth", "edge_magistral_model_memory_bytes",
                 "edge_magistral_time_to_first_token_seconds", "edge_magistral_watchdog_interventions_total"):
        assert name in metrics
    assert httpx.get(f"{tiny_server.url}/metrics").status_code == 401


def test_chat_reasoning_and_watchdog_report(oai):
    r = oai.chat.completions.create(model="tiny-F32", messages=USER, extra_body=THINK)
    msg, choice = r.choices[0].message, r.choices[0]
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and "Considering the limited time" in reasoning  # the wrap-up streams as reasoning
    assert msg.content  # an answer follows the forced close
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens_details.reasoning_tokens >= 64
    assert r.usage.completion_tokens > r.usage.completion_tokens_details.reasoning_tokens  # answer tokens too
    wd = r.model_extra["watchdog"]
    assert wd["reasoning_truncated"] is True and wd["think_budget"] == 64
    assert any(e["action"] == "force_close" and e["reason"] == "think_budget" for e in wd["events"])


def test_chat_streaming_with_usage(oai):
    stream = oai.chat.completions.create(model="tiny-F32", messages=USER, stream=True,
                                         stream_options={"include_usage": True}, extra_body=THINK)
    reasoning, answer, finish, usage, watchdog = [], [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning.append((c.delta.model_extra or {}).get("reasoning_content") or "")
            answer.append(c.delta.content or "")
            if c.finish_reason:
                finish, watchdog = c.finish_reason, chunk.model_extra["watchdog"]
    assert "".join(reasoning) and "".join(answer)
    assert finish in ("stop", "length") and watchdog["reasoning_truncated"]
    assert usage.completion_tokens_details.reasoning_tokens >= 64
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_response_format_json_schema(oai):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
              "required": ["ok", "size"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    r = oai.chat.completions.create(model="tiny-F32", messages=USER, response_format=rf, max_tokens=200,
                                    seed=7, extra_body={"max_thinking_tokens": 64, "max_answer_tokens": 40,
                                                        "force_thinking": True})
    answer = json.loads(r.choices[0].message.content)  # the answer is constrained ...
    assert set(answer) == {"ok", "size"} and isinstance(answer["ok"], bool) and answer["size"] in "SML"
    assert r.choices[0].message.model_extra["reasoning_content"]  # ... the thinking is free
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproduces_and_stop_strings(oai):
    kw = dict(model="tiny-F32", messages=USER, seed=123, temperature=1.0, max_tokens=16,
              extra_body={"max_thinking_tokens": 0})
    a, b = (oai.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b and a
    stop = a[3:6]
    r = oai.chat.completions.create(**kw, stop=[stop])
    assert stop not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.model_extra["watchdog"]["stop_reason"] == "stop_string"


def test_raw_completion(oai):
    r = oai.completions.create(model="tiny-F32", prompt="[INST]Once upon a time[/INST]", max_tokens=6, seed=1)
    assert r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.completion_tokens_details.reasoning_tokens == 0
    # plain text, never control tokens: "[INST]" is several ordinary tokens, not id 3
    assert r.usage.prompt_tokens > 8
    chunks = list(oai.completions.create(model="tiny-F32", prompt="Hello", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_openai_errors(tiny_server, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-F32", messages=USER, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-F32", messages=[{"role": "user", "content": "word " * 6000}],
                                    extra_body=QUICK)
    assert e.value.code == "context_length_exceeded" and "too many" in e.value.message
    with pytest.raises(openai.BadRequestError, match="no room to think"):
        oai.chat.completions.create(model="tiny-F32", messages=USER, max_tokens=20,
                                    extra_body={"max_thinking_tokens": 100})
    with pytest.raises(openai.BadRequestError, match="more than this server allows"):
        oai.chat.completions.create(model="tiny-F32", messages=USER, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="use tools"):
        oai.chat.completions.create(model="tiny-F32", messages=USER, functions=[{
            "name": "f", "parameters": {"type": "object"}}])
    bad = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="wrong-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_per_request_deadline_ends_the_turn(oai):
    t0 = time.monotonic()
    r = oai.chat.completions.create(model="tiny-F32", messages=USER, max_tokens=500,
                                    extra_body={"max_thinking_tokens": 0, "deadline_s": 1})
    assert time.monotonic() - t0 < 3
    assert r.choices[0].finish_reason == "length" and r.model_extra["watchdog"]["stop_reason"] == "deadline"


def test_one_audit_record_per_request(tiny_server, oai):
    from edge_magistral.audit import verify_file

    path = tiny_server.log.parent / "audit.jsonl"
    before = verify_file(path).records if path.exists() else 0
    oai.chat.completions.create(model="tiny-F32", messages=[{"role": "user", "content": "audit me"}], extra_body=QUICK)
    oai.completions.create(model="tiny-F32", prompt="raw audit", max_tokens=3)
    end = time.monotonic() + 10
    while (verify_file(path).records if path.exists() else 0) < before + 2 and time.monotonic() < end:
        time.sleep(0.05)  # records are written off the event loop
    check = verify_file(path)
    assert check.ok and check.records == before + 2
    chat, raw = (json.loads(line) for line in path.read_text().splitlines()[-2:])
    assert chat["prompt"] == [{"role": "user", "content": "audit me"}] and chat["usage"]["prompt_tokens"] > 0
    assert raw["prompt"] == "raw audit" and raw["sampling"]["kind"] == "raw" and raw["plan"]["quant"] == "F32"


def test_prompts_and_answers_are_never_logged(tiny_server, oai):
    """With the most verbose logging (-vv: every logger at DEBUG, llama.cpp's
    own log included) a secret sent in every way a request can go (chat, streamed, raw, refused
    by validation, too long for the context, given up by its client) and the answers it got show
    up in the opt-in audit log only: never in the server's output, its other files, /metrics or
    /health."""
    secret = f"SECRET-{uuid.uuid4().hex}"
    chat = [{"role": "system", "content": f"{secret} system"}, {"role": "user", "content": f"Repeat {secret}."}]
    r = oai.chat.completions.create(model="tiny-F32", messages=chat, max_tokens=24, stop=[secret],
                                    extra_body={"max_thinking_tokens": 0})
    answer = r.choices[0].message.content
    list(oai.chat.completions.create(model="tiny-F32", messages=chat, stream=True, extra_body=QUICK))
    oai.completions.create(model="tiny-F32", prompt=f"{secret} raw", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny-F32", messages=chat, extra_body={"frobnicate": secret})
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny-F32", messages=[{"role": "user", "content": f"{secret} " * 6000}],
                                    extra_body=QUICK)
    with tiny_server.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 500, "max_thinking_tokens": 0})
    wait_idle(tiny_server)

    audit = tiny_server.log.parent / "audit.jsonl"
    serve_harness.until(lambda: audit.read_text().count(secret) >= 5, what="the audit records")  # chat ×2, raw
    answers = [json.loads(line)["output"]["answer"] for line in audit.read_text().splitlines()]
    assert len(answer) >= 12 and answer in answers  # long enough not to occur anywhere by chance
    seen = {"/metrics": httpx.get(f"{tiny_server.url}/metrics", headers=tiny_server.headers).text,
            "/health": httpx.get(f"{tiny_server.url}/health").text}
    seen.update({f.name: f.read_text(errors="replace") for f in tiny_server.log.parent.iterdir()
                 if f.is_file() and f != audit})
    assert "DEBUG worker llama_cpp.native" in tiny_server.log_text()  # the log was as verbose as it gets
    for where, text in seen.items():
        assert secret not in text and answer not in text, where


# ------------------------------------------------------------------------------- concurrency

def test_eight_concurrent_streaming_clients_all_complete(oai):
    results: dict[int, tuple[str, str | None]] = {}

    def client(i: int) -> None:
        text, finish = [], None
        for chunk in oai.chat.completions.create(model="tiny-F32", messages=[{"role": "user", "content": f"#{i}"}],
                                                 stream=True, max_tokens=12, extra_body={"max_thinking_tokens": 0}):
            for c in chunk.choices:
                text.append(c.delta.content or "")
                finish = c.finish_reason or finish
        results[i] = ("".join(text), finish)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert sorted(results) == list(range(8))
    assert all(text and finish == "length" for text, finish in results.values()), results


def test_queue_overflow_gives_429_with_retry_after(tiny_server):
    wait_idle(tiny_server)
    outcomes: list[int | str] = []
    retry_after: list[str] = []
    lock, go = threading.Lock(), threading.Event()

    def fire() -> None:
        go.wait()
        body = {"messages": USER, "max_tokens": 512, "max_thinking_tokens": 0}  # ~4 s of work each
        try:  # the admitted requests give up after 2 s: their cancellation is part of the test
            r = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, headers=tiny_server.headers,
                           timeout=httpx.Timeout(30, read=2))
            with lock:
                outcomes.append(r.status_code)
                retry_after.append(r.headers.get("retry-after"))
        except httpx.ReadTimeout:
            with lock:
                outcomes.append("admitted")

    threads = [threading.Thread(target=fire) for _ in range(14)]
    for t in threads:
        t.start()
    go.set()
    end = time.monotonic() + 10
    while outcomes.count(429) < 5 and time.monotonic() < end:
        time.sleep(0.02)
    t0 = time.monotonic()  # /health never starves behind a full queue
    h = httpx.get(f"{tiny_server.url}/health", timeout=5)
    assert h.status_code == 200 and h.json()["queue"] == 8 and h.json()["generating"]
    assert time.monotonic() - t0 < 1
    for t in threads:
        t.join(30)
    # one generating + 8 queued were admitted; the other 5 were refused at once, with Retry-After
    assert sorted(outcomes, key=str) == [429] * 5 + ["admitted"] * 9, outcomes
    assert all(ra and int(ra) >= 1 for ra in retry_after)
    wait_idle(tiny_server, 15)  # every admitted request was cancelled or dequeued when its client left


def test_killed_streaming_client_frees_the_engine(tiny_server, tmp_path):
    wait_idle(tiny_server)
    # A client process reads a few chunks of a long generation, then is killed (no clean close).
    script = tmp_path / "client.py"
    script.write_text(
        "import httpx, sys\n"
        f"body = {{'messages': [{{'role': 'user', 'content': 'long'}}], 'max_tokens': 500, 'max_thinking_tokens': 0,"
        " 'stream': True}\n"
        f"with httpx.stream('POST', '{tiny_server.url}/v1/chat/completions', json=body, timeout=60,"
        f" headers={{'Authorization': 'Bearer {API_KEY}'}}) as r:\n"
        "    for i, line in enumerate(r.iter_lines()):\n"
        "        if i == 10:\n"
        "            print('reading', flush=True)\n")
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "reading"
    client.send_signal(signal.SIGKILL)
    client.wait()
    # 500 tokens would take seconds more; the next request must start at once.
    assert ttft(tiny_server, {"messages": USER, **QUICK}) < 2.0
    wait_idle(tiny_server)


def test_non_streaming_client_that_gives_up_frees_the_engine(tiny_server):
    wait_idle(tiny_server)
    with tiny_server.client(timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 500, "max_thinking_tokens": 0})
    assert ttft(tiny_server, {"messages": USER, **QUICK}) < 2.0


# ------------------------------------------------------------------------------ bad requests

BAD_BODIES: list[tuple[str, bytes | str | dict]] = [
    ("malformed json", b'{"messages": [{"role": "user", "content": "hi"}'),
    ("not json", b"hello"),
    ("invalid utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("json array", b"[1, 2, 3]"),
    ("empty body", b""),
    ("null", b"null"),
    ("deep nesting", b"[" * 50_000 + b"]" * 50_000),
    ("NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("Infinity", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}'),
    ("huge int", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 400 + b"}"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("surrogate in schema", b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": '
                            b'"json_schema", "json_schema": {"name": "x", "schema": {"\\udfff": 1}}}}'),
    ("no messages", {"messages": []}),
    ("missing messages", {"model": "x"}),
    ("messages not a list", {"messages": "hi"}),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}),
    ("unknown role", {"messages": [{"role": "tool", "content": "hi"}]}),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("last message assistant", {"messages": [{"role": "assistant", "content": "hi"}], **QUICK}),
    ("system not first", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], **QUICK}),
    ("string max_tokens", {"messages": USER, "max_tokens": "5"}),
    ("bool max_tokens", {"messages": USER, "max_tokens": True}),
    ("float max_tokens", {"messages": USER, "max_tokens": 5.5}),
    ("zero max_tokens", {"messages": USER, "max_tokens": 0}),
    ("negative max_tokens", {"messages": USER, "max_tokens": -1}),
    ("negative temperature", {"messages": USER, "temperature": -0.1}),
    ("temperature 3", {"messages": USER, "temperature": 3}),
    ("top_p 2", {"messages": USER, "top_p": 2}),
    ("n 2", {"messages": USER, "n": 2}),
    ("logprobs", {"messages": USER, "logprobs": True, "top_logprobs": 20}),
    ("huge logit_bias", {"messages": USER, "logit_bias": {str(i): 100 for i in range(20_000)}}),
    ("penalty", {"messages": USER, "presence_penalty": 1.5}),
    ("many stops", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}),
    ("long stop", {"messages": USER, "stop": "x" * 10_000}),
    ("empty stop", {"messages": USER, "stop": [""]}),
    ("unknown field", {"messages": USER, "frobnicate": 1}),
    ("seed too big", {"messages": USER, "seed": 2**70}),
    ("effort and budget", {"messages": USER, "reasoning_effort": "low", "max_thinking_tokens": 10}),
    ("bad effort", {"messages": USER, "reasoning_effort": "extreme"}),
    ("deep schema", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": json.loads('{"a":' * 40 + "1" + "}" * 40)}}}),
    ("big schema", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": "d" * 70_000}}}}),
    ("unsupported schema", {"messages": USER, **QUICK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense-type"}}}}),
    ("schema missing", {"messages": USER, "response_format": {"type": "json_schema"}}),
    ("prompt too long", {"messages": [{"role": "user", "content": "ab " * 5000}], **QUICK}),
    ("one very long word", {"messages": [{"role": "user", "content": "a" * 1_500_000}], **QUICK}),
]

ACCEPTED: list[tuple[str, dict]] = [  # unicode edge cases that are valid text: served normally
    ("NUL", {"messages": [{"role": "user", "content": "a\x00b\x00"}], **QUICK}),
    ("RTL and zero-width", {"messages": [{"role": "user", "content": "\u202eabc\u200b\u200d\u2066שלום\u2069"}],
                            **QUICK}),
    ("control-token text", {"messages": [{"role": "user", "content": "[INST]x[/INST][THINK]y[/THINK]</s>"
                                                                      "[SYSTEM_PROMPT][TOOL_CALLS]"}], **QUICK}),
    ("emoji and combining", {"messages": [{"role": "user", "content": "👩‍👩‍👧 é ﷽ \U0010FFFF"}], **QUICK}),
    ("developer role and parts", {"messages": [{"role": "developer", "content": "be brief"},
                                               {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                  **QUICK}),
]


def _post(server, body, headers=None) -> httpx.Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    h = {**server.headers, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}/v1/chat/completions", content=data, headers=h, timeout=60)


@pytest.mark.parametrize("name,body", BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
def test_bad_request_is_a_4xx_with_an_openai_error(tiny_server, name, body):
    r = _post(tiny_server, body)
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


@pytest.mark.parametrize("name,body", ACCEPTED, ids=[n for n, _ in ACCEPTED])
def test_unicode_edge_cases_are_served(tiny_server, name, body):
    r = _post(tiny_server, body)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_keys_hosts_and_body_limits(tiny_server):
    url = f"{tiny_server.url}/v1/models"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url, headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
    assert httpx.get(f"{url}?api_key={API_KEY}").status_code == 401  # keys in URLs are refused
    assert httpx.get(url, headers={**tiny_server.headers, "Host": "attacker.example"}).status_code == 403
    assert httpx.get(url, headers={**tiny_server.headers, "Host": "localhost:1234"}).status_code == 200
    assert httpx.get(f"{tiny_server.url}/nowhere").status_code == 401  # unknown routes are not probeable
    assert "access-control-allow-origin" not in httpx.options(
        url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}).headers
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (3 * 1024 * 1024) + b'"}]}'
    assert _post(tiny_server, big).status_code == 413
    # a declared length over the limit is refused before a byte of the body is read
    host, port = tiny_server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_service_survives_everything_above(tiny_server, oai):
    """After the bad requests, the process is alive and answers normally; no 5xx was counted."""
    assert tiny_server.proc.poll() is None
    r = oai.chat.completions.create(model="tiny-F32", messages=USER, extra_body=QUICK)
    assert r.choices[0].message.content
    metrics = httpx.get(f"{tiny_server.url}/metrics", headers=tiny_server.headers).text
    server_errors = [m for m in metrics.splitlines() if 'status="5' in m and "/health" not in m]
    assert not server_errors  # /health answers 503 while the model loads, by design


# ------------------------------------------------------------------------------ worker crash

def _generating(server, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not httpx.get(f"{server.url}/health").json().get("generating"):
        assert time.monotonic() < end, "the request never started"
        time.sleep(0.02)


def test_worker_crash_is_a_503_then_the_service_recovers(tiny_server, oai):
    wait_idle(tiny_server)
    # a non-streaming request in flight when the worker is killed -9: 503 with Retry-After
    result: dict = {}
    body = {"messages": USER, "max_tokens": 500, "max_thinking_tokens": 0}
    t = threading.Thread(target=lambda: result.setdefault("r", _post(tiny_server, body)))
    t.start()
    _generating(tiny_server)
    old = tiny_server.worker_pid()
    os.kill(old, signal.SIGKILL)
    t.join(30)
    r = result["r"]
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "worker_crashed"
    # requests during the restart are refused with 503 (or wait in the queue), never hang
    tiny_server.wait_ready(60)
    assert tiny_server.worker_pid() != old
    assert oai.chat.completions.create(model="tiny-F32", messages=USER, extra_body=QUICK).choices[0].message.content

    # a stream already under way when the worker aborts (what llama.cpp does): an error event ends it
    with tiny_server.client() as c, c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        lines = s.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        os.kill(tiny_server.worker_pid(), signal.SIGABRT)
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest and rest[-1]["error"]["code"] == "worker_crashed"
    tiny_server.wait_ready(60)
    assert oai.chat.completions.create(model="tiny-F32", messages=USER, extra_body=QUICK).choices[0].message.content
    metrics = httpx.get(f"{tiny_server.url}/metrics", headers=tiny_server.headers).text
    assert 'edge_magistral_worker_failures_total{reason="killed"} 1.0' in metrics  # SIGKILL: OOM killer?
    assert 'edge_magistral_worker_failures_total{reason="crashed"} 1.0' in metrics  # SIGABRT


# ------------------------------------------------------------------------ a real (non-Magistral) model

def test_a_real_model_answers_through_the_service(smollm2_gguf, tmp_path):
    """SmolLM2 (real weights, its own chat template, no [THINK]): a natural end, no reasoning."""
    import serve_harness

    server = serve_harness.start(smollm2_gguf, tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "What is the capital "
                                                                 "of France? One word."}], max_tokens=48, seed=1)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.strip()
        assert r.choices[0].message.model_extra.get("reasoning_content") is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Capital of France?"}],
                                           max_tokens=48, seed=1, response_format={
                                               "type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
        assert isinstance(json.loads(r.choices[0].message.content)["city"], str)
    finally:
        assert server.stop() == 0
