"""Model admission with the real server: a model listed in a
manifest.json beside it is hashed before the first load (the time is in the STATUS line); a
mismatch stops the start with one line and a non-zero status, never READY=1; a worker restart
re-hashes only a file that changed, and a model replaced in place is caught there."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import serve_harness
from serve_harness import Listener, error_lines

from edge_magistral.build import manifest as mf

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny_sha256(tiny_gguf_f32: Path) -> str:
    return mf.sha256_file(tiny_gguf_f32)


def _listed(src: Path, directory: Path, sha256: str) -> Path:
    """The model (a hard link: no copy of its bytes) in its own directory, with a manifest."""
    directory.mkdir()
    model = directory / "tiny.gguf"
    try:
        os.link(src, model)
    except OSError:
        shutil.copyfile(src, model)
    mf.save(directory, mf.Manifest(files=[mf.FileEntry("tiny.gguf", "F32", model.stat().st_size, sha256,
                                                       mf.now_utc())]))
    return model


def _statuses(listener: Listener) -> list[str]:
    return [line for _, m in list(listener.messages) for line in m.splitlines() if line.startswith("STATUS=")]


def test_a_model_that_does_not_match_its_manifest_never_starts(tiny_gguf_f32, tmp_path):
    model = _listed(tiny_gguf_f32, tmp_path / "store", "0" * 64)
    listener = Listener(str(tmp_path / "notify"))
    try:
        server = serve_harness.start(model, tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify")}, wait=False)
        assert server.proc.wait(60) == 4, server.log_text()  # CorruptModelError's exit status
        log = server.log_text()
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "sha256" in errors[0] and "does not match manifest.json" in errors[0], log
        assert not error_lines(log), log  # that one line says it all: no ERROR log, no traceback
        assert not any("READY=1" in m for _, m in listener.messages)
        statuses = _statuses(listener)
        assert any(s.startswith("STATUS=verifying tiny.gguf: sha256 of 0.3 GB") for s in statuses), statuses
        assert statuses[-1].startswith("STATUS=failed: cannot load the model"), statuses
    finally:
        listener.close()


def test_a_model_replaced_in_place_is_caught_when_the_worker_restarts(tiny_gguf_f32, tiny_sha256, tmp_path):
    model = _listed(tiny_gguf_f32, tmp_path / "store", tiny_sha256)
    listener = Listener(str(tmp_path / "notify"))
    server = serve_harness.start(model, tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        listener.wait_for("READY=1", 10)
        ready = [s for s in _statuses(listener) if s.startswith("STATUS=ready:")]
        assert len(ready) == 1 and "sha256 verified in" in ready[0], ready  # the cost, said once

        # a worker restart with the file untouched: its identity matches, no second hash
        worker = server.worker_pid()
        os.kill(worker, signal.SIGKILL)
        serve_harness.until(lambda: sum(s.startswith("STATUS=ready:") for s in _statuses(listener)) == 2,
                            timeout=60, what="the restarted worker ready")
        assert "unchanged since its sha256 was verified" in _statuses(listener)[-1]

        # the same size, other bytes, renamed into place: the next restart hashes it and stops
        bad = model.with_name("tiny.gguf.partial")
        shutil.copyfile(model, bad)
        with bad.open("r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        os.replace(bad, model)  # the session's model (the other link) keeps its bytes
        os.kill(server.worker_pid(), signal.SIGKILL)
        assert server.proc.wait(60) == 4, server.log_text()
        errors = [line for line in server.log_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "does not match manifest.json" in errors[0], server.log_text()
        assert _statuses(listener)[-1].startswith("STATUS=failed: cannot load the model")
        assert sum("READY=1" in m.splitlines() for _, m in listener.messages) == 1
    finally:
        server.stop()
        listener.close()
