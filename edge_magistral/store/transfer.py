"""Bringing planned files into the store: a resumable download (Range requests, hashed as the
bytes arrive) or a copy from the hub cache, each verified before it is committed."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edge_magistral.build import manifest as mf
from edge_magistral.errors import CorruptModelError, StorageError
from edge_magistral.hashing import Digest
from edge_magistral.progress import Advance, Progress, Silent
from edge_magistral.store.hub import (
    HEAD_TIMEOUT_S,
    DownloadError,
    PullItem,
    PullPlan,
    RemoteFile,
    partial_meta,
    resumable,
    transient_errors,
)
from edge_magistral.store.local import Staged, Store, copy_hashed, ensure_space
from edge_magistral.store.offline import hub_endpoint, hub_online
from edge_magistral.units import human_size

RETRIES = 5  # transient network errors in a row before a download gives up (its bytes are kept)
RETRY_WAIT_S = 1.0
READ_TIMEOUT_S = 60.0


def fetch(store: Store, plan: PullPlan, progress: Progress | None = None) -> list[mf.FileEntry]:
    """Bring every planned file into the store, each verified before it is listed."""
    progress = progress or Silent()
    need = plan.to_download + sum(i.remote.size for i in plan.items if i.action == "cache")
    ensure_space(store.staging(), need, "this pull")
    out = []
    for item in plan.items:
        present = store.manifest().entry(item.entry_file) if item.action == "present" else None
        if present is not None:
            out.append(present)
            continue
        tmp = store.stage_path(item.entry_file)
        if item.action == "cache":
            digest = _take_from_cache(item.remote, tmp, progress)
        else:
            with hub_online():
                digest = _download(item.remote, tmp, progress)
        out.append(_finish(store, item, plan.request.quant, tmp, digest))
    return out


def _take_from_cache(rf: RemoteFile, tmp: Path, progress: Progress) -> Digest:
    digest = Digest(rf.size, rf.etag)
    copy_hashed(Path(rf.cached), tmp, digest, progress.task(f"copying {Path(rf.filename).name}", rf.size))
    return digest


def _download(rf: RemoteFile, tmp: Path, progress: Progress) -> Digest:
    """Download to ``tmp``, resuming the bytes an earlier run left, hashing as they arrive."""
    have = resumable(tmp, rf)
    if not have:
        tmp.unlink(missing_ok=True)
    try:  # what the staged bytes are, so that only the same file resumes from them
        partial_meta(tmp).write_text(json.dumps({"repo": rf.repo, "file": rf.filename,
                                                  "revision": rf.revision, "etag": rf.etag, "size": rf.size}))
    except OSError as e:
        raise StorageError(f"{tmp.parent}: cannot write ({e.strerror}); free some space") from None
    advance = progress.task(f"downloading {Path(rf.filename).name}", rf.size)
    digest = Digest(rf.size, rf.etag)
    if have:
        with open(tmp, "rb") as f:
            digest.update_from(f, advance)
    t = _Transfer(rf, tmp, have, digest, advance)
    failures = 0
    while t.have < rf.size:
        before = t.have
        try:
            t.get()
        except CorruptModelError:
            _discard(tmp)
            raise
        except transient_errors() as e:
            failures = 0 if t.have > before else failures + 1
            if failures > RETRIES:
                raise DownloadError(f"{rf.filename}: download broke off at {human_size(t.have)} of "
                                    f"{human_size(rf.size)} ({type(e).__name__}); run the same command again to "
                                    "resume") from None
            time.sleep(RETRY_WAIT_S * min(2 ** (failures - 1), 8) if failures else 0)
    return t.digest


@dataclass
class _Transfer:
    """One download's state across retries: bytes written so far and their running hash."""

    rf: RemoteFile
    tmp: Path
    have: int
    digest: Digest
    advance: Advance

    def get(self) -> None:
        """One GET from ``have`` onwards (a Range request); appends to ``tmp`` as bytes arrive."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}  # byte ranges of the file itself
        if _host(self.rf.url) != _host(hub_endpoint()):
            headers.pop("authorization", None)  # a CDN gets no hub token
        if self.have:
            headers["Range"] = f"bytes={self.have}-"
        timeout = httpx2.Timeout(HEAD_TIMEOUT_S, read=READ_TIMEOUT_S)
        with get_session().stream("GET", self.rf.url, headers=headers, timeout=timeout,
                                  follow_redirects=True) as r:
            try:
                hf_raise_for_status(r)
            except HfHubHTTPError as e:
                raise DownloadError(f"{self.rf.url}: the hub answered {e.response.status_code} "
                                    "(run the same command again to resume)") from None
            if self.have and r.status_code != 206:  # the server ignored the Range: start over
                self.have, self.digest = 0, Digest(self.rf.size, self.rf.etag)
                self.tmp.write_bytes(b"")
            with open(self.tmp, "ab") as f:
                for chunk in r.iter_bytes():  # as they arrive: a broken-off read keeps what came
                    self._write(f, chunk)

    def _write(self, f, chunk: bytes) -> None:  # noqa: ANN001
        if self.have + len(chunk) > self.rf.size:
            raise CorruptModelError(f"{self.rf.filename}: the server sent more than the {self.rf.size} bytes "
                                    "the hub announced")
        try:
            f.write(chunk)
            f.flush()
        except OSError as e:
            raise StorageError(f"{self.tmp}: cannot write ({e.strerror}); free some space and run the same "
                               "command again to resume") from None
        self.digest.update(chunk)
        self.have += len(chunk)
        self.advance(len(chunk))


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc.lower()


def _finish(store: Store, item: PullItem, quant: str, tmp: Path, digest: Digest) -> mf.FileEntry:
    """Check the staged bytes against the hub's checksum and the GGUF pre-check, then commit."""
    rf = item.remote
    size = tmp.stat().st_size
    if size != rf.size or not digest.matches(rf.etag):
        _discard(tmp)
        kind = "sha256" if len(rf.etag) == 64 else "git blob id"
        said = "the hub's LFS metadata" if len(rf.etag) == 64 else "the hub"
        if rf.cached:
            said = f"its name in huggingface-hub's cache ({rf.cached})"
        got = f"{size} bytes" if size != rf.size else f"{kind} {digest.hexdigest()[:16]}…"
        raise CorruptModelError(f"{rf.filename}: got {got}, but {said} says {rf.size} bytes, {kind} "
                                f"{rf.etag[:16]}…; the bad copy was deleted, run the same command again")
    if tmp.name.endswith(".gguf.partial"):
        _check_gguf(tmp, rf.filename)
    _fsync(tmp)
    entry = mf.FileEntry(file=item.entry_file, quant=quant, size=size, sha256=digest.sha256_hex(),
                         created=mf.now_utc(), repo=rf.repo, revision=rf.revision)
    store.commit([Staged(tmp, entry)])
    partial_meta(tmp).unlink(missing_ok=True)
    return entry


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _discard(tmp: Path) -> None:
    tmp.unlink(missing_ok=True)
    partial_meta(tmp).unlink(missing_ok=True)


def _check_gguf(path: Path, name: str) -> None:
    from edge_magistral.gguf_info import check_gguf

    try:
        check_gguf(path)
    except CorruptModelError as e:
        _discard(path)
        raise CorruptModelError(f"{name}: not a valid GGUF ({str(e).split(': ', 1)[-1]})") from None
