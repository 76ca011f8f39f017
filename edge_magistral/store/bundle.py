"""An air-gap bundle: model files from the store (re-verified as they are copied), profiles, an
optional wheelhouse, INSTALL.txt and SHA256SUMS, with the manifest written last."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_magistral import __version__
from edge_magistral.build import manifest as mf
from edge_magistral.errors import BadInputError, CorruptModelError, ModelNotFoundError
from edge_magistral.hashing import Digest
from edge_magistral.progress import Progress, Silent
from edge_magistral.store.hub import CHECKPOINT
from edge_magistral.store.local import Store, copy_hashed, ensure_space
from edge_magistral.store.wheels import WheelSpec, download_wheels
from edge_magistral.units import human_size


@dataclass
class BundleRequest:
    out: Path
    quants: list[str]  # quant names, or "checkpoint"
    wheels: WheelSpec | None = None


@dataclass
class Bundle:
    out: Path
    manifest: mf.Manifest
    llama_from: str = ""  # "wheel" | "source" | "" (no wheelhouse)


def make_bundle(store: Store, req: BundleRequest, progress: Progress | None = None) -> Bundle:
    """Model files from the store (re-verified as they are copied), profiles, an optional
    wheelhouse, INSTALL.txt and SHA256SUMS; the manifest is written last, listing them all."""
    progress = progress or Silent()
    models = _bundle_entries(store, req.quants)
    out = req.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: exists and is not an empty directory; give a new --out")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        ensure_space(out, sum(e.size for e in models), "this bundle")
        files = [_copy_out(store, e, out, progress) for e in models]
        files += _bundle_profiles(out)
        llama_from = ""
        if req.wheels is not None:
            llama_from = download_wheels(req.wheels, out / "wheels")
            files += [_entry_for(out, p) for p in sorted((out / "wheels").iterdir()) if p.is_file()]
        (out / "INSTALL.txt").write_text(install_text(models, req.wheels, llama_from))
        files.append(_entry_for(out, out / "INSTALL.txt"))
        (out / "SHA256SUMS").write_text("".join(f"{e.sha256}  {e.file}\n" for e in files))
        files.append(_entry_for(out, out / "SHA256SUMS"))
        m = mf.Manifest(source={"kind": "bundle", "store": str(store.root), "created": mf.now_utc()},
                        versions={"edge_magistral": __version__}, files=files)
        mf.save(out, m)
    except BaseException:
        _remove_bundle(out, made)
        raise
    return Bundle(out, m, llama_from)


def _bundle_entries(store: Store, quants: list[str]) -> list[mf.FileEntry]:
    entries = store.entries()
    out = []
    for q in quants:
        found = [e for e in entries if e.quant.upper() == q.upper()]
        if not found:
            hint = "--checkpoint" if q == CHECKPOINT else f"--quant {q}"
            raise ModelNotFoundError(f"{q} is not in the store at {store.root}; run "
                                     f"`edge-magistral pull {hint}` first")
        out += found if q == CHECKPOINT else [max(found, key=lambda e: e.created)]
    return out


def _copy_out(store: Store, e: mf.FileEntry, out: Path, progress: Progress) -> mf.FileEntry:
    dst = out / e.file
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    digest = Digest(e.size)
    copy_hashed(store.root / e.file, tmp, digest, progress.task(f"bundling {Path(e.file).name}", e.size))
    if digest.sha256_hex() != e.sha256:
        tmp.unlink()
        raise CorruptModelError(f"{store.root / e.file}: does not match the store's manifest; "
                                "run `edge-magistral verify` and pull it again")
    os.replace(tmp, dst)
    return e


def _bundle_profiles(out: Path) -> list[mf.FileEntry]:
    """The profiles this side plans with (built-in and the user's), one file per profile name."""
    from edge_magistral.profiles import load_profiles

    d = out / "profiles"
    d.mkdir()
    files = []
    for name, p in sorted(load_profiles().items()):
        src = Path(p.source)
        if src.is_file():
            shutil.copyfile(src, d / f"{name}.yaml")
            files.append(_entry_for(out, d / f"{name}.yaml"))
    return files


def _entry_for(root: Path, path: Path) -> mf.FileEntry:
    return mf.entry_for(root, path.relative_to(root).as_posix(), "")


def _remove_bundle(out: Path, made: bool) -> None:
    if made:
        shutil.rmtree(out, ignore_errors=True)
    else:
        for p in list(out.iterdir()):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def install_text(models: list[mf.FileEntry], wheels: WheelSpec | None, llama_from: str) -> str:
    lines = [f"edge-magistral bundle, made {mf.now_utc()} by edge-magistral {__version__}", "", "Models:"]
    lines += [f"  {e.file}  {e.quant}  {human_size(e.size)}  {e.repo or 'local'}"
              f"{'@' + e.revision if e.revision else ''}" for e in models]
    lines += ["", "On the air-gapped machine, in this directory:", "",
              "1. Check the bundle before installing anything:", "     sha256sum -c SHA256SUMS", ""]
    if wheels is not None:
        target = ", ".join(wheels.platforms) or "the machine that made it"
        py = wheels.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        lines += [f"2. Install edge-magistral from the wheelhouse (built for {target}, Python {py}):",
                  f"     python{py} -m venv ~/edge-magistral && . ~/edge-magistral/bin/activate",
                  "     pip install --no-index --find-links wheels edge-magistral"]
        if llama_from == "source":
            lines += ["   llama-cpp-python is compiled here from its source in wheels/ (a C++ compiler is",
                      "   needed). For a GPU, switch its backend on, e.g. on a Jetson Orin:",
                      '     CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87" \\',
                      "       pip install --no-index --find-links wheels edge-magistral"]
    else:
        lines += [f"2. Install edge-magistral {__version__} (this bundle has no wheelhouse: make one with",
                  "   `edge-magistral bundle --with-wheels --platform …` on the connected side)."]
    lines += ["", "3. Put the models into the store (every file is verified first; nothing half-copied",
              "   is ever listed):", "     edge-magistral import .", "",
              "4. Run:", '     edge-magistral run "Hello"', ""]
    return "\n".join(lines)
