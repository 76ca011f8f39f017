"""Model admission: the worker loads only the bytes that the model's manifest lists, so a file
changed or cut after it was built or pulled is never served.

A build or store ``manifest.json`` beside the model gives its size and sha256. The first worker
hashes the whole file before loading it (once: a 14 GB model takes seconds on NVMe, a minute on
slow storage, so the time is reported in the STATUS line; the read also warms the page cache
for the load). Each later worker compares the file's identity (device, inode, size, mtime,
ctime) with the one verified and hashes again only if it changed, so a model replaced in place
or by rename is caught before a restart loads it. A mismatch is a
:class:`~edge_magistral.errors.CorruptModelError`: the service stops and never reports ready on
those bytes. A model that no manifest lists is loaded unverified, and the STATUS line says so.

Runs in the worker process, which keeps beating while it hashes (so the front stays healthy).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edge_magistral.build import manifest as mf
from edge_magistral.errors import CorruptModelError
from edge_magistral.hashing import sha256_stream
from edge_magistral.progress import Progress, Silent

FileId = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
_SILENT = Silent()


def file_id(st: os.stat_result) -> FileId:
    """What changes when the file is rewritten or replaced (ctime even when mtime is forged)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Admitted:
    """The outcome of a check: the identity verified (None: no manifest lists the file), a note
    for the STATUS line, and the sha256 of the bytes verified (what the audit log records)."""

    file_id: FileId | None
    note: str
    hash_s: float = 0.0
    sha256: str | None = None


def admit(model_path: str, verified: FileId | None = None, progress: Progress = _SILENT) -> Admitted:
    """Check the model against its manifest; ``verified``: the identity an earlier check passed.
    ``progress`` hears a task (what is hashed, how big: the worker's STATUS line) before the hash,
    and its bytes as they are read; nothing when the file is unchanged or refused unread.

    Raises CorruptModelError if the file is not what the manifest lists (or the manifest is
    unreadable)."""
    path = Path(os.path.realpath(model_path))  # a symlink's manifest is the one beside its target
    entry = mf.load(path.parent).entry(path.name)
    if entry is None:
        return Admitted(None, f"sha256 not checked: no {mf.MANIFEST} beside the model lists it")
    with open(path, "rb") as f:
        fid = file_id(os.fstat(f.fileno()))  # the identity of the very bytes hashed below
        if fid == verified:
            return Admitted(fid, "unchanged since its sha256 was verified", sha256=entry.sha256)
        if fid[2] != entry.size:
            raise CorruptModelError(f"{path}: {fid[2]} bytes, but {mf.MANIFEST} lists {entry.size}: the file was "
                                    "changed or cut; restore it (pull or build again) or fix the manifest")
        advance = progress.task(_verifying(model_path, entry.size), entry.size)
        t0 = time.monotonic()
        digest = sha256_stream(f, advance)
        hash_s = time.monotonic() - t0
    if digest != entry.sha256:
        raise CorruptModelError(f"{path}: sha256 {digest[:16]}… does not match {mf.MANIFEST} "
                                f"({entry.sha256[:16]}…): these are not the bytes that were built or pulled; "
                                "restore the file (pull or build again) or fix the manifest")
    return Admitted(fid, f"sha256 verified in {hash_s:.1f} s", hash_s, digest)


def _verifying(model_path: str, size: int) -> str:
    """The hash's task description: what the worker's STATUS line says while it hashes."""
    return f"verifying {os.path.basename(model_path)}: sha256 of {size / 1e9:.1f} GB against {mf.MANIFEST}"


def still_same(model_path: str, verified: FileId | None) -> bool:
    """After the load: the file is still the one verified (it was not replaced meanwhile)."""
    if verified is None:
        return True
    try:
        return file_id(os.stat(os.path.realpath(model_path))) == verified
    except OSError:
        return False
