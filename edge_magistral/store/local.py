"""The store itself: one directory of model files and the ``manifest.json`` that lists them.

Files enter it in one way only: staged under ``.partial/`` (same filesystem), verified, renamed
into place, and only then listed in the manifest (:meth:`Store.commit`), one writer at a time."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_magistral.build import manifest as mf
from edge_magistral.errors import CorruptModelError, StorageError
from edge_magistral.hashing import Digest, chunks
from edge_magistral.paths import STORE_ENV, default_store_root
from edge_magistral.progress import Advance
from edge_magistral.units import human_size

PARTIAL = ".partial"
LOCK = ".lock"


def copy_hashed(src: Path, dst: Path, digest: Digest, advance: Advance) -> int:
    """Copy ``src`` to a new ``dst``, hashing what is read; fsync'd. Disk errors → StorageError."""
    n = 0
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            for chunk in chunks(fi, advance):
                fo.write(chunk)
                digest.update(chunk)
                n += len(chunk)
            fo.flush()
            os.fsync(fo.fileno())
    except OSError as e:
        dst.unlink(missing_ok=True)
        raise StorageError(f"{dst}: cannot write ({e.strerror or e}); nothing was added, free some space "
                           "or choose another --store") from None
    except BaseException:  # Ctrl-C: no half copy left behind
        dst.unlink(missing_ok=True)
        raise
    return n


def ensure_space(directory: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if need > free:
        raise StorageError(f"{directory}: {what} needs {human_size(need)} but only {human_size(free)} is free; "
                           "free some space or choose another --store")


@dataclass
class Staged:
    """A verified file in ``.partial/`` waiting to be renamed into the store as ``entry.file``."""

    tmp: Path
    entry: mf.FileEntry


@dataclass
class Store:
    root: Path

    @classmethod
    def default(cls, root: str | os.PathLike[str] | None = None) -> Store:
        return cls(Path(root).expanduser() if root else default_store_root())

    def manifest(self) -> mf.Manifest:
        return mf.load(self.root)

    def entries(self) -> list[mf.FileEntry]:
        return self.manifest().files if self.root.is_dir() else []

    def models(self) -> list[mf.FileEntry]:
        return [e for e in self.entries() if e.file.endswith(".gguf")]

    def path_of(self, quant: str) -> Path | None:
        """The newest GGUF of this quant in the store."""
        found = [e for e in self.models() if e.quant.upper() == quant.upper()]
        return self.root / max(found, key=lambda e: e.created).file if found else None

    def holds(self, e: mf.FileEntry) -> bool:
        """The store lists this exact file (name and sha256) and it has the listed size."""
        have = self.manifest().entry(e.file) if self.root.is_dir() else None
        p = self.root / e.file
        return have is not None and have.sha256 == e.sha256 and p.is_file() and p.stat().st_size == e.size

    def staging(self) -> Path:
        d = self.root / PARTIAL
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{self.root}: cannot create the model store ({e.strerror}); "
                               f"choose another with --store or ${STORE_ENV}") from None
        return d

    def stage_path(self, file: str) -> Path:
        return self.staging() / (file.replace("/", "__") + ".partial")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time (two pulls, or a pull and an import, into the same store)."""
        self.staging()
        with open(self.root / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def commit(self, staged: list[Staged]) -> None:
        """Rename verified files into place, then replace the manifest that lists them.

        The new manifest is written first into ``.partial/`` (a full disk fails there, before
        anything moved); renames within one filesystem need no space.
        """
        with self.locked():
            m = self.manifest()
            m.source = m.source or {"kind": "store"}
            for s in staged:
                m.put(s.entry)
            mf.save(self.staging(), m)
            try:
                for s in staged:
                    dest = self.root / s.entry.file
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(s.tmp, dest)
                os.replace(self.staging() / mf.MANIFEST, self.root / mf.MANIFEST)
            except OSError as e:
                (self.staging() / mf.MANIFEST).unlink(missing_ok=True)
                raise StorageError(f"{self.root}: cannot move files into the store ({e.strerror}); "
                                   "run `edge-magistral verify` to see its state") from None


def safe_relpath(name: str, where: str) -> str:
    """A manifest path that stays inside its directory and off the store's own files."""
    parts = name.split("/")
    bad = (not name or name.startswith("/") or "\\" in name or "\0" in name
           or any(p in ("", ".", "..") or p.startswith(".") for p in parts) or name == mf.MANIFEST)
    if bad:
        raise CorruptModelError(f"{where}: manifest path {name!r} points outside the bundle or at the "
                                "store's own files; refusing it (nothing was imported)")
    return name
