"""The audit trail: an append-only, hash-chained JSONL record of every request.

One line per request. Each line is the *canonical JSON* of one record (``canonical_json``: sorted
keys, no spaces, UTF-8, no NaN) followed by ``\\n``. A record holds:

- ``v`` (format version, 1), ``seq`` (1, 2, 3, … = its line number; ordering that survives a wall
  clock stepping backwards), ``time`` (UTC ISO-8601 with microseconds, ``Z``), ``redact`` (mode),
- the request: ``request_id``, ``model_sha256``, ``quant``, ``plan``, ``sampling``, ``prompt``,
  ``output`` (``{"thinking": …, "answer": …}``, plus ``tool_calls``, ``[{"id", "name",
  "arguments"}]``, when the model called tools and ``tool_error`` when its call was botched),
  ``watchdog`` (list of events), ``usage``, ``finish_reason``, ``timings``,
- ``prev``: the previous record's ``hash`` (``GENESIS``, 64 zeros, for the first record), and
- ``hash``: sha256 (hex) of the canonical JSON of the record *without* its ``hash`` key.

So an edited line fails its own hash, and a removed, inserted or reordered line breaks ``seq`` and
``prev``. Anyone who can write the file can also rebuild the whole chain; the chain proves that the
log was not altered *by accident or by a naive edit*, and pinning the last hash elsewhere (see
``VerifyResult.last_hash``) extends that to deliberate edits. Removing whole records from the *end*
is only detectable against such a pinned hash or record count.

Durability: each record is one ``write()`` of the full line under an exclusive ``flock`` (so
appending processes never interleave), then ``fsync``. A failed write (a full disk) is rolled back
to the previous length and raised as ``StorageError``; the log stays valid.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from edge_magistral.chat import Message, results_in_call_order, uses_tools
from edge_magistral.errors import BadInputError, StorageError
from edge_magistral.tools import Conversation

FORMAT_VERSION = 1
GENESIS = "0" * 64
REDACT_MODES = ("none", "thinking", "prompt", "all")
_TAIL_CHUNK = 64 * 1024
_REQUIRED = ("v", "seq", "time", "prev", "hash")
_SURROGATE = re.compile("[\ud800-\udfff]")


class CorruptAuditLogError(BadInputError):
    """The audit log was edited, reordered or truncated (exit code 4, like any corrupt file)."""

    exit_code = 4


@dataclass
class AuditRecord:
    """What the caller knows about one finished request; the log adds time, seq and hashes.

    ``prompt`` is any JSON value (see :func:`chat_prompt`, or a raw prompt's string). Dataclasses,
    tuples, paths and enums inside ``plan`` etc. are converted to JSON. ``tool_calls``: the calls
    the model made (anything with ``id``, ``name`` and ``arguments``, as ParsedCall).
    """

    request_id: str
    model_sha256: str
    quant: str
    plan: dict[str, Any]
    sampling: dict[str, Any]
    prompt: Any
    thinking: str
    answer: str
    watchdog_events: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    tool_calls: Sequence[Any] = ()
    tool_error: str | None = None


@dataclass
class VerifyResult:
    """The outcome of checking a whole log: intact, or the first bad line and what is wrong."""

    ok: bool
    records: int  # intact records (all of them when ok, those before bad_line otherwise)
    first_time: str | None = None
    last_time: str | None = None
    last_hash: str = GENESIS  # hash of the last intact record: pin it elsewhere to detect tail cuts
    bad_line: int | None = None  # 1-based
    problem: str | None = None


# ---------------------------------------------------------------------------- canonical form

def canonical_json(value: Any) -> bytes:
    """The one byte form a record is hashed and written in, so hashes are reproducible anywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``record`` without its ``hash`` key."""
    return sha256_hex(canonical_json({k: v for k, v in record.items() if k != "hash"}))


def to_json_value(value: Any) -> Any:
    """``value`` as plain JSON data that survives a write/read round trip unchanged.

    Lone surrogates become U+FFFD and NaN/inf become null: otherwise a record could not be encoded
    (or would read back different from what was hashed) and the request would fail to be audited.
    """
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, numbers.Integral):  # also numpy integers
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, Path):
        return _clean_text(str(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_value(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {_clean_text(str(k)): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    raise TypeError(f"audit: cannot record a {type(value).__name__} as JSON")


def _clean_text(s: str) -> str:
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", s)


def _redacted(value: Any) -> dict[str, str]:
    """What replaces a redacted field: its sha256, so a holder of the text can prove it matches.

    Strings hash as their UTF-8 bytes, anything else as its canonical JSON. Short or guessable
    texts can be confirmed by guessing; redaction hides text, it does not make it unguessable.
    """
    data = value.encode("utf-8") if isinstance(value, str) else canonical_json(value)
    return {"redacted": "sha256", "sha256": sha256_hex(data)}


def chat_prompt(conv: Conversation) -> Any:
    """A chat's ``prompt`` as the log keeps it: the messages as the model read them (``developer``
    as ``system``, text parts joined, tool results in the order of their calls), in OpenAI's shape.

    A plain chat is the list ``[{"role", "content"}, …]``. A tool conversation (tools offered, or
    tool calls and results in the messages) is ``{"messages", "tools", "tool_choice",
    "parallel_tool_calls"}``, its messages with ``reasoning_content``, ``tool_calls`` (``[{"id",
    "type", "function": {"name", "arguments"}}]``) and ``tool_call_id`` where they have them, the
    tools as the prompt lists them, ``tool_choice`` as OpenAI writes it.
    """
    if not uses_tools(conv.messages, conv.tools):
        return [_message(m) for m in conv.messages]
    messages = [_message(m) for m in results_in_call_order(conv.messages)]
    choice = ({"type": "function", "function": {"name": conv.tool_name}} if conv.tool_choice == "function"
              else conv.tool_choice)
    return {"messages": messages, "tools": [t.as_json() for t in conv.tools], "tool_choice": choice,
            "parallel_tool_calls": conv.parallel_tool_calls}


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.reasoning is not None:
        out["reasoning_content"] = m.reasoning
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def record_body(record: AuditRecord, redact: str) -> dict[str, Any]:
    """The request part of a log line (no seq/time/hashes), with ``redact`` applied."""
    prompt, thinking, answer = (to_json_value(x) for x in (record.prompt, record.thinking, record.answer))
    output: dict[str, Any] = {"thinking": thinking, "answer": answer}
    if record.tool_calls:
        output["tool_calls"] = to_json_value([{"id": c.id, "name": c.name, "arguments": c.arguments}
                                              for c in record.tool_calls])
    if record.tool_error is not None:
        output["tool_error"] = to_json_value(record.tool_error)
    if redact in ("prompt", "all"):
        prompt = _redacted(prompt)
    if redact in ("thinking", "all"):
        output["thinking"] = _redacted(thinking)
    if redact == "all":  # the calls' arguments are the model's output as much as its answer is
        output.update((k, _redacted(v)) for k, v in output.items() if k != "thinking")
    return {
        "request_id": to_json_value(record.request_id),
        "model_sha256": to_json_value(record.model_sha256),
        "quant": to_json_value(record.quant),
        "plan": to_json_value(record.plan),
        "sampling": to_json_value(record.sampling),
        "prompt": prompt,
        "output": output,
        "watchdog": to_json_value(record.watchdog_events),
        "usage": to_json_value(record.usage),
        "finish_reason": to_json_value(record.finish_reason),
        "timings": to_json_value(record.timings),
        "redact": redact,
    }


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------- checking one line

def check_line(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a well-formed line (with its newline), else (None, what is wrong).

    Only the line itself is checked here (complete, JSON, canonical, matches its own hash); the
    chain (``seq``/``prev``) is checked by the caller that knows the previous record.
    """
    if not line.endswith(b"\n"):
        return None, "incomplete last line (no newline): the tail was cut off, e.g. by a crash mid-write"
    body = line[:-1]
    try:
        rec = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "not a valid JSON record"
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        return None, f"missing field(s) {', '.join(missing)}"
    if not (type(rec["seq"]) is int and isinstance(rec["prev"], str) and isinstance(rec["hash"], str)):
        return None, "seq, prev or hash has the wrong type"
    if rec["v"] != FORMAT_VERSION:
        return None, f"unknown format version {rec['v']!r} (this tool writes {FORMAT_VERSION})"
    try:
        canonical = canonical_json(rec)
    except ValueError:
        return None, "not in canonical form (edited)"
    if canonical != body:
        return None, "not in canonical form (edited or reformatted)"
    if record_hash(rec) != rec["hash"]:
        return None, "content does not match its hash (edited)"
    return rec, None


