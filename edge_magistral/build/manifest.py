"""``manifest.json``: what a build produced (file, quant, size, sha256), from what source, with which
versions and when — written atomically, and re-checked by ``edge-magistral verify``.

The model store and air-gap bundles use the same format; their entries also name the hub
repository and the commit a file came from (empty for local builds)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_magistral.errors import CorruptModelError, ModelNotFoundError, StorageError
from edge_magistral.hashing import sha256_file
from edge_magistral.progress import Advance

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class FileEntry:
    file: str  # relative to the manifest's directory
    quant: str
    size: int
    sha256: str
    created: str
    repo: str = ""  # hub repository the file was pulled from
    revision: str = ""  # the commit hash it was pulled at


ENTRY_FIELDS = frozenset(FileEntry.__dataclass_fields__)


@dataclass
class Manifest:
    source: dict[str, Any] = field(default_factory=dict)  # path, kind, sha256
    versions: dict[str, str] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)
    format: int = FORMAT

    def entry(self, file: str) -> FileEntry | None:
        return next((e for e in self.files if e.file == file), None)

    def put(self, e: FileEntry) -> None:
        self.files = [x for x in self.files if x.file != e.file] + [e]


@dataclass
class Mismatch:
    file: str
    problem: str  # "missing" | "size" | "sha256" | "unlisted"
    detail: str = ""


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions() -> dict[str, str]:
    """Versions that determine the bytes of an output."""
    from importlib.metadata import PackageNotFoundError, version

    from edge_magistral import __version__

    out = {"edge_magistral": __version__}
    for pkg in ("llama-cpp-python", "gguf", "mistral-common"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    try:
        out["llama.cpp"] = _llama_build()
    except ImportError:
        out["llama.cpp"] = "absent"
    return out


def _llama_build() -> str:
    import llama_cpp

    return f"{llama_cpp.llama_version().decode()} (vendored by llama-cpp-python {llama_cpp.__version__})"


def load(directory: Path) -> Manifest:
    """Read ``directory/manifest.json``; an absent manifest is an empty one."""
    p = directory / MANIFEST
    if not p.exists():
        return Manifest()
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        # unknown keys are dropped: a newer edge-magistral's manifest still reads
        files = [FileEntry(**{k: v for k, v in e.items() if k in ENTRY_FIELDS}) for e in d.get("files", [])]
        return Manifest(source=d.get("source", {}), versions=d.get("versions", {}), files=files,
                        format=int(d.get("format", FORMAT)))
    except (ValueError, TypeError, AttributeError) as e:
        raise CorruptModelError(f"{p}: unreadable manifest ({e}); delete it and rebuild") from None


def save(directory: Path, m: Manifest) -> None:
    """Write the manifest atomically (temp file, fsync, rename)."""
    p = directory / MANIFEST
    tmp = p.with_name(p.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(m), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{p}: cannot write manifest ({e.strerror})") from None


def entry_for(directory: Path, file: str, quant: str, progress: Advance | None = None) -> FileEntry:
    path = directory / file
    return FileEntry(file=file, quant=quant, size=path.stat().st_size, sha256=sha256_file(path, progress),
                     created=now_utc())


def check_entry(directory: Path, e: FileEntry, progress: Advance | None = None) -> Mismatch | None:
    """Re-hash one listed file; None when it matches."""
    path = directory / e.file
    if not path.is_file():
        return Mismatch(e.file, "missing")
    size = path.stat().st_size
    if size != e.size:
        return Mismatch(e.file, "size", f"{size} bytes, manifest says {e.size}")
    digest = sha256_file(path, progress)
    if digest != e.sha256:
        return Mismatch(e.file, "sha256", f"{digest[:16]}…, manifest says {e.sha256[:16]}…")
    return None


def verify(directory: Path, progress: Advance | None = None) -> list[Mismatch]:
    """Re-hash every listed file, and flag GGUFs in the directory that the manifest does not list."""
    if not (directory / MANIFEST).is_file():
        raise ModelNotFoundError(f"{directory}: no {MANIFEST}; is this a build output directory?")
    m = load(directory)
    problems = [x for e in m.files if (x := check_entry(directory, e, progress))]
    listed = {e.file for e in m.files}
    problems += [Mismatch(p.name, "unlisted") for p in sorted(directory.glob("*.gguf")) if p.name not in listed]
    return problems
