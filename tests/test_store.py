"""The model store: pull through huggingface-hub (its real cache resolution, and a loopback hub
for resume, checksum mismatch and interruption), first run, bundle → import, refusals that leave
the store untouched, a full disk, and the offline commands inside a network namespace."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from edge_magistral import store as st
from edge_magistral.build import manifest as mf
from edge_magistral.cli import build_cmds, cli, run_cmds, store_cmds  # noqa: F401  (register commands)
from edge_magistral.hardware import RecordedReader, detect
from edge_magistral.hashing import sha256_file
from edge_magistral.loader import resolve_model
from edge_magistral.store import transfer

REPO = st.DEFAULT_REPO
Q4 = "Magistral-Small-2507-Q4_K_M.gguf"
Q5 = "Magistral-Small-2507-Q5_K_M.gguf"
DATA = Path(__file__).parent / "data" / "hardware"
EXE = Path(sys.executable).parent / "edge-magistral"


# ----------------------------------------------------------------------------------- helpers


def fake_gguf(path: Path, n: int = 1000, size: int | None = None, seed: int = 0) -> Path:
    """A small valid GGUF (passes check_gguf); ``size`` pads it to an exact byte count."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"fake-{seed}")
    w.add_tensor("blk.0.attn_norm.weight", np.random.default_rng(seed).random(n, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if size is not None:
        assert path.stat().st_size <= size
        with open(path, "ab") as f:
            f.write(b"\0" * (size - path.stat().st_size))
    return path


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def git_sha1(b: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with its sha256: 'store unchanged' means equal."""
    if not root.exists():
        return {}
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {p.relative_to(root).as_posix(): sha256(p.read_bytes()) for p in files}


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, code: int, *needles: str) -> str:
    assert r.exit_code == code, (r.exit_code, r.output)
    err = [x for x in r.output.splitlines() if x.startswith("error: ")]
    assert len(err) == 1, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def seed_store(root: Path, files: dict[str, Path], repo: str = REPO, revision: str = "c" * 40) -> st.Store:
    """Put files into a store the way pull/import do (staged, then committed)."""
    s = st.Store(root)
    staged = []
    for quant, src in files.items():
        name = st.DEFAULT_PATTERN.format(quant=quant)
        tmp = s.stage_path(name)
        shutil.copyfile(src, tmp)
        staged.append(st.Staged(tmp, mf.FileEntry(name, quant, tmp.stat().st_size, sha256_file(tmp),
                                                  mf.now_utc(), repo, revision)))
    s.commit(staged)
    return s


def hardware_file(tmp_path: Path, box: str) -> Path:
    p = tmp_path / f"{box}.json"
    p.write_text(detect(RecordedReader(DATA / box)).to_json())
    return p


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess (which inherits this process's HF_HUB_OFFLINE=1, set by
    edge-magistral itself, not by a user: pull still goes online there)."""
    return {**os.environ, **extra}


# ------------------------------------------------------------------------------ a loopback hub


@dataclass
class Hub:
    """Serves the routes huggingface-hub downloads through: HEAD/GET /{repo}/resolve/{rev}/{file}
    with X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size for LFS files, and Range requests."""

    url: str = ""
    repos: dict[str, tuple[str, dict[str, bytes]]] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    corrupt: set[str] = field(default_factory=set)  # served with one byte flipped
    cut_after: int | None = None  # close the connection after this many body bytes …
    cuts: int = 0  # … this many times
    dead_after_cut: bool = False  # then drop every later connection unanswered
    hold_at: int | None = None  # stop sending at this body offset until `release` is set
    holding: threading.Event = field(default_factory=threading.Event)  # set once the hold began
    release: threading.Event = field(default_factory=threading.Event)

    def add(self, repo: str, files: dict[str, bytes]) -> str:
        content = repr((repo, sorted((n, sha256(d)) for n, d in files.items())))
        commit = hashlib.sha1(content.encode()).hexdigest()
        self.repos[repo] = (commit, files)
        return commit

    def gets(self) -> list[tuple[str, str | None]]:
        return [(p, r) for m, p, r in self.log if m == "GET"]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def _error(self, code: str, commit: str | None = None) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            hub.log.append((self.command, self.path, self.headers.get("Range")))
            if hub.dead_after_cut and hub.cut_after is not None and hub.cuts <= 0:
                self.close_connection = True
                return
            parts = unquote(self.path).lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error("RepoNotFound")
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if repo not in hub.repos:
                return self._error("RepoNotFound")
            commit, files = hub.repos[repo]
            if rev not in ("main", commit):
                return self._error("RevisionNotFound")
            if name not in files:
                return self._error("EntryNotFound", commit)
            data = files[name]
            start = 0
            rng = self.headers.get("Range")
            if body and rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            if name.endswith((".gguf", ".safetensors")):
                self.send_header("ETag", f'"{sha256(data)}"')
                self.send_header("X-Linked-Etag", f'"{sha256(data)}"')
                self.send_header("X-Linked-Size", str(len(data)))
            else:
                self.send_header("ETag", f'"{git_sha1(data)}"')
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if body:
                self._body(name, data, start)

        def _body(self, name: str, data: bytes, start: int) -> None:
            if name in hub.corrupt:
                i = len(data) // 2
                data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
            limit = len(data)
            if hub.cut_after is not None and hub.cuts > 0:
                hub.cuts -= 1
                limit = min(limit, start + hub.cut_after)
            try:
                if hub.hold_at is not None and start < hub.hold_at < limit:
                    self.wfile.write(data[start:hub.hold_at])
                    self.wfile.flush()
                    hub.holding.set()
                    hub.release.wait()
                    start = hub.hold_at
                for i in range(start, limit, 65536):
                    self.wfile.write(data[i:min(i + 65536, limit)])
                self.wfile.flush()
            except OSError:
                pass
            if limit < len(data):
                self.close_connection = True

    return H


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    h = Hub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(h))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    h.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own store, hub cache and profile directory; retries do not wait."""
    monkeypatch.setenv(st.STORE_ENV, str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("EDGE_MAGISTRAL_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setattr(transfer, "RETRY_WAIT_S", 0.01)
    return tmp_path / "store"


def seed_hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = "d" * 40,
                   blob_bytes: dict[str, bytes] | None = None) -> str:
    """huggingface-hub's cache layout: models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = base / "blobs" / sha256(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes((blob_bytes or {}).get(name, data))
        link = base / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


# ---------------------------------------------------------------------------------------- pull


def test_pull_pins_the_commit_verifies_and_says_the_size_first(hub: Hub, tmp_path: Path,
                                                               isolated: Path) -> None:
    data = fake_gguf(tmp_path / "q4.gguf", 300_000).read_bytes()
    commit = hub.add(REPO, {Q4: data})
    r = invoke("pull", "--quant", "q4_k_m")
    assert r.exit_code == 0, r.output
    announce, ok = r.output.index("to download: 1.2 MB"), r.output.index(f"ok  {Q4}")
    assert announce < ok and f"at commit {commit[:12]} (main)" in r.output
    e = mf.load(isolated).entry(Q4)
    assert (e.quant, e.size, e.sha256) == ("Q4_K_M", len(data), sha256(data))
    assert (e.repo, e.revision) == (REPO, commit)
    assert (isolated / Q4).read_bytes() == data
    assert not list((isolated / st.PARTIAL).iterdir())  # nothing left staged
    # pinned: the download asked for the commit, not "main"; a second pull downloads nothing
    assert [p for p, _ in hub.gets()] == [f"/{REPO}/resolve/{commit}/{Q4}"]
    n_gets = len(hub.gets())
    r = invoke("pull", "--quant", "Q4_K_M")
    assert r.exit_code == 0 and "already in the store" in r.output and len(hub.gets()) == n_gets
    assert invoke("verify").exit_code == 0


def test_pull_resumes_within_a_run_when_the_connection_drops(hub: Hub, tmp_path: Path,
                                                             isolated: Path) -> None:
    data = fake_gguf(tmp_path / "q4.gguf", 1_000_000).read_bytes()
    hub.add(REPO, {Q4: data})
    hub.cut_after, hub.cuts = 1_500_000, 2
    r = invoke("pull", "--quant", "Q4_K_M")
    assert r.exit_code == 0, r.output
    assert [rng for _, rng in hub.gets()] == [None, "bytes=1500000-", "bytes=3000000-"]  # no byte twice
    assert mf.load(isolated).entry(Q4).sha256 == sha256(data)


def test_interrupted_pull_keeps_its_bytes_and_the_next_run_resumes(hub: Hub, tmp_path: Path,
                                                                  isolated: Path) -> None:
    data = fake_gguf(tmp_path / "q4.gguf", 1_000_000).read_bytes()
    hub.add(REPO, {Q4: data})
    hub.cut_after, hub.cuts, hub.dead_after_cut = 1_000_000, 1, True  # the hub goes away mid-file
    r = invoke("pull", "--quant", "Q4_K_M")
    one_line_error(r, 3, "broke off at 1.0 MB of 4.0 MB", "run the same command again to resume")
    assert not (isolated / mf.MANIFEST).exists() and not (isolated / Q4).exists()
    assert (isolated / st.PARTIAL / f"{Q4}.partial").stat().st_size == 1_000_000
    hub.cut_after, hub.log = None, []
    r = invoke("pull", "--quant", "Q4_K_M")
    assert r.exit_code == 0, r.output
    assert "resuming: 1.0 MB already here" in r.output and hub.gets()[0][1] == "bytes=1000000-"
    assert (isolated / Q4).read_bytes() == data


def test_pull_killed_with_ctrl_c_resumes_in_the_next_process(hub: Hub, tmp_path: Path,
                                                             isolated: Path) -> None:
    """The hub holds the transfer mid-file until the test has seen the partial bytes on disk and
    sent SIGINT: the interrupt always lands mid-download, however loaded the machine is."""
    data = fake_gguf(tmp_path / "q4.gguf", 2_000_000).read_bytes()
    hub.add(REPO, {Q4: data})
    hub.hold_at = 1_000_000
    proc = subprocess.Popen([str(EXE), "pull", "--quant", "Q4_K_M"], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    staged = isolated / st.PARTIAL / f"{Q4}.partial"
    try:
        assert hub.holding.wait(120), "the pull never reached the hub"
        while not (staged.is_file() and staged.stat().st_size == hub.hold_at):  # held: it cannot pass
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        hub.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert not (isolated / mf.MANIFEST).exists()
    have = staged.stat().st_size
    assert 0 < have < len(data)
    hub.hold_at, hub.log = None, []
    r = invoke("pull", "--quant", "Q4_K_M")
    assert r.exit_code == 0, r.output
    assert hub.gets()[0][1] == f"bytes={have}-"  # every byte on disk was reused
    assert mf.load(isolated).entry(Q4).sha256 == sha256(data)


def test_checksum_mismatch_is_refused_and_the_bad_bytes_dropped(hub: Hub, tmp_path: Path,
                                                                isolated: Path) -> None:
    data = fake_gguf(tmp_path / "q4.gguf", 100_000).read_bytes()
    hub.add(REPO, {Q4: data})
    hub.corrupt = {Q4}
    r = invoke("pull", "--quant", "Q4_K_M")
    one_line_error(r, 4, Q4, "LFS metadata", sha256(data)[:16])
    assert not (isolated / mf.MANIFEST).exists() and not (isolated / Q4).exists()
    assert not list((isolated / st.PARTIAL).glob("*.partial"))  # the next pull starts from zero
    hub.corrupt, hub.log = set(), []
    assert invoke("pull", "--quant", "Q4_K_M").exit_code == 0
    assert hub.gets()[0][1] is None


def test_a_partial_from_another_file_is_not_resumed(hub: Hub, tmp_path: Path, isolated: Path) -> None:
    old = fake_gguf(tmp_path / "old.gguf", 100_000, seed=1).read_bytes()
    new = fake_gguf(tmp_path / "new.gguf", 100_000, seed=2).read_bytes()
    hub.add(REPO, {Q4: old})
    hub.cut_after, hub.cuts, hub.dead_after_cut = 200_000, 1, True
    assert invoke("pull", "--quant", "Q4_K_M").exit_code == 3
    hub.add(REPO, {Q4: new})  # the repo moved on: the staged bytes belong to another file
    hub.cut_after, hub.log = None, []
    assert invoke("pull", "--quant", "Q4_K_M").exit_code == 0
    assert hub.gets()[0][1] is None and (isolated / Q4).read_bytes() == new


def test_pull_from_the_hub_cache_with_its_own_offline_resolution(tmp_path: Path, isolated: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    data = fake_gguf(tmp_path / "q4.gguf", 10_000).read_bytes()
    commit = seed_hub_cache(tmp_path / "hf-cache", REPO, {Q4: data})
    r = invoke("pull", "--quant", "Q4_K_M", "--offline")
    assert r.exit_code == 0, r.output
    assert "huggingface-hub's cache" in r.output
    e = mf.load(isolated).entry(Q4)
    assert (e.revision, e.sha256, e.repo) == (commit, sha256(data), REPO)
    # without --offline, an unreachable hub falls back to the same cache and says so
    shutil.rmtree(isolated)
    r = invoke("pull", "--quant", "Q4_K_M")
    assert r.exit_code == 0 and "not reachable" in r.output
    # a file the cache lacks: a clear error, nothing stored
    r = invoke("pull", "--quant", "Q8_0", "--offline")
    one_line_error(r, 3, "does not hold", "Magistral-Small-2507-Q8_0.gguf")


def test_a_corrupt_blob_in_the_hub_cache_is_refused(tmp_path: Path, isolated: Path) -> None:
    data = fake_gguf(tmp_path / "q4.gguf", 10_000).read_bytes()
    seed_hub_cache(tmp_path / "hf-cache", REPO, {Q4: data}, blob_bytes={Q4: data[:-1] + b"\1"})
    r = invoke("pull", "--quant", "Q4_K_M", "--offline")
    one_line_error(r, 4, Q4)
    assert snapshot(isolated).keys() <= {".lock"}


def test_online_pull_takes_bytes_the_hub_cache_already_has(hub: Hub, tmp_path: Path, isolated: Path) -> None:
    data = fake_gguf(tmp_path / "q4.gguf", 10_000).read_bytes()
    commit = hub.add(REPO, {Q4: data})
    seed_hub_cache(tmp_path / "hf-cache", REPO, {Q4: data}, commit=commit)
    r = invoke("pull", "--quant", "Q4_K_M")
    assert r.exit_code == 0 and "copy from the hub cache" in r.output
    assert hub.gets() == [] and [m for m, _, _ in hub.log] == ["HEAD"]
    assert mf.load(isolated).entry(Q4).revision == commit


def test_quant_auto_is_what_the_planner_picks_for_the_box(hub: Hub, tmp_path: Path, isolated: Path) -> None:
    q4 = fake_gguf(tmp_path / "q4.gguf", 1000, seed=4).read_bytes()
    q5 = fake_gguf(tmp_path / "q5.gguf", 1000, seed=5).read_bytes()
    hub.add(REPO, {Q4: q4, Q5: q5})
    r = invoke("pull", "--quant", "auto", "--hardware", hardware_file(tmp_path, "rtx4090-desktop"))
    assert r.exit_code == 0 and "--quant auto: Q5_K_M" in r.output, r.output
    r = invoke("pull", "--hardware", hardware_file(tmp_path, "cpu-only-32gb"))
    assert r.exit_code == 0 and "--quant auto: Q4_K_M" in r.output, r.output
    assert {e.quant for e in mf.load(isolated).files} == {"Q4_K_M", "Q5_K_M"}
    # a repository without the planned quant: plan again without it
    hub.add("someone/magistral-gguf", {"m-Q4_K_M.gguf": q4})
    shutil.rmtree(isolated)
    r = invoke("pull", "--repo", "someone/magistral-gguf", "--pattern", "m-{quant}.gguf",
               "--hardware", hardware_file(tmp_path, "rtx4090-desktop"))
    assert r.exit_code == 0, r.output
    assert "has no Q5_K_M" in r.output
    assert mf.load(isolated).entry("m-Q4_K_M.gguf").repo == "someone/magistral-gguf"


def test_checkpoint_pull_verifies_lfs_and_plain_git_files(hub: Hub, isolated: Path) -> None:
    files = {"params.json": b'{"dim": 5120}', "consolidated.safetensors": b"\0" * 5000,
             "tekken.json": b"{}", "SYSTEM_PROMPT.txt": b"You are Magistral."}
    commit = hub.add(st.CHECKPOINT_REPO, files)
    r = invoke("pull", "--checkpoint")
    assert r.exit_code == 0, r.output
    m = mf.load(isolated)
    for name, data in files.items():
        e = m.entry(f"Magistral-Small-2507/{name}")
        assert (e.quant, e.sha256, e.revision) == ("checkpoint", sha256(data), commit)
    assert "edge-magistral build" in r.output
    # a plain (non-LFS) file is checked against git's blob sha1 the hub serves as its ETag
    shutil.rmtree(isolated)
    hub.corrupt = {"SYSTEM_PROMPT.txt"}
    one_line_error(invoke("pull", "--checkpoint"), 4, "SYSTEM_PROMPT.txt")


def test_hub_errors_are_one_clear_line(hub: Hub, isolated: Path) -> None:
    hub.add(REPO, {})
    one_line_error(invoke("pull", "--quant", "Q4_K_M", "--repo", "nobody/nothing"), 3, "no such repository")
    one_line_error(invoke("pull", "--quant", "Q4_K_M", "--revision", "v9"), 3, "no revision 'v9'")
    one_line_error(invoke("pull", "--quant", "Q4_K_M"), 3, f"no file {Q4}")
    one_line_error(invoke("pull", "--quant", "Q4_K_M", "--pattern", "x.gguf"), 2, "{quant}")
    assert not (isolated / mf.MANIFEST).exists()


def test_a_downloaded_file_that_is_not_a_gguf_is_refused(hub: Hub, isolated: Path) -> None:
    hub.add(REPO, {Q4: b"not a gguf at all" * 100})
    one_line_error(invoke("pull", "--quant", "Q4_K_M"), 4, Q4, "not a valid GGUF")
    assert not (isolated / Q4).exists() and not (isolated / mf.MANIFEST).exists()


# ----------------------------------------------------------------------------------- first run


def test_first_run_without_a_tty_or_yes_refuses_and_fetches_nothing(hub: Hub) -> None:
    r = invoke("run", "hello")
    err = one_line_error(r, 3, "--yes", "edge-magistral pull --quant", "edge-magistral import DIR")
    assert "No model in" in r.output and " GB." in r.output  # which quant, and how big, was said
    assert hub.log == [] and err


def test_first_run_with_no_hub_says_how_to_import_a_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    r = invoke("run", "--yes", "hello")
    one_line_error(r, 3, "not reachable", "edge-magistral bundle", "edge-magistral import DIR")


def test_first_run_plans_pulls_and_answers(hub: Hub, tiny_gguf_f16: Path, isolated: Path) -> None:
    """No model anywhere: `run --yes` plans for this box, pulls that quant, loads it and answers
    (the loopback hub serves the tiny Magistral under every official name)."""
    data = tiny_gguf_f16.read_bytes()
    hub.add(REPO, {st.DEFAULT_PATTERN.format(quant=q): data for q in st.OFFICIAL_QUANTS})
    r = invoke("run", "--yes", "--json", "--think-budget", "0", "--max-tokens", "3", "hello")
    assert r.exit_code in (0, 6), r.output  # 6: the random-weight model was cut at --max-tokens
    out = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])
    e = st.Store(isolated).models()[0]
    assert out["usage"]["completion_tokens"] >= 1 and out["model"]["sha256"] == e.sha256 == sha256(data)
    assert "the planner picks" in r.output
    # the store now answers `run` with no model named, and `--model QUANT` finds it
    assert resolve_model(None) == resolve_model(e.quant) == str(isolated / e.file)


# ------------------------------------------------------------------------------- bundle/import


@pytest.fixture
def two_quants(tmp_path: Path) -> dict[str, Path]:
    return {"Q4_K_M": fake_gguf(tmp_path / "a.gguf", 50_000, seed=1),
            "Q8_0": fake_gguf(tmp_path / "b.gguf", 80_000, seed=2)}


@pytest.fixture
def bundle_dir(tmp_path: Path, two_quants: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bundle of two quants and a custom profile, made from a connected side's store."""
    src = tmp_path / "connected"
    seed_store(src / "store", two_quants)
    prof = src / "profiles"
    prof.mkdir(parents=True)
    (prof / "my-box.yaml").write_text("name: my-box\ndescription: a site profile\nmatch: {gpu: none}\n"
                                      "quants: [Q8_0]\n")
    monkeypatch.setenv("EDGE_MAGISTRAL_PROFILES", str(prof))
    out = tmp_path / "bundle"
    r = invoke("bundle", "--quant", "Q4_K_M,Q8_0", "--out", out, "--store", src / "store")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("EDGE_MAGISTRAL_PROFILES", str(tmp_path / "profiles"))
    return out


def test_bundle_then_import_round_trip(bundle_dir: Path, two_quants: dict[str, Path], isolated: Path,
                                       tmp_path: Path) -> None:
    listed = {e.file for e in mf.load(bundle_dir).files}
    assert {Q4, "Magistral-Small-2507-Q8_0.gguf", "INSTALL.txt", "SHA256SUMS",
            "profiles/my-box.yaml", "profiles/cpu-only.yaml"} <= listed
    assert "edge-magistral import ." in (bundle_dir / "INSTALL.txt").read_text()
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bundle_dir).returncode == 0
    r = invoke("import", bundle_dir)
    assert r.exit_code == 0, r.output
    assert "profiles added: my-box" in r.output and (tmp_path / "profiles" / "my-box.yaml").is_file()
    m = mf.load(isolated)
    for q, p in two_quants.items():
        e = next(e for e in m.files if e.quant == q)
        assert (isolated / e.file).read_bytes() == p.read_bytes()
        assert (e.repo, e.revision) == (REPO, "c" * 40)
    assert invoke("verify").exit_code == 0
    before = snapshot(isolated)
    r = invoke("import", bundle_dir)
    assert r.exit_code == 0 and r.output.count("(already in the store)") == 2 and snapshot(isolated) == before


def test_import_keeps_a_same_named_profile_that_differs(bundle_dir: Path, tmp_path: Path) -> None:
    mine = tmp_path / "profiles" / "my-box.yaml"
    mine.parent.mkdir()
    mine.write_text("name: my-box\ndescription: mine\nmatch: {gpu: none}\nquants: [Q4_K_M]\n")
    r = invoke("import", bundle_dir)
    assert r.exit_code == 0 and "profiles kept (yours differ from the bundle's): my-box" in r.output
    assert "quants: [Q4_K_M]" in mine.read_text()


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _outside(bundle: Path) -> None:
    """The manifest names a file outside the bundle (which exists and matches its hash)."""
    evil = bundle.parent / "evil.gguf"
    shutil.copyfile(bundle / Q4, evil)
    d = json.loads((bundle / mf.MANIFEST).read_text())
    d["files"][0]["file"] = "../evil.gguf"
    d["files"][0].update(size=evil.stat().st_size, sha256=sha256(evil.read_bytes()), quant="Q4_K_M")
    (bundle / mf.MANIFEST).write_text(json.dumps(d))


@pytest.mark.parametrize(("damage", "code", "needle"), [
    (lambda b: _flip(b / Q4), 4, f"{Q4}: checksum mismatch"),
    (lambda b: _truncate(b / Q4), 4, f"{Q4}: truncated"),
    (lambda b: (b / mf.MANIFEST).unlink(), 3, "no manifest.json"),
    (_outside, 4, "'../evil.gguf' points outside the bundle"),
    (lambda b: (b / "notes.gguf").write_bytes(b"x"), 4, "notes.gguf: not in the bundle's manifest"),
    (lambda b: (b / Q4).unlink(), 4, f"{Q4}: missing"),
    (lambda b: (b / "profiles" / "extra").symlink_to("/etc/passwd"), 4, "extra: a symlink"),
], ids=["flipped-byte", "truncated", "no-manifest", "outside-path", "extra-file", "missing-file", "symlink"])
def test_a_damaged_bundle_is_refused_and_the_store_unchanged(bundle_dir: Path, tmp_path: Path, isolated: Path,
                                                             damage, code: int, needle: str) -> None:
    seed_store(isolated, {"Q6_K": fake_gguf(tmp_path / "q6.gguf", 1000, seed=6)})
    before = snapshot(isolated)
    damage(bundle_dir)
    one_line_error(invoke("import", bundle_dir), code, needle, "nothing was imported" if code == 4 else "")
    assert snapshot(isolated) == before


def test_a_manifest_cannot_write_over_the_stores_own_files(bundle_dir: Path, isolated: Path) -> None:
    d = json.loads((bundle_dir / mf.MANIFEST).read_text())
    d["files"][0]["file"] = ".partial/x.gguf"
    (bundle_dir / mf.MANIFEST).write_text(json.dumps(d))
    one_line_error(invoke("import", bundle_dir), 4, "'.partial/x.gguf'")
    assert snapshot(isolated) == {}


def test_bundle_refusals(tmp_path: Path, two_quants: dict[str, Path], isolated: Path) -> None:
    seed_store(isolated, two_quants)
    one_line_error(invoke("bundle", "--quant", "Q5_K_M", "--out", tmp_path / "b"), 3, "pull --quant Q5_K_M")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    one_line_error(invoke("bundle", "--quant", "Q4_K_M", "--out", tmp_path / "full"), 2,
                   "not an empty directory")
    one_line_error(invoke("bundle", "--out", tmp_path / "b"), 2, "nothing to bundle")
    _flip(isolated / Q4)  # the store rotted: bundling catches it rather than carrying it across
    one_line_error(invoke("bundle", "--quant", "Q4_K_M", "--out", tmp_path / "b"), 4, "edge-magistral verify")
    assert not (tmp_path / "b").exists()
    r = invoke("verify")
    assert r.exit_code == 4 and "sha256" in r.output


def test_bundle_auto_plans_for_the_target_box(tmp_path: Path, two_quants: dict[str, Path],
                                              isolated: Path) -> None:
    seed_store(isolated, two_quants)
    r = invoke("bundle", "--quant", "auto", "--hardware", hardware_file(tmp_path, "cpu-only-32gb"),
               "--out", tmp_path / "b")
    assert r.exit_code == 0 and "--quant auto: Q4_K_M" in r.output, r.output
    assert [e.quant for e in mf.load(tmp_path / "b").files if e.quant] == ["Q4_K_M"]


def test_wheelhouse_commands_target_the_other_platform(tmp_path: Path) -> None:
    spec = st.WheelSpec(("manylinux2014_aarch64",), "3.10", ("--index-url=http://mirror/simple",))
    reqs = ["numpy>=1.26", "llama-cpp-python==0.3.36", "click>=8.1"]
    steps, prebuilt, from_source = st.pip_commands(spec, tmp_path, reqs, Path("/src/edge-magistral"))
    deps = steps[1]
    assert {"--platform=manylinux2014_aarch64", "--python-version=3.10", "--only-binary=:all:",
            "--index-url=http://mirror/simple"} <= set(deps)
    assert "numpy>=1.26" in deps and not any(a.startswith("llama-cpp-python") for a in deps)
    assert "llama-cpp-python==0.3.36" in prebuilt and "--platform=manylinux2014_aarch64" in prebuilt
    assert "--no-binary=:all:" in from_source[0]
    assert not any(a.startswith("--platform") for a in from_source[0])  # an sdist fits any platform
    assert "cmake>=3.21" in from_source[1] and "--platform=manylinux2014_aarch64" in from_source[1]
    assert steps[0][3:5] == ["wheel", "--no-deps"] and steps[0][-1] == "/src/edge-magistral"


def test_bundle_with_wheels_fails_cleanly_without_an_index(tmp_path: Path, two_quants: dict[str, Path],
                                                           isolated: Path) -> None:
    seed_store(isolated, two_quants)
    (tmp_path / "empty-index").mkdir()
    r = invoke("bundle", "--quant", "Q4_K_M", "--out", tmp_path / "b", "--with-wheels",
               "--platform", "manylinux2014_aarch64", "--python-version", "3.10",
               "--pip-arg=--no-index", f"--pip-arg=--find-links={tmp_path / 'empty-index'}")
    one_line_error(r, 1, "pip ", "failed", "no bundle was left")  # pip wheel (the project) or pip download
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _resize(mnt: Path, free: int) -> None:
    """Remount so exactly ``free`` bytes (whole pages) are left."""
    used = shutil.disk_usage(mnt).used
    subprocess.run(["mount", "-o", f"remount,size={used + free}", str(mnt)], check=True)
    assert shutil.disk_usage(mnt).free == free


def test_a_full_disk_during_import_is_a_clear_error_store_unchanged(tmp_path: Path, small_fs: Path) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    store = small_fs / "store"
    seed_store(store, {"Q6_K": fake_gguf(tmp_path / "q6.gguf", 1000, seed=6)})
    (store / st.PARTIAL).mkdir(exist_ok=True)
    before = snapshot(store)
    # two files of 64 pages + 100 bytes: the byte count fits what is free, their pages do not
    files = {q: fake_gguf(tmp_path / f"{q}.gguf", 1000, size=64 * page + 100, seed=i)
             for i, q in enumerate(("Q4_K_M", "Q8_0"))}
    src = tmp_path / "src"
    seed_store(src, files)
    r = invoke("bundle", "--quant", "Q4_K_M,Q8_0", "--out", tmp_path / "bundle", "--store", src)
    assert r.exit_code == 0, r.output
    _resize(small_fs, 129 * page)  # ≥ the 2·(64 pages + 100 B) asked for, < the 130 pages used
    one_line_error(invoke("import", tmp_path / "bundle", "--store", store), 7, "No space left on device")
    assert snapshot(store) == before
    _resize(small_fs, 100 * page)  # now too small even by the byte count: refused before copying
    one_line_error(invoke("import", tmp_path / "bundle", "--store", store), 7, "this import needs 524.5 kB")
    assert snapshot(store) == before


def test_pull_refuses_a_disk_too_small_before_downloading(hub: Hub, tmp_path: Path, small_fs: Path) -> None:
    hub.add(REPO, {Q4: fake_gguf(tmp_path / "q4.gguf", 2_000_000).read_bytes()})
    r = invoke("pull", "--quant", "Q4_K_M", "--store", small_fs / "store")
    one_line_error(r, 7, "this pull needs 8.0 MB")
    assert hub.gets() == []


# ----------------------------------------------------------------------------- offline, for real


def test_commands_other_than_pull_have_the_hub_offline(hub: Hub) -> None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import OfflineModeIsEnabled

    hub.add(REPO, {Q4: b"x"})
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(OfflineModeIsEnabled):
        get_hf_file_metadata(hf_hub_url(REPO, Q4, endpoint=hub.url))
    assert hub.log == []


def _netns_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="unshare -n needs root and user namespaces")
def test_offline_commands_work_in_a_network_namespace_with_no_interfaces(
        tmp_path: Path, tiny_gguf_f16: Path, bundle_dir: Path) -> None:
    store = tmp_path / "air-gapped-store"
    env = child_env(EDGE_MAGISTRAL_STORE=str(store), HF_HUB_CACHE=str(tmp_path / "hf-cache"),
                    EDGE_MAGISTRAL_PROFILES=str(tmp_path / "profiles"))
    env.pop("HF_ENDPOINT", None)

    def netns(*args: object, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["unshare", "-n", str(EXE), *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=120)
        assert (r.returncode == 0) == ok, (args, r.returncode, r.stdout, r.stderr)
        return r

    # no interface at all in there, loopback included
    probe = subprocess.run(["unshare", "-n", sys.executable, "-c",
                            "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"],
                           capture_output=True)
    assert probe.returncode != 0
    netns("import", bundle_dir)
    netns("verify")
    assert "Q8_0" in netns("store").stdout
    netns("bundle", "--quant", "Q8_0", "--out", tmp_path / "again")
    netns("plan", "--hardware", hardware_file(tmp_path, "cpu-only-32gb"))
    # pull: the hub is out of reach, its cache is not
    seed_hub_cache(tmp_path / "hf-cache", REPO, {Q5: fake_gguf(tmp_path / "q5.gguf", 1000).read_bytes()})
    assert "not reachable" in netns("pull", "--quant", "Q5_K_M").stderr
    # and a real model answers from the store
    shutil.rmtree(store)
    seed_store(store, {"F16": tiny_gguf_f16})
    r = subprocess.run(["unshare", "-n", str(EXE), "run", "--json", "--think-budget", "0", "--max-tokens",
                        "3", "hello"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 6), r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] >= 1
    # with no model and no hub, a first run says how to import a bundle
    shutil.rmtree(store)
    r = subprocess.run(["unshare", "-n", str(EXE), "run", "--yes", "hello"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3 and "edge-magistral import DIR" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------- the store


def test_store_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(st.STORE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert st.default_store_root() == tmp_path / "xdg" / "edge-magistral" / "models"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edge-magistral:/var/lib/other")  # systemd service
    assert st.default_store_root() == st.SYSTEM_STORE
    monkeypatch.setenv(st.STORE_ENV, str(tmp_path / "mine"))
    assert st.default_store_root() == tmp_path / "mine"


def test_manifest_entries_keep_their_source_and_newer_fields_are_tolerated(tmp_path: Path) -> None:
    m = mf.Manifest(files=[mf.FileEntry("a.gguf", "Q4_K_M", 1, "0" * 64, "t", "org/repo", "f" * 40)])
    mf.save(tmp_path, m)
    d = json.loads((tmp_path / mf.MANIFEST).read_text())
    d["files"][0]["from_the_future"] = 1
    (tmp_path / mf.MANIFEST).write_text(json.dumps(d))
    assert mf.load(tmp_path) == m


def test_store_and_verify_on_an_empty_store(isolated: Path) -> None:
    one_line_error(invoke("verify"), 3, "holds no models yet")
    r = invoke("store", "--json")
    assert r.exit_code == 0 and json.loads(r.output) == {"root": str(isolated), "files": []}