def _check_link(rec: dict[str, Any], seq: int, prev: str) -> str | None:
    """What is wrong with ``rec`` as line ``seq`` after a record whose hash is ``prev``, if anything."""
    if rec["seq"] != seq:
        return f"seq is {rec['seq']!r}, expected {seq}: a record was removed, inserted or moved here"
    if rec["prev"] == prev:
        return None
    if seq == 1:
        return "prev is not the genesis value: this is not the log's first record"
    return (f"prev does not match the hash of line {seq - 1}: that line was edited (and its hash "
            "recomputed), or a record was removed, inserted or moved here")


# ---------------------------------------------------------------------------- verification

def verify_file(path: str | os.PathLike[str]) -> VerifyResult:
    """Check every line of the log at ``path``; stop at the first problem.

    Only the bytes present when it starts are checked (its size is read under a shared lock, so a
    record being appended right then is never mistaken for a truncated tail). Streams the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = _locked_size(f)
            return _verify_lines(_lines(f, size))
    except FileNotFoundError:
        raise BadInputError(f"audit log {path} does not exist") from None
    except IsADirectoryError:
        raise BadInputError(f"audit log {path} is a directory, not a file") from None
    except PermissionError as e:
        raise StorageError(f"cannot read audit log {path}: {e.strerror}") from None


def _locked_size(f: BinaryIO) -> int:
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    try:
        return os.fstat(f.fileno()).st_size
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _lines(f: BinaryIO, size: int):
    """The lines in the first ``size`` bytes of ``f`` (the last may lack its newline)."""
    pos = 0
    while pos < size:
        line = f.readline(size - pos)
        if not line:
            break
        pos += len(line)
        yield line


def _verify_lines(lines) -> VerifyResult:
    result = VerifyResult(ok=True, records=0)
    for lineno, line in enumerate(lines, start=1):
        rec, problem = check_line(line)
        if rec is not None:
            problem = _check_link(rec, lineno, result.last_hash)
        if problem is not None:
            result.ok, result.bad_line, result.problem = False, lineno, problem
            return result
        result.records = lineno
        result.first_time = result.first_time or str(rec["time"])
        result.last_time = str(rec["time"])
        result.last_hash = rec["hash"]
    return result


# ---------------------------------------------------------------------------- writing

class AuditLog:
    """Appends records to one log file; safe to share between threads and processes.

    ``redact``: ``none`` keeps everything; ``thinking`` replaces the model's reasoning with its
    sha256; ``prompt`` replaces the prompt (all messages, system included); ``all`` replaces prompt,
    thinking and answer. Opening creates the file (mode 0600: it holds prompts) and refuses a log
    whose last line is damaged, so a service fails at start rather than on its first request.
    """

    def __init__(self, path: str | os.PathLike[str], redact: str = "none") -> None:
        if redact not in REDACT_MODES:
            raise BadInputError(f"unknown audit redaction {redact!r}; use one of {', '.join(REDACT_MODES)}")
        self.path = Path(path)
        self.redact = redact
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._tail(fd)
        finally:
            os.close(fd)

    def append(self, record: AuditRecord) -> str:
        """Write ``record`` durably as the next line of the chain; return its hash.

        Raises ``StorageError`` when the disk is full or the file unwritable (nothing is left
        half-written), ``CorruptAuditLogError`` when the file's last line is damaged.
        """
        body = record_body(record, self.redact)
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev = self._tail(fd)
            rec = {**body, "v": FORMAT_VERSION, "seq": seq + 1, "time": _utc_now(), "prev": prev}
            rec["hash"] = record_hash(rec)
            size = os.fstat(fd).st_size
            self._write_durably(fd, canonical_json(rec) + b"\n", size)
            if size == 0:
                _fsync_dir(self.path.parent)  # a new file's name must survive a crash too
            return rec["hash"]
        finally:
            os.close(fd)  # also releases the lock

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open audit log {self.path}: {e.strerror or e}; "
                               "check the path and its permissions") from None

    def _tail(self, fd: int) -> tuple[int, str]:
        """(seq, hash) of the last record, or (0, GENESIS) for an empty file; reads only the tail."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS
        line = _last_line(fd, size)
        rec, problem = check_line(line)
        if rec is None:
            raise CorruptAuditLogError(
                f"audit log {self.path}: last line is damaged ({problem}); nothing was appended. "
                f"Run `edge-magistral audit verify {self.path}`, then move the file aside "
                "(keep it as evidence) so a new log starts; do not edit it by hand")
        return int(rec["seq"]), str(rec["hash"])

    def _write_durably(self, fd: int, data: bytes, size: int) -> None:
        """Write ``data`` at the end and fsync; on any failure truncate back to ``size`` and raise."""
        try:
            view = memoryview(data)
            while view:  # one write() in practice; a short write means the disk just filled up
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            _truncate_quietly(fd, size)
            raise StorageError(self._write_error(e)) from None

    def _write_error(self, e: OSError) -> str:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"audit log {self.path}: disk full, the record was not written (the log is "
                    "intact); free space or move the log, the request itself was not audited")
        return f"audit log {self.path}: write failed ({e.strerror or e}); the record was not written"


def _last_line(fd: int, size: int) -> bytes:
    """The file's last line (with its newline, if it has one), read backwards in chunks."""
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size  # skip the line's own newline
    start = end
    while start > 0:
        chunk_start = max(0, start - _TAIL_CHUNK)
        nl = os.pread(fd, start - chunk_start, chunk_start).rfind(b"\n")
        if nl >= 0:
            start = chunk_start + nl + 1
            break
        start = chunk_start
    return os.pread(fd, size - start, start)


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass  # nothing better to do; the next open sees a damaged tail and refuses to go on


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data itself is synced
    finally:
        os.close(dfd)
