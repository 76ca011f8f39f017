"""`edge-magistral serve --parallel 3` on the tiny Magistral as a real process: requests are decoded
together (a short request finishes while a long one that started first is still generating),
one client leaving frees its slot without disturbing the others, the queue of 2 sits in front of
the 3 slots (429 beyond 5 admitted, nothing admitted is lost), and a killed worker fails every
request in flight with 503, then serves again. One slot (the other server tests) is unchanged."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import serve_harness
from serve_harness import health, metric, until, wait_idle

pytestmark = pytest.mark.timeout(120)

USER = [{"role": "user", "content": "Say hi."}]
SLOTS, QUEUE = 3, 2


@pytest.fixture(scope="module")
def slots_server(tiny_gguf_f32, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-parallel")
    server = serve_harness.start(tiny_gguf_f32, d, "--parallel", str(SLOTS), "--queue-size", str(QUEUE),
                                 "--ctx", "2048", "--max-tokens", "2000", "--client-timeout", "3")
    yield server
    assert server.stop() == 0, server.log_text()


def _body(max_tokens: int, **kw) -> dict:
    return {"messages": USER, "max_tokens": max_tokens, "max_thinking_tokens": 0, **kw}


class _Streamer(threading.Thread):
    """A streaming client that notes when its first text and its end arrived; ``leave`` makes it
    close the connection mid-stream."""

    def __init__(self, server, max_tokens: int):
        super().__init__(daemon=True)
        self.server, self.max_tokens = server, max_tokens
        self.first = threading.Event()
        self.leave = threading.Event()
        self.finish: str | None = None
        self.usage: dict | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        body = _body(self.max_tokens, stream=True, stream_options={"include_usage": True})
        with self.server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if self.leave.is_set():
                    return  # the connection closes: the server must cancel this request
                if '"content": "' in line and '"content": ""' not in line:
                    self.first.set()
                if '"finish_reason": "' in line:
                    self.finish = line.split('"finish_reason": "')[1].split('"')[0]
                if '"usage": {' in line:
                    self.usage = json.loads(line[6:])["usage"]
        self.ended_at = time.monotonic()


def test_health_metrics_and_log_report_the_slots(slots_server):
    h = health(slots_server)
    assert h["slots"] == {"busy": 0, "total": SLOTS} and h["plan"]["n_slots"] == SLOTS
    assert metric(slots_server, "edge_magistral_slots") == SLOTS
    assert f"(tiny-F32, {SLOTS} slots)" in slots_server.log_text()  # the startup line


def test_a_short_request_finishes_while_a_long_one_is_still_decoding(slots_server):
    """Overlap that serial decoding cannot fake: B is sent after A has produced text, and B's 8
    tokens are done while A (1500 tokens, seconds of work) is still streaming."""
    wait_idle(slots_server)
    a = _Streamer(slots_server, 1500)
    a.start()
    assert a.first.wait(30)
    r = httpx.post(f"{slots_server.url}/v1/chat/completions", json=_body(8), headers=slots_server.headers,
                   timeout=30)
    b_done = time.monotonic()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert a.ended_at is None or a.ended_at > b_done, "B waited for A: the requests were serialized"
    assert health(slots_server)["slots"]["busy"] == 1  # A still decoding
    a.leave.set()
    a.join(30)
    wait_idle(slots_server)


def test_one_client_leaving_frees_its_slot_and_leaves_the_others_alone(slots_server):
    wait_idle(slots_server)
    clients = [_Streamer(slots_server, 400) for _ in range(SLOTS)]
    for c in clients:
        c.start()
    for c in clients:
        assert c.first.wait(30)
    assert health(slots_server)["slots"] == {"busy": SLOTS, "total": SLOTS}
    gone, *others = clients
    gone.leave.set()
    until(lambda: health(slots_server)["slots"]["busy"] < SLOTS, 10, what="the left client's slot freed")
    # the freed slot takes a new request at once, while the others still decode
    assert serve_harness.ttft(slots_server, _body(4)) < 2.0
    assert all(c.ended_at is None for c in others)
    for c in others:
        c.join(60)
    for c in others:  # undisturbed: every token they asked for
        assert c.finish == "length" and c.usage["completion_tokens"] == 400, (c.finish, c.usage)
    wait_idle(slots_server)
    until(lambda: metric(slots_server, "edge_magistral_slots_busy") == 0, 5, what="the gauge (sampled every 0.25 s)")


def test_queue_overflow_is_429_beyond_slots_plus_queue_and_nothing_admitted_is_lost(slots_server):
    wait_idle(slots_server)
    outcomes: list[tuple[int, dict]] = []
    lock, go = threading.Lock(), threading.Event()

    def fire() -> None:
        go.wait()
        r = httpx.post(f"{slots_server.url}/v1/chat/completions", json=_body(100), headers=slots_server.headers,
                       timeout=60)
        with lock:
            outcomes.append((r.status_code, r.json()))

    threads = [threading.Thread(target=fire) for _ in range(SLOTS + QUEUE + 4)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(60)
    codes = sorted(code for code, _ in outcomes)
    assert codes == [200] * (SLOTS + QUEUE) + [429] * 4, codes
    assert all(body["usage"]["completion_tokens"] == 100 for code, body in outcomes if code == 200)
    assert all(body["error"]["code"] == "queue_full" for code, body in outcomes if code == 429)


def test_a_killed_worker_fails_every_request_in_flight_then_serves_again(slots_server):
    wait_idle(slots_server)
    results: dict[int, httpx.Response] = {}

    def post(i: int, max_tokens: int) -> None:
        results[i] = httpx.post(f"{slots_server.url}/v1/chat/completions", json=_body(max_tokens),
                                headers=slots_server.headers, timeout=60)

    running = [threading.Thread(target=post, args=(i, 1500)) for i in range(SLOTS)]
    for t in running:
        t.start()
    until(lambda: health(slots_server)["slots"]["busy"] == SLOTS, 20, what="every slot busy")
    queued = threading.Thread(target=post, args=(SLOTS, 4))
    queued.start()
    until(lambda: health(slots_server)["queue"] == 1, 10, what="one request queued")
    old = slots_server.worker_pid()
    os.kill(old, signal.SIGKILL)
    for t in running:
        t.join(30)
    for i in range(SLOTS):
        r = results[i]
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "worker_crashed"
    queued.join(60)  # the queued request waited for the new worker
    assert results[SLOTS].status_code == 200 and results[SLOTS].json()["usage"]["completion_tokens"] == 4
    assert slots_server.worker_pid() != old
    assert health(slots_server)["slots"] == {"busy": 0, "total": SLOTS}
