"""The build: source (checkpoint or BF16/F16 GGUF) → base GGUF → quantizations, with a manifest.

Safe and resumable: every check that can fail cheaply (quant names, output directory, source
files, disk space) runs before any long work; outputs are written under a temporary name and
renamed when complete; the manifest is updated after each output, and a rerun skips outputs whose
manifest entry still verifies against the same source.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edge_magistral.build import manifest as mf
from edge_magistral.build.checkpoint import Checkpoint, open_checkpoint
from edge_magistral.build.convert import OUT_TYPES, convert
from edge_magistral.build.quantize import estimated_size, parse_quants, quantize
from edge_magistral.errors import BadInputError, ModelNotFoundError, StorageError
from edge_magistral.gguf_info import GGUFInfo, read_info
from edge_magistral.hashing import sha256_file
from edge_magistral.progress import Advance, Progress, Silent
from edge_magistral.units import GiB

DISK_MARGIN = 256 * 1024 * 1024


@dataclass
class BuildRequest:
    src: Path
    out: Path
    quants: list[str]
    base_type: str = "BF16"
    name: str | None = None  # file basename; default from the source
    imatrix: Path | None = None
    nthread: int | None = None


@dataclass
class BuildResult:
    out: Path
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    manifest: mf.Manifest = field(default_factory=mf.Manifest)


@dataclass
class _Source:
    """The resolved input: a checkpoint to convert, or a GGUF to quantize from directly."""

    path: Path
    kind: str  # "mistral" | "hf" | "gguf"
    n_params: int
    n_bytes: int
    checkpoint: Checkpoint | None = None
    gguf: GGUFInfo | None = None


def _resolve_source(src: Path) -> _Source:
    if src.is_file():
        if src.suffix != ".gguf":
            raise BadInputError(f"{src}: expected a checkpoint directory or a .gguf file")
        info = read_info(src)  # runs the bounded pre-check first
        if info.file_type_name not in OUT_TYPES:
            raise BadInputError(f"{src}: is {info.file_type_name}; quantize from a BF16/F16/F32 GGUF or the "
                                "original checkpoint (re-quantizing loses quality)")
        return _Source(src, "gguf", info.n_params, info.file_size, gguf=info)
    ckpt = open_checkpoint(src)
    return _Source(src, ckpt.kind, ckpt.n_params, ckpt.n_bytes, checkpoint=ckpt)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _prepare_out(out: Path) -> None:
    """Create the output directory and prove it is writable before any long work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"{out}: output directory is not writable ({e.strerror}); "
                           "choose another --out or fix its permissions") from None
    for stale in out.glob("*.partial"):  # left by a killed build; never looks finished
        stale.unlink(missing_ok=True)


def source_sha256(src: _Source, progress: Progress) -> str:
    """The GGUF's own sha256, or for a checkpoint a sha256 over its files' names and sha256s."""
    files = [src.path] if src.kind == "gguf" else src.checkpoint.files
    advance = progress.task("hashing source", sum(f.stat().st_size for f in files))
    if src.kind == "gguf":
        return sha256_file(src.path, advance)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name} {sha256_file(f, advance)}\n".encode())
    return h.hexdigest()


def _still_good(out: Path, m: mf.Manifest, file: str, progress: Progress) -> bool:
    e = m.entry(file)
    if e is None or not (out / file).is_file():
        return False
    advance = progress.task(f"verifying {file}", e.size)
    return mf.check_entry(out, e, advance) is None


def _check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed + DISK_MARGIN:
        raise StorageError(f"{out}: needs about {(needed + DISK_MARGIN) / GiB:.1f} GiB free, has {free / GiB:.1f} GiB; "
                           "free space or choose another --out")


def build(req: BuildRequest, progress: Progress | None = None) -> BuildResult:
    """Run the whole build; see the module docstring for its guarantees."""
    progress = progress or Silent()
    quants = parse_quants(req.quants)
    if req.base_type not in OUT_TYPES:
        raise BadInputError(f"--base-type must be one of {', '.join(OUT_TYPES)}")
    if req.imatrix is not None and not req.imatrix.is_file():
        raise ModelNotFoundError(f"{req.imatrix}: no such importance-matrix file")
    if not req.src.exists():
        raise ModelNotFoundError(f"{req.src}: no such checkpoint or GGUF; check the path")
    src = _resolve_source(req.src)
    _prepare_out(req.out)
    stem = _slug(req.name or (src.path.stem if src.kind == "gguf" else src.path.name))

    m = mf.load(req.out)
    src_sha = source_sha256(src, progress)
    if m.source.get("sha256") != src_sha:
        m = mf.Manifest()  # a different source: nothing in the old manifest may be reused
    m.source = {"path": str(src.path.resolve()), "kind": src.kind, "sha256": src_sha}
    m.versions = mf.versions()

    base_file = f"{stem}-{req.base_type}.gguf"
    want = [q for q in quants if q != req.base_type]
    todo = [q for q in want if not _still_good(req.out, m, f"{stem}-{q}.gguf", progress)]
    result = BuildResult(out=req.out, skipped=[q for q in want if q not in todo])
    need_base = src.kind != "gguf" and (req.base_type in quants or todo) and \
        not _still_good(req.out, m, base_file, progress)
    needed = sum(estimated_size(src.n_params, q) for q in todo)
    needed += estimated_size(src.n_params, req.base_type) if need_base else 0
    _check_disk(req.out, needed)

    if src.kind == "gguf":
        base_path = src.path
    else:
        base_path = req.out / base_file
        if need_base:
            convert(src.checkpoint, base_path, req.base_type, name=req.name or src.path.name,
                    progress=progress.task(f"converting to {req.base_type}", src.n_bytes))
            m.put(mf.entry_for(req.out, base_file, req.base_type, progress.task(f"hashing {base_file}",
                                                                               base_path.stat().st_size)))
            mf.save(req.out, m)
            result.built.append(req.base_type)
        elif req.base_type in quants:
            result.skipped.append(req.base_type)
    for q in todo:
        result.built.append(q)
        _quantize_one(req, m, base_path, stem, q, progress)
    result.manifest = m
    mf.save(req.out, m)
    return result


def _quantize_one(req: BuildRequest, m: mf.Manifest, base: Path, stem: str, q: str, progress: Progress) -> None:
    file = f"{stem}-{q}.gguf"
    task: dict[str, Advance] = {}

    def on_tensor(i: int, n: int, name: str) -> None:
        if "advance" not in task:  # the tensor count is known from llama.cpp's first log line
            task["advance"] = progress.task(f"quantizing {q}", n)
        task["advance"](1)

    quantize(base, req.out / file, q, nthread=req.nthread, imatrix=req.imatrix, progress=on_tensor)
    m.put(mf.entry_for(req.out, file, q, progress.task(f"hashing {file}", (req.out / file).stat().st_size)))
    mf.save(req.out, m)
