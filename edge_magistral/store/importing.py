"""``import``: a bundle (or a build directory) verified whole against its manifest, then its
models copied into the store all or nothing, and its profiles installed where this side lacks them."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_magistral.build import manifest as mf
from edge_magistral.errors import BadInputError, CorruptModelError, ModelNotFoundError, StorageError
from edge_magistral.hashing import Digest
from edge_magistral.progress import Progress, Silent
from edge_magistral.store.local import Staged, Store, copy_hashed, ensure_space, safe_relpath


@dataclass
class ImportResult:
    added: list[mf.FileEntry] = field(default_factory=list)
    present: list[mf.FileEntry] = field(default_factory=list)
    profiles_added: list[str] = field(default_factory=list)
    profiles_kept: list[str] = field(default_factory=list)  # same name, different content: yours stay


def read_bundle(src: Path) -> mf.Manifest:
    """The bundle's manifest, with every path and field checked before anything is read."""
    if not src.is_dir():
        raise ModelNotFoundError(f"{src}: no such directory")
    if not (src / mf.MANIFEST).is_file():
        raise ModelNotFoundError(f"{src}: no {mf.MANIFEST}; not a bundle made by `edge-magistral bundle` "
                                 "(nothing was imported)")
    m = mf.load(src)
    seen: set[str] = set()
    for e in m.files:
        safe_relpath(e.file, str(src))
        if not (isinstance(e.size, int) and e.size >= 0 and re.fullmatch(r"[0-9a-f]{64}", str(e.sha256))):
            raise CorruptModelError(f"{src}: manifest entry {e.file!r} has no valid size and sha256")
        if e.file in seen:
            raise CorruptModelError(f"{src}: manifest lists {e.file!r} twice")
        seen.add(e.file)
    if not any(e.quant for e in m.files):
        raise CorruptModelError(f"{src}: the manifest lists no model files; nothing to import")
    return m


def check_bundle(src: Path, m: mf.Manifest, progress: Progress) -> None:
    """Every file listed, present, of its size and sha256; nothing else; GGUFs and profiles valid."""
    listed = {e.file for e in m.files}
    for path in _tree(src):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink():
            raise CorruptModelError(f"{path}: a symlink in the bundle; refusing it (nothing was imported)")
        if not path.is_dir() and rel not in listed and rel != mf.MANIFEST:
            raise CorruptModelError(f"{path}: not in the bundle's manifest; refusing the bundle "
                                    "(remove the file or make the bundle again; nothing was imported)")
    advance = progress.task("verifying bundle", sum(e.size for e in m.files))
    for e in m.files:
        if (bad := mf.check_entry(src, e, advance)) is not None:
            what = {"missing": "missing", "size": f"truncated or padded: {bad.detail}",
                    "sha256": f"checksum mismatch: {bad.detail}"}.get(bad.problem, bad.problem)
            raise CorruptModelError(f"{src / e.file}: {what}; refusing the bundle (nothing was imported)")
    for e in m.files:
        if e.quant and e.file.endswith(".gguf"):
            _check_gguf_in_bundle(src / e.file)
        if e.file.startswith("profiles/"):
            _load_profile(src / e.file)


def _tree(root: Path) -> Iterator[Path]:
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            yield Path(d) / name


def _check_gguf_in_bundle(path: Path) -> None:
    from edge_magistral.gguf_info import check_gguf

    try:
        check_gguf(path)
    except CorruptModelError as e:
        raise CorruptModelError(f"{path}: not a valid GGUF ({str(e).split(': ', 1)[-1]}); nothing was "
                                "imported") from None


def _load_profile(path: Path):  # noqa: ANN202
    from edge_magistral.profiles import load_profile_file

    try:
        return load_profile_file(path)
    except BadInputError as e:
        raise CorruptModelError(f"{e}; refusing the bundle (nothing was imported)") from None


def import_bundle(store: Store, src: Path, progress: Progress | None = None,
                  profiles: bool = True) -> ImportResult:
    """Verify the whole bundle, then copy its models into the store all-or-nothing."""
    progress = progress or Silent()
    m = read_bundle(src)
    check_bundle(src, m, progress)
    result = ImportResult()
    models = [e for e in m.files if e.quant]
    todo = [e for e in models if not store.holds(e)]
    result.present = [e for e in models if e not in todo]
    staged: list[Staged] = []
    try:
        if todo:
            ensure_space(store.staging(), sum(e.size for e in todo), "this import")
        for e in todo:
            staged.append(_stage_copy(store, src, e, progress))
        if staged:
            store.commit(staged)
    except BaseException:
        for s in staged:
            s.tmp.unlink(missing_ok=True)
        raise
    result.added = [s.entry for s in staged]
    if profiles:
        _install_profiles(src, m, result)
    return result


def _stage_copy(store: Store, src: Path, e: mf.FileEntry, progress: Progress) -> Staged:
    """Copy one verified file into ``.partial/``, hashing again: the copy itself is checked."""
    tmp = store.stage_path(e.file)
    digest = Digest(e.size)
    copy_hashed(src / e.file, tmp, digest, progress.task(f"importing {Path(e.file).name}", e.size))
    if digest.sha256_hex() != e.sha256:
        tmp.unlink(missing_ok=True)
        raise CorruptModelError(f"{src / e.file}: changed while it was being copied; nothing was imported")
    return Staged(tmp, e)


def _install_profiles(src: Path, m: mf.Manifest, result: ImportResult) -> None:
    """Bundle profiles whose names this side lacks go to the user's profile directory; a same-named
    profile that differs is left alone (and reported)."""
    from edge_magistral.profiles import load_profiles, user_dir

    have = load_profiles()
    for e in m.files:
        if not e.file.startswith("profiles/"):
            continue
        p = _load_profile(src / e.file)
        mine = have.get(p.name)
        if mine is None:
            _install_profile(src / e.file, user_dir() / f"{p.name}.yaml")
            result.profiles_added.append(p.name)
        elif replace(mine, source="") != replace(p, source=""):
            result.profiles_kept.append(p.name)


def _install_profile(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{dst}: cannot write the profile ({e.strerror}); the models were imported, "
                           "run the import again with --no-profiles or fix the directory") from None
