"""The service's pieces without a model: keys, the guard (in-process ASGI), request validation,
budget mapping, the `serve` command's refusals, model admission, withheld exception messages and
a server that reads the wall clock for nothing but a timestamp (the worker and the supervisor:
test_server_protocol.py)."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import socket
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from edge_magistral.build import manifest as mf
from edge_magistral.errors import BadInputError, CorruptModelError
from edge_magistral.hosts import is_loopback
from edge_magistral.server import ServerConfig, build_service, load_api_keys
from edge_magistral.server.api import think_budget
from edge_magistral.server.app import validation_error
from edge_magistral.server.guard import Guard, GuardConfig, KeyChecker, host_name
from edge_magistral.server.schemas import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, ChatCompletionRequest

KEY = "k" * 20


# ------------------------------------------------------------------------------------ keys

def test_keys_come_from_file_env_and_systemd_credential(tmp_path: Path):
    f = tmp_path / "keys"
    f.write_text(f"# ops\n{'a' * 16}\n\n  {'b' * 16}  \n")
    f.chmod(0o600)
    cred = tmp_path / "cred"
    cred.mkdir()
    (cred / "api-key").write_text("c" * 32 + "\n")
    keys = load_api_keys(str(f), {"EDGE_MAGISTRAL_API_KEY": "d" * 16, "CREDENTIALS_DIRECTORY": str(cred)})
    assert keys == ["a" * 16, "b" * 16, "d" * 16, "c" * 32]
    assert load_api_keys(None, {}) == []


@pytest.mark.parametrize("key", ["short", "has space in it 123", "ключ-ключ-ключ-ключ"])
def test_weak_or_odd_keys_are_refused(key: str):
    with pytest.raises(BadInputError, match="at least 16"):
        load_api_keys(None, {"EDGE_MAGISTRAL_API_KEY": key})


def test_key_checker_accepts_only_configured_keys():
    k = KeyChecker(["a" * 16, "b" * 16])
    assert k.check(b"a" * 16) and k.check(b"b" * 16)
    assert not k.check(b"a" * 15) and not k.check(b"") and not k.check(b"a" * 17)
    assert not KeyChecker([]).enabled


@pytest.mark.parametrize("header,host,loop", [
    ("localhost:8080", "localhost", True), ("127.0.0.1", "127.0.0.1", True), ("[::1]:80", "::1", True),
    ("127.8.9.10:1", "127.8.9.10", True), ("Evil.Example:80", "evil.example", False),
    ("localhost.evil.example", "localhost.evil.example", False)])
def test_host_header_parsing(header: str, host: str, loop: bool):
    assert host_name(header) == host and is_loopback(host) is loop


# ------------------------------------------------------------------------- the guard in-process

def _app(tmp_path: Path, **kw) -> object:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    return build_service(ServerConfig(model_path=str(model), api_keys=(KEY,), **kw)).app


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


def test_guard_order_and_openai_error_bodies(tmp_path: Path):
    async def go():
        async with _client(_app(tmp_path)) as c:
            auth = {"Authorization": f"Bearer {KEY}"}
            assert (await c.get("/v1/models")).status_code == 401
            r = await c.get("/v1/models", headers=auth)
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
            assert (await c.get("/health")).status_code == 503  # open, and honest: nothing loaded
            assert (await c.get("/health", headers={"Host": "evil.example"})).status_code == 403
            r = await c.get(f"/v1/models?key={KEY}", headers=auth)
            assert r.status_code == 401 and r.json()["error"]["code"] == "key_in_query"
            r = await c.post("/v1/chat/completions", headers=auth, content=b"x" * (3 * 1024 * 1024))
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
            r = await c.post("/v1/chat/completions", headers=auth, json={"messages": MSG})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"  # the model is not loaded
    asyncio.run(go())


def test_cors_is_off_unless_an_origin_is_given(tmp_path: Path):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}

    async def go():
        async with _client(_app(tmp_path)) as c:
            assert "access-control-allow-origin" not in (await c.options("/v1/models", headers=pre)).headers
        async with _client(_app(tmp_path, cors_origins=("http://app.example",))) as c:
            r = await c.options("/v1/models", headers=pre)
            assert r.headers["access-control-allow-origin"] == "http://app.example"
    asyncio.run(go())


def test_a_slow_upload_is_cut_with_408():
    sent: list[dict] = []

    async def app(scope, receive, send):  # pragma: no cover - must never be reached
        raise AssertionError("the application saw a request")

    async def slow_receive():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message):
        sent.append(message)

    guard = Guard(app, GuardConfig(read_timeout_s=0.3))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"host", b"localhost")],
             "query_string": b""}
    asyncio.run(guard(scope, slow_receive, send))
    assert sent[0]["status"] == 408


# ------------------------------------------------------------------------------ validation

MSG = [{"role": "user", "content": "hi"}]


def test_validation_messages_name_the_field():
    from pydantic import ValidationError

    cases = {
        json.dumps({"messages": MSG, "stop": ["a"] * 5}): ("stop", "at most 4"),
        json.dumps({"messages": MSG, "presence_penalty": 1}): ("presence_penalty", "not supported"),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
            ("messages.0.content.0.type", "'text'"),
        json.dumps({"messages": MSG, "max_tokens": 2.5}): ("max_tokens", "integer"),
    }
    for body, (param, words) in cases.items():
        with pytest.raises(ValidationError) as e:
            ChatCompletionRequest.model_validate_json(body)
        err = validation_error(e.value.errors())
        assert err.status == 400 and err.param == param and words in err.message, err.message
    assert ChatCompletionRequest.model_validate({"messages": MSG, "max_tokens": 7.0}).max_tokens == 7


def test_schema_limits_match_the_engine():
    """The front checks a schema against the caps the engine's check_schema enforces (one source)."""
    from edge_magistral import generation

    assert (MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH) == (generation.MAX_SCHEMA_BYTES, generation.MAX_SCHEMA_DEPTH)


