"""Property-based fuzzing of the service with schemathesis, from the server's own OpenAPI document:
no generated request, valid or not, may produce a server error."""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
import serve_harness
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.timeout(300)
EXAMPLES = 20  # per operation and mode: enough to hit every field's edges, small enough to stay fast


@pytest.fixture(scope="module")
def fuzz_server(tiny_gguf_f32, tmp_path_factory):
    """A server whose valid requests stay short (--max-tokens 16), so that fuzzing is fast."""
    server = serve_harness.start(tiny_gguf_f32, tmp_path_factory.mktemp("fuzz"), "--max-tokens", "16",
                                 "--queue-size", "2", "--request-timeout", "20")
    yield server
    assert server.stop() == 0, server.log_text()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_request_makes_a_server_error(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=fuzz_server.headers)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                               "GET /v1/models", "GET /health"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not op.label.startswith("POST"):
            continue  # nothing to make invalid in a GET without parameters
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,  # the same cases every run
                  suppress_health_check=list(HealthCheck))
        def call(case):
            case.call_and_validate(headers=fuzz_server.headers, checks=[not_a_server_error], timeout=60)
        call()


def test_the_server_is_alive_after_fuzzing(fuzz_server):
    """... and the fuzzing really reached the generation routes, with valid and invalid bodies."""
    assert fuzz_server.proc.poll() is None
    assert fuzz_server.wait_ready(5)["status"] == "ok"
    metrics = httpx.get(f"{fuzz_server.url}/metrics", headers=fuzz_server.headers).text
    counts = {(m.group(1), m.group(2)[0]): 0.0 for m in _REQUESTS.finditer(metrics)}
    for m in _REQUESTS.finditer(metrics):
        counts[m.group(1), m.group(2)[0]] += float(m.group(3))
    print(sorted(counts.items()))  # shown with -s: how many of the generated requests succeeded
    for route in ("/v1/chat/completions", "/v1/completions"):
        assert counts.get((route, "2"), 0) >= 3 and counts.get((route, "4"), 0) >= 3, sorted(counts.items())
        assert (route, "5") not in counts, counts


_REQUESTS = re.compile(r'edge_magistral_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\S+)')
