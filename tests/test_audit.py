"""The audit trail: hash chain as documented, tamper detection with the right line, redaction,
concurrent writers, a full disk that leaves the log intact, and the `audit` CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_magistral import audit
from edge_magistral.audit import GENESIS, AuditLog, AuditRecord, CorruptAuditLogError, verify_file
from edge_magistral.cli import cli
from edge_magistral.errors import BadInputError, StorageError


def make_record(i: int, **overrides) -> AuditRecord:
    fields = dict(
        request_id=f"req-{i}", model_sha256="ab" * 32, quant="Q4_K_M",
        plan={"n_gpu_layers": 40, "n_ctx": 32768, "type_k": "q8_0"},
        sampling={"temperature": 0.7, "top_p": 0.95, "seed": i},
        prompt=[{"role": "user", "content": f"question {i}"}],
        thinking=f"thinking about {i}", answer=f"answer {i}",
        watchdog_events=[{"action": "force_close", "reason": "think budget", "at_token": 512}],
        usage={"prompt_tokens": 12, "reasoning_tokens": 512, "answer_tokens": 20},
        finish_reason="stop", timings={"ttft_s": 0.25, "tokens_per_s": 31.5},
    )
    fields.update(overrides)
    return AuditRecord(**fields)


def write_log(path: Path, n: int, **kw) -> list[str]:
    log = AuditLog(path, **kw)
    return [log.append(make_record(i)) for i in range(1, n + 1)]


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rehash(rec: dict) -> bytes:
    """A record re-serialized and re-hashed by the documented rules (what a forger would do)."""
    rec = {k: v for k, v in rec.items() if k != "hash"}
    body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    rec["hash"] = hashlib.sha256(body).hexdigest()
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# ------------------------------------------------------------------------------ round trip

def test_append_then_verify_and_the_chain_is_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    hashes = write_log(path, 3)

    result = verify_file(path)
    assert result.ok and result.records == 3 and result.bad_line is None
    assert result.last_hash == hashes[-1]
    prev = GENESIS
    for seq, line in enumerate(lines_of(path), start=1):
        rec = json.loads(line)
        assert rehash(rec) == line  # hash = sha256(canonical JSON without "hash"); line = canonical
        assert (rec["seq"], rec["prev"], rec["hash"]) == (seq, prev, hashes[seq - 1])
        assert rec["time"].endswith("Z") and rec["request_id"] == f"req-{seq}"
        assert rec["output"] == {"thinking": f"thinking about {seq}", "answer": f"answer {seq}"}
        assert rec["watchdog"][0]["reason"] == "think budget" and rec["plan"]["n_ctx"] == 32768
        prev = rec["hash"]
    assert result.first_time == json.loads(lines_of(path)[0])["time"]
    assert result.last_time == json.loads(lines_of(path)[-1])["time"]


def test_a_new_writer_continues_the_chain_after_a_large_last_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    big = "é漢" * 100_000  # ~500 KB line: the tail is read backwards over several chunks
    AuditLog(path).append(make_record(3, answer=big))
    AuditLog(path).append(make_record(4))

    result = verify_file(path)
    assert result.ok and result.records == 4
    assert json.loads(lines_of(path)[2])["output"]["answer"] == big


def test_an_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path)  # opening creates the file, private to its owner
    assert path.stat().st_size == 0 and path.stat().st_mode & 0o777 == 0o600
    result = verify_file(path)
    assert result.ok and result.records == 0 and result.last_hash == GENESIS


# ------------------------------------------------------------------------------ tampering

def _edit_field(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"quant":"Q4_K_M"', b'"quant":"Q8_0"')
    return lines


def _edit_and_rehash(lines: list[bytes]) -> list[bytes]:
    rec = json.loads(lines[2])
    rec["output"]["answer"] = "a different answer"
    lines[2] = rehash(rec)
    return lines


def _reformat(lines: list[bytes]) -> list[bytes]:
    lines[1] = json.dumps(json.loads(lines[1]), sort_keys=True).encode() + b"\n"
    return lines


def _delete_third(lines: list[bytes]) -> list[bytes]:
    del lines[2]
    return lines


def _delete_first(lines: list[bytes]) -> list[bytes]:
    return lines[1:]


def _swap_second_and_third(lines: list[bytes]) -> list[bytes]:
    lines[1], lines[2] = lines[2], lines[1]
    return lines


def _insert_forged_wrong_prev(lines: list[bytes]) -> list[bytes]:
    rec = json.loads(lines[2])
    rec.update(request_id="forged", prev="f" * 64)
    return lines[:2] + [rehash(rec)] + lines[2:]


def _insert_forged_right_prev(lines: list[bytes]) -> list[bytes]:
    rec = json.loads(lines[2])
    rec["request_id"] = "forged"
    return lines[:2] + [rehash(rec)] + lines[2:]


def _truncate_mid_line(lines: list[bytes]) -> list[bytes]:
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    return lines


def _drop_last_newline(lines: list[bytes]) -> list[bytes]:
    lines[-1] = lines[-1][:-1]
    return lines


def _garbage_line(lines: list[bytes]) -> list[bytes]:
    lines[1] = b"not json at all\n"
    return lines


@pytest.mark.parametrize("tamper, bad_line, problem", [
    (_edit_field, 3, "does not match its hash"),
    (_edit_and_rehash, 4, "prev does not match the hash of line 3"),
    (_reformat, 2, "canonical form"),
    (_delete_third, 3, "seq is 4, expected 3"),
    (_delete_first, 1, "seq is 2, expected 1"),
    (_swap_second_and_third, 2, "seq is 3, expected 2"),
    (_insert_forged_wrong_prev, 3, "prev does not match the hash of line 2"),
    (_insert_forged_right_prev, 4, "seq is 3, expected 4"),
    (_truncate_mid_line, 5, "incomplete last line"),
    (_drop_last_newline, 5, "incomplete last line"),
    (_garbage_line, 2, "not a valid JSON record"),
])
def test_tampering_is_found_at_its_line(tmp_path: Path, tamper, bad_line: int, problem: str) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    path.write_bytes(b"".join(tamper(lines_of(path))))

    result = verify_file(path)
    assert not result.ok
    assert result.bad_line == bad_line and problem in result.problem
    assert result.records == bad_line - 1


def test_the_writer_refuses_to_append_after_a_damaged_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in (1, 2):
        log.append(make_record(i))
    path.write_bytes(path.read_bytes()[:-10])  # a crash mid-write
    damaged = path.read_bytes()

    with pytest.raises(CorruptAuditLogError, match="audit verify") as e:
        log.append(make_record(3))
    assert "incomplete last line" in str(e.value) and "move the file aside" in str(e.value)
    with pytest.raises(CorruptAuditLogError):
        AuditLog(path)  # refused at open, too
    assert path.read_bytes() == damaged


def test_the_writer_refuses_a_last_record_edited_in_place(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    path.write_bytes(path.read_bytes().replace(b'"answer":"answer 2"', b'"answer":"answer X"'))
    with pytest.raises(CorruptAuditLogError, match="does not match its hash"):
        AuditLog(path)


# ------------------------------------------------------------------------------ redaction

@pytest.mark.parametrize("mode, hidden", [
    ("none", set()),
    ("thinking", {"thinking"}),
    ("prompt", {"prompt"}),
    ("all", {"prompt", "thinking", "answer"}),
])
def test_redaction_keeps_only_a_hash(tmp_path: Path, mode: str, hidden: set[str]) -> None:
    path = tmp_path / "audit.jsonl"
    prompt = [{"role": "system", "content": "SECRET-SYSTEM"}, {"role": "user", "content": "SECRET-PROMPT"}]
    texts = {"prompt": prompt, "thinking": "SECRET-THOUGHT", "answer": "SECRET-ANSWER"}
    AuditLog(path, redact=mode).append(make_record(1, **texts))

    data = path.read_bytes()
    rec = json.loads(data)
    stored = {"prompt": rec["prompt"], **rec["output"]}
    markers = {"prompt": [b"SECRET-SYSTEM", b"SECRET-PROMPT"], "thinking": [b"SECRET-THOUGHT"],
               "answer": [b"SECRET-ANSWER"]}
    for name, value in texts.items():
        if name in hidden:
            assert not any(m in data for m in markers[name])
            raw = value.encode() if isinstance(value, str) else audit.canonical_json(value)
            assert stored[name] == {"redacted": "sha256", "sha256": hashlib.sha256(raw).hexdigest()}
        else:
            assert stored[name] == value
    assert rec["redact"] == mode and verify_file(path).ok


def test_an_unknown_redaction_mode_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="none, thinking, prompt, all"):
        AuditLog(tmp_path / "audit.jsonl", redact="everything")


@dataclass
class _Settings:
    n_ctx: int
    path: Path


def test_awkward_values_are_recorded_as_json_that_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    plan = {"settings": _Settings(4096, Path("/m/q.gguf")), "ids": (1, 2)}
    AuditLog(path).append(make_record(
        1, answer="bad \udce9 surrogate", plan=plan,
        usage={"tokens": np.int64(7), "rate": float("nan"), 3: "int key"}))

    rec = json.loads(path.read_bytes())
    assert rec["output"]["answer"] == "bad \ufffd surrogate"
    assert rec["plan"] == {"settings": {"n_ctx": 4096, "path": "/m/q.gguf"}, "ids": [1, 2]}
    assert rec["usage"] == {"tokens": 7, "rate": None, "3": "int key"}
    assert verify_file(path).ok


# ------------------------------------------------------------------------------ concurrency

def _append_many(path: str, worker: int, n: int, barrier) -> None:
    log = AuditLog(path)
    barrier.wait()
    for i in range(n):
        log.append(make_record(i, request_id=f"w{worker}-{i}", answer="x" * 3000))


def test_two_processes_appending_keep_one_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 40, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    result = verify_file(path)
    assert result.ok and result.records == 80, result.problem
    ids = [json.loads(line)["request_id"] for line in lines_of(path)]
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in (0, 1) for i in range(40))


# ------------------------------------------------------------------------------ storage errors

def test_a_short_write_then_enospc_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    before = path.read_bytes()
    real_write = os.write
    calls: list[int] = []

    def half_then_full(fd: int, data) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # the disk fills up mid-line
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(audit.os, "write", half_then_full)
    with pytest.raises(StorageError, match="disk full"):
        AuditLog(path).append(make_record(3))
    assert len(calls) == 2 and path.read_bytes() == before

    monkeypatch.setattr(audit.os, "write", real_write)
    AuditLog(path).append(make_record(3))
    assert verify_file(path).records == 3


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_a_storage_error_and_the_log_stays_valid(small_disk: Path) -> None:
    path = small_disk / "audit.jsonl"
    log = AuditLog(path)
    log.append(make_record(1))
    log.append(make_record(2))
    size = path.stat().st_size
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError) as full:
        while True:
            f.write(b"\0" * 1024)
    assert full.value.errno == errno.ENOSPC

    with pytest.raises(StorageError, match="disk full"):
        log.append(make_record(3, answer="y" * 20_000))
    assert path.stat().st_size == size
    assert verify_file(path).ok and verify_file(path).records == 2

    filler.unlink()
    log.append(make_record(3, answer="y" * 20_000))
    assert verify_file(path).records == 3


def test_an_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match="cannot open audit log"):
        AuditLog(tmp_path / "a-file" / "audit.jsonl")


# ------------------------------------------------------------------------------ the CLI

def run_cli(*args: str):
    import edge_magistral.cli.audit_cmds  # noqa: F401  (registers `audit`)

    return CliRunner().invoke(cli, ["audit", *args])


def test_cli_verify_an_intact_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    hashes = write_log(path, 2)
    r = run_cli("verify", str(path))
    assert r.exit_code == 0, r.output
    assert "intact, 2 record(s)" in r.stdout and hashes[-1] in r.stdout


def test_cli_verify_a_tampered_log_prints_one_line_and_exits_4(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    path.write_bytes(b"".join(_swap_second_and_third(lines_of(path))))
    r = run_cli("verify", str(path))
    assert r.exit_code == 4 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "line 2: seq is 3, expected 2" in r.stderr
    assert "1 record(s) before it are intact" in r.stderr


def test_cli_verify_a_missing_file_is_bad_input(tmp_path: Path) -> None:
    r = run_cli("verify", str(tmp_path / "nope.jsonl"))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_cli_show_prints_the_last_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in (1, 2):
        log.append(make_record(i, answer="one\u2028line"))  # a JSON string may hold U+2028 raw
    r = run_cli("show", "-n", "1", str(path))
    assert r.exit_code == 0 and "not JSON" not in r.stdout
    assert '"request_id": "req-2"' in r.stdout and "req-1" not in r.stdout