@pytest.mark.parametrize("extra,expected", [
    ({}, None), ({"max_thinking_tokens": 0}, 0), ({"max_thinking_tokens": 500}, 500), ({"reasoning_effort": "none"}, 0),
    ({"reasoning_effort": "low"}, 1024), ({"reasoning_effort": "medium"}, 4096), ({"reasoning_effort": "high"}, 8192)])
def test_reasoning_effort_maps_to_budgets(extra: dict, expected: int | None):
    req = ChatCompletionRequest.model_validate({"messages": MSG, **extra})
    assert think_budget(req, default=8192, n_ctx=32768) == expected
    if expected:  # never more than the server's default, which the plan sized for this box
        assert think_budget(req, default=2048, n_ctx=32768) == (500 if expected == 500 else min(expected, 2048))


# ------------------------------------------------------------------------------- the command

def _serve(*args: str, env: dict | None = None):
    from edge_magistral.cli import cli, serve_cmds  # noqa: F401  (registers `serve`)

    return CliRunner().invoke(cli, ["serve", *args], env={"EDGE_MAGISTRAL_API_KEY": "", **(env or {})})


def test_serve_refuses_a_public_bind_without_a_key(tmp_path: Path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    r = _serve("--model", str(model), "--host", "0.0.0.0")
    assert r.exit_code == 2 and "without an API key" in r.output and "--insecure-no-auth" in r.output


def test_serve_reports_a_busy_port_before_loading(tmp_path: Path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _serve("--model", str(model), "--port", str(s.getsockname()[1]))
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.output


def test_serve_needs_a_model(tmp_path: Path):
    r = _serve(env={"EDGE_MAGISTRAL_MODEL": ""})
    assert r.exit_code == 3 and "no model" in r.output


def test_serve_reads_the_service_config_and_options_override_it(tmp_path: Path):
    from edge_magistral.systemd import ServiceConfig

    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    config = tmp_path / "config.yaml"
    config.write_text(ServiceConfig(model=str(model), host="0.0.0.0", port=1).to_yaml())
    r = _serve("--config", str(config))
    assert r.exit_code == 2 and "refusing to listen on 0.0.0.0" in r.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve("--config", str(config), "--host", "127.0.0.1", "--port", str(port))
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output


# ---------------------------------------------------------------------------- model admission

def _listed(directory: Path, data: bytes) -> Path:
    model = directory / "m.gguf"
    model.write_bytes(data)
    mf.save(directory, mf.Manifest(files=[mf.FileEntry("m.gguf", "Q4_K_M", len(data), hashlib.sha256(data).hexdigest(),
                                                       mf.now_utc())]))
    return model


def test_admission_hashes_once_and_again_only_when_the_file_changed(tmp_path: Path):
    """The identity verified spares a restart the hash; any change brings it back."""
    from edge_magistral.server.admission import admit

    model = _listed(tmp_path, b"gguf" * 1000)
    hashed: list[int] = []  # the size of each hash admission started

    class Sizes:  # a Progress (edge_magistral.progress) that records each task's total
        def task(self, description: str, total: int):
            hashed.append(total)
            return lambda n: None

    first = admit(str(model), progress=Sizes())
    assert first.file_id is not None and first.note.startswith("sha256 verified in") and hashed == [4000]
    again = admit(str(model), first.file_id, progress=Sizes())
    assert again.file_id == first.file_id and again.note.startswith("unchanged") and hashed == [4000]

    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, touched: hashed again, accepted
    touched = admit(str(model), first.file_id, progress=Sizes())
    assert len(hashed) == 2 and touched.file_id != first.file_id

    other = tmp_path / "new.partial"  # same size, other bytes, renamed into place
    other.write_bytes(b"GGUF" * 1000)
    os.replace(other, model)
    with pytest.raises(CorruptModelError, match="sha256 .* does not match manifest.json"):
        admit(str(model), touched.file_id)

    model.write_bytes(b"gguf" * 999)  # another size: refused without reading it
    with pytest.raises(CorruptModelError, match="3996 bytes, but manifest.json lists 4000"):
        admit(str(model), None, progress=Sizes())
    assert len(hashed) == 2


def test_admission_follows_a_symlink_and_loads_unlisted_models_unverified(tmp_path: Path):
    from edge_magistral.server.admission import admit, still_same

    (tmp_path / "store").mkdir()
    model = _listed(tmp_path / "store", b"weights")
    link = tmp_path / "current.gguf"
    link.symlink_to(model)
    admitted = admit(str(link))  # the manifest beside the target
    assert admitted.file_id is not None and still_same(str(link), admitted.file_id)
    os.replace(_listed(tmp_path, b"other"), model)  # replaced after the check: the worker's last look sees it
    assert not still_same(str(link), admitted.file_id)

    loose = tmp_path / "loose.gguf"
    loose.write_bytes(b"x")
    assert admit(str(loose)).file_id is None and "not checked" in admit(str(loose)).note
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="unreadable manifest"):
        admit(str(loose))


# ------------------------------------------------------------------------------- the worker

def test_tracebacks_withhold_the_exception_message():
    """A bug's traceback is printed, but its message may quote the prompt."""
    from edge_magistral.server.worker import scrubbed_traceback

    prompt = "".join(["pro", "mpt-", "3f9a"])  # built, so that the source line shown does not contain it
    try:
        raise KeyError(f"the user wrote {prompt}")
    except KeyError as e:
        text = scrubbed_traceback(e)
    assert "test_tracebacks_withhold_the_exception_message" in text and "builtins.KeyError" in text
    assert "prompt-3f9a" not in text


# ------------------------------------------------------------------------------------ clocks

def test_server_timeouts_never_read_the_wall_clock():
    """The server reads the wall clock only for the ``created`` field of a
    response; every timeout uses time.monotonic or the event loop's (monotonic) clock."""
    import edge_magistral.server as server

    reads = []
    for path in sorted(Path(server.__file__).parent.glob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if (isinstance(node, ast.Attribute) and node.attr in ("time", "time_ns", "now", "utcnow", "today")
                    and isinstance(node.value, ast.Name) and node.value.id in ("time", "datetime", "date")):
                reads.append((path.name, lines[node.lineno - 1].strip()))
    assert reads and all(name == "api.py" and "created" in line for name, line in reads), reads

