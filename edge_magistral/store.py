"""The model store: where model files live, how they get there, and how they are checked.

One directory (per user under the XDG cache, ``/var/lib/edge-magistral/models`` for the service,
or ``--store``/``$EDGE_MAGISTRAL_STORE``) holds the model files and a ``manifest.json`` in the
build's format, whose entries also name the hub repository and commit a file came from.

Files enter the store in one way only: staged under ``.partial/`` in the store (same filesystem),
verified (sha256 against the hub's LFS metadata or the bundle's manifest, then the GGUF pre-check),
renamed into place, and only then listed in the manifest. A failure at any point leaves the store
as it was; an interrupted download leaves its staged bytes so the next ``pull`` resumes.

Nothing here touches the network except :func:`plan_pull` and :func:`fetch` (``pull``);
:func:`offline_by_default` puts huggingface-hub in offline mode for everything else.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edge_magistral import __version__
from edge_magistral.build import manifest as mf
from edge_magistral.catalog import HF_REPO
from edge_magistral.errors import (
    BadInputError,
    CorruptModelError,
    EdgeMagistralError,
    ModelNotFoundError,
    StorageError,
)

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.planner import Plan
    from edge_magistral.profiles import Profile

STORE_ENV = "EDGE_MAGISTRAL_STORE"
SYSTEM_ROOT = Path("/var/lib/edge-magistral/models")
PARTIAL = ".partial"
LOCK = ".lock"

DEFAULT_REPO = HF_REPO
DEFAULT_PATTERN = "Magistral-Small-2507-{quant}.gguf"
OFFICIAL_QUANTS = ("BF16", "Q8_0", "Q5_K_M", "Q4_K_M")  # what DEFAULT_REPO publishes
CHECKPOINT_REPO = "mistralai/Magistral-Small-2507"
CHECKPOINT_FILES = ("params.json", "consolidated.safetensors", "tekken.json", "SYSTEM_PROMPT.txt")
CHECKPOINT = "checkpoint"  # the manifest's quant field for checkpoint files

CHUNK = 8 * 1024 * 1024
RETRIES = 5  # transient network errors in a row before a download gives up (its bytes are kept)
RETRY_WAIT_S = 1.0
HEAD_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0

Advance = Callable[[int], None]


class Progress(Protocol):
    """How long work is reported: ``task(description, total)`` returns an advance function."""

    def task(self, description: str, total: int) -> Advance: ...


class Silent:
    def task(self, description: str, total: int) -> Advance:
        return lambda n: None


class DownloadError(ModelNotFoundError):
    """The hub could not be reached, or a transfer broke off (its bytes are kept for a resume)."""


class NotOnHubError(ModelNotFoundError):
    """The repository or revision does not exist on the hub (or needs a token)."""


class FileNotOnHubError(NotOnHubError):
    """The repository has no such file (e.g. a quant it does not publish)."""


# ------------------------------------------------------------------------------------ location


def default_root() -> Path:
    """``$EDGE_MAGISTRAL_STORE``; else the service's state directory; else the user's cache."""
    if env := os.environ.get(STORE_ENV):
        return Path(env).expanduser()
    if state := os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(state.split(":")[0]) / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "edge-magistral" / "models"


def hub_cache_dir() -> Path:
    """huggingface-hub's cache, read at call time (its constants are fixed at import)."""
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                                     "huggingface")
    return Path(home).expanduser() / "hub"


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


# -------------------------------------------------------------------------------- offline mode

_user_offline: bool | None = None
OURS = "EDGE_MAGISTRAL_SET_HF_OFFLINE"  # marks HF_HUB_OFFLINE as set by us, not by the user


def _set_hub_offline(on: bool) -> None:
    """Set huggingface-hub's offline mode now: the env var (for anything imported later, and
    children), and the constant the hub read at its import."""
    os.environ["HF_HUB_OFFLINE"] = "1" if on else "0"
    os.environ[OURS] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = on


def offline_by_default() -> None:
    """Every command runs with the hub offline; ``pull`` alone turns it on (see :func:`hub_online`)."""
    global _user_offline
    if _user_offline is None:
        mine = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        _user_offline = mine and OURS not in os.environ  # inherited from an edge-magistral parent: not theirs
    _set_hub_offline(True)


def user_wants_offline() -> bool:
    """Whether the user had set HF_HUB_OFFLINE themselves (then ``pull`` uses the hub cache only)."""
    return bool(_user_offline)


@contextmanager
def hub_online() -> Iterator[None]:
    before = os.environ.get("HF_HUB_OFFLINE")
    _set_hub_offline(False)
    try:
        yield
    finally:
        _set_hub_offline(before not in (None, "", "0"))
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)


# ------------------------------------------------------------------------------------- hashing


class Digest:
    """sha256 of a byte stream, plus git's blob sha1 when the hub's etag is one (non-LFS files)."""

    def __init__(self, size: int, etag: str = ""):
        self.sha256 = hashlib.sha256()
        self.git = hashlib.sha1(b"blob %d\0" % size) if re.fullmatch(r"[0-9a-f]{40}", etag) else None

    def update(self, b: bytes) -> None:
        self.sha256.update(b)
        if self.git is not None:
            self.git.update(b)

    def hexdigest(self) -> str:
        """The digest the hub's etag is comparable with."""
        return (self.git or self.sha256).hexdigest()

    def matches(self, etag: str) -> bool:
        return self.hexdigest() == etag


def is_checkable_etag(etag: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", etag))


def copy_hashed(src: Path, dst: Path, digest: Digest, advance: Advance) -> int:
    """Copy ``src`` to a new ``dst``, hashing what is read; fsync'd. Disk errors → StorageError."""
    n = 0
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while chunk := fi.read(CHUNK):
                fo.write(chunk)
                digest.update(chunk)
                n += len(chunk)
                advance(len(chunk))
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


def hash_file(path: Path, digest: Digest, advance: Advance) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            advance(len(chunk))


def ensure_space(directory: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if need > free:
        raise StorageError(f"{directory}: {what} needs {human(need)} but only {human(free)} is free; "
                           "free some space or choose another --store")


def human(n: int) -> str:
    """Sizes as the hub and the catalog state them (decimal units)."""
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------- the store


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
        return cls(Path(root).expanduser() if root else default_root())

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


# ----------------------------------------------------------------------------------------- pull


@dataclass(frozen=True)
class PullRequest:
    """Which files of which repository, at which revision, and where they go in the store."""

    files: tuple[str, ...]
    quant: str  # the manifest's quant field ("checkpoint" for checkpoint files)
    repo: str = DEFAULT_REPO
    revision: str = "main"
    subdir: str = ""  # store subdirectory ("" for GGUFs, the repo's name for a checkpoint)
    offline: bool = False  # resolve from huggingface-hub's cache only


def gguf_request(quant: str, repo: str = DEFAULT_REPO, revision: str = "main",
                 pattern: str = DEFAULT_PATTERN, offline: bool = False) -> PullRequest:
    if "{quant}" not in pattern:
        raise BadInputError(f"--pattern {pattern!r} has no {{quant}} placeholder")
    return PullRequest((pattern.format(quant=quant),), quant, repo, revision, "", offline)


def checkpoint_request(repo: str = CHECKPOINT_REPO, revision: str = "main",
                       files: tuple[str, ...] = CHECKPOINT_FILES, offline: bool = False) -> PullRequest:
    return PullRequest(files, CHECKPOINT, repo, revision, repo.split("/")[-1], offline)


@dataclass(frozen=True)
class RemoteFile:
    """One file as the hub (or its local cache) describes it."""

    repo: str
    filename: str
    revision: str  # commit hash
    etag: str  # sha256 for LFS files, git blob sha1 otherwise
    size: int
    url: str
    cached: str = ""  # path in huggingface-hub's cache, when the bytes are already there


@dataclass
class PullItem:
    remote: RemoteFile
    entry_file: str  # path in the store
    action: str  # "present" | "cache" | "download"
    have: int = 0  # bytes of an interrupted download that can be resumed


@dataclass
class PullPlan:
    request: PullRequest
    items: list[PullItem]
    source: str  # "hub" or "cache"
    note: str = ""  # why the hub cache was used

    @property
    def revision(self) -> str:
        return self.items[0].remote.revision

    @property
    def total(self) -> int:
        return sum(i.remote.size for i in self.items)

    @property
    def to_download(self) -> int:
        return sum(i.remote.size - i.have for i in self.items if i.action == "download")


def _transient() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (httpx2.TransportError, OfflineModeIsEnabled)


def _head(repo: str, filename: str, revision: str) -> RemoteFile:
    """The hub's metadata for one file: commit, LFS sha256 (or git sha1), size, download URL."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(repo, filename, revision=revision, endpoint=hub_endpoint())
    try:
        meta = get_hf_file_metadata(url, timeout=HEAD_TIMEOUT_S, endpoint=hub_endpoint())
    except GatedRepoError:
        raise NotOnHubError(f"{repo} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise NotOnHubError(f"{repo}: no such repository on {hub_endpoint()} (check --repo; a private one "
                            "needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise NotOnHubError(f"{repo}: no revision {revision!r} (check --revision)") from None
    except RemoteEntryNotFoundError:
        raise FileNotOnHubError(f"{repo}@{revision}: no file {filename} (check --quant or --pattern)") \
            from None
    except HfHubHTTPError as e:
        raise DownloadError(f"{url}: the hub answered {e.response.status_code}; try again later") from None
    etag = (meta.etag or "").strip('"')
    if not meta.commit_hash or not is_checkable_etag(etag) or meta.size is None:
        raise DownloadError(f"{url}: the server sent no commit, checksum or size (is HF_ENDPOINT a hub?)")
    # no redirect: fetch by commit, so the bytes cannot change under a moving branch (a CDN
    # redirect is already content-addressed)
    pinned = hf_hub_url(repo, filename, revision=meta.commit_hash, endpoint=hub_endpoint())
    return RemoteFile(repo, filename, meta.commit_hash, etag, meta.size,
                      pinned if meta.location in (None, url) else meta.location)


def _from_hub_cache(repo: str, filename: str, revision: str) -> RemoteFile | None:
    """The file as huggingface-hub's own offline resolution finds it in its cache (refs → snapshot
    → blob); the blob's name is the etag the hub served it under."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        pointer = Path(hf_hub_download(repo, filename, revision=revision, cache_dir=hub_cache_dir(),
                                       local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    blob = pointer.resolve()
    commit = pointer.parents[len(Path(filename).parts) - 1].name  # snapshots/<commit>/<filename>
    if not is_checkable_etag(blob.name):
        raise CorruptModelError(f"{pointer}: the hub cache keeps it under {blob.name!r}, not a checksum; "
                                "cannot verify it")
    return RemoteFile(repo, filename, commit, blob.name, blob.stat().st_size, "", str(blob))


def _cached_blob(rf: RemoteFile) -> str:
    """The hub cache's copy of a file the hub just described, if it holds those very bytes."""
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(rf.repo, rf.filename, cache_dir=hub_cache_dir(), revision=rf.revision)
    if isinstance(p, str) and Path(p).resolve().name == rf.etag:
        return str(Path(p).resolve())
    return ""


def _resolve_online(req: PullRequest) -> list[RemoteFile]:
    """HEAD every file; the first answer pins the revision to a commit for the others."""
    first = _head(req.repo, req.files[0], req.revision)
    rest = [_head(req.repo, f, first.revision) for f in req.files[1:]]
    return [replace(r, cached=_cached_blob(r)) for r in [first, *rest]]


def _resolve_cached(req: PullRequest, why: str) -> list[RemoteFile]:
    found = [_from_hub_cache(req.repo, f, req.revision) for f in req.files]
    missing = [f for f, r in zip(req.files, found, strict=True) if r is None]
    if missing:
        raise DownloadError(f"{why}, and huggingface-hub's cache at {hub_cache_dir()} does not hold "
                            f"{req.repo}@{req.revision}: {', '.join(missing)}")
    return [r for r in found if r is not None]


def _partial_meta(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".json")


def _resumable(tmp: Path, rf: RemoteFile) -> int:
    """Bytes of an earlier download of these very bytes (same etag and size); 0 otherwise."""
    try:
        meta = json.loads(_partial_meta(tmp).read_text())
        have = tmp.stat().st_size
    except (OSError, ValueError):
        return 0
    if meta.get("etag") == rf.etag and meta.get("size") == rf.size and have <= rf.size:
        return have
    return 0


def plan_pull(store: Store, req: PullRequest) -> PullPlan:
    """Resolve the files (hub, or its cache when offline or unreachable) and what each needs."""
    source, note = "hub", ""
    if req.offline:
        remotes, source = _resolve_cached(req, "offline (HF_HUB_OFFLINE or --offline)"), "cache"
    else:
        try:
            with hub_online():
                remotes = _resolve_online(req)
        except _transient() as e:
            note = f"the hub at {hub_endpoint()} is not reachable ({type(e).__name__})"
            remotes, source = _resolve_cached(req, note), "cache"
    items = []
    for rf in remotes:
        file = f"{req.subdir}/{rf.filename}" if req.subdir else rf.filename
        safe_relpath(file, rf.repo)
        entry = store.manifest().entry(file) if store.root.is_dir() else None
        if entry is not None and _same_bytes(entry, rf) and store.holds(entry):
            items.append(PullItem(rf, file, "present"))
        elif rf.cached:
            items.append(PullItem(rf, file, "cache"))
        else:
            items.append(PullItem(rf, file, "download", _resumable(store.stage_path(file), rf)))
    return PullPlan(req, items, source, note)


def _same_bytes(e: mf.FileEntry, rf: RemoteFile) -> bool:
    """A store entry holds the hub's file: same sha256, or (non-LFS: git sha1) same commit."""
    if len(rf.etag) == 64:
        return e.sha256 == rf.etag
    return e.repo == rf.repo and e.revision == rf.revision and e.size == rf.size


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
    have = _resumable(tmp, rf)
    if not have:
        tmp.unlink(missing_ok=True)
    try:  # what the staged bytes are, so that only the same file resumes from them
        _partial_meta(tmp).write_text(json.dumps({"repo": rf.repo, "file": rf.filename,
                                                  "revision": rf.revision, "etag": rf.etag, "size": rf.size}))
    except OSError as e:
        raise StorageError(f"{tmp.parent}: cannot write ({e.strerror}); free some space") from None
    advance = progress.task(f"downloading {Path(rf.filename).name}", rf.size)
    digest = Digest(rf.size, rf.etag)
    if have:
        hash_file(tmp, digest, advance)
    t = _Transfer(rf, tmp, have, digest, advance)
    failures = 0
    while t.have < rf.size:
        before = t.have
        try:
            t.get()
        except CorruptModelError:
            _discard(tmp)
            raise
        except _transient() as e:
            failures = 0 if t.have > before else failures + 1
            if failures > RETRIES:
                raise DownloadError(f"{rf.filename}: download broke off at {human(t.have)} of "
                                    f"{human(rf.size)} ({type(e).__name__}); run the same command again to "
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
    entry = mf.FileEntry(file=item.entry_file, quant=quant, size=size, sha256=digest.sha256.hexdigest(),
                         created=mf.now_utc(), repo=rf.repo, revision=rf.revision)
    store.commit([Staged(tmp, entry)])
    _partial_meta(tmp).unlink(missing_ok=True)
    return entry


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _discard(tmp: Path) -> None:
    tmp.unlink(missing_ok=True)
    _partial_meta(tmp).unlink(missing_ok=True)


def _check_gguf(path: Path, name: str) -> None:
    from edge_magistral.gguf_info import check_gguf

    try:
        check_gguf(path)
    except CorruptModelError as e:
        _discard(path)
        raise CorruptModelError(f"{name}: not a valid GGUF ({str(e).split(': ', 1)[-1]})") from None


# ---------------------------------------------------------------------------------- quant choice


def catalog_plan(hw: Hardware, profile: Profile, quants: tuple[str, ...] | list[str]) -> Plan:
    """What the planner picks for this box among ``quants``, from the catalog (nothing downloaded)."""
    from edge_magistral.catalog import catalog
    from edge_magistral.planner import plan

    return plan(hw, profile, catalog(list(quants)))


# ------------------------------------------------------------------------------ bundle / import


def safe_relpath(name: str, where: str) -> str:
    """A manifest path that stays inside its directory and off the store's own files."""
    parts = name.split("/")
    bad = (not name or name.startswith("/") or "\\" in name or "\0" in name
           or any(p in ("", ".", "..") or p.startswith(".") for p in parts) or name == mf.MANIFEST)
    if bad:
        raise CorruptModelError(f"{where}: manifest path {name!r} points outside the bundle or at the "
                                "store's own files; refusing it (nothing was imported)")
    return name


@dataclass(frozen=True)
class WheelSpec:
    """A wheelhouse for another box: pip's target platform tags and Python version."""

    platforms: tuple[str, ...] = ()  # e.g. manylinux2014_aarch64; empty: this machine
    python_version: str = ""  # e.g. 3.10; empty: this interpreter
    pip_args: tuple[str, ...] = ()  # passed to every pip call (an index mirror, --find-links)


LLAMA = "llama-cpp-python"
LLAMA_BUILD_TOOLS = ("scikit-build-core[pyproject]>=0.9.2", "cmake>=3.21", "ninja")


def _requirements() -> list[str]:
    """edge-magistral's runtime requirements (no extras), as its metadata states them."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("edge-magistral") or []
    except PackageNotFoundError:
        raise BadInputError("edge-magistral is not installed as a package; `pip install .` first") \
            from None
    return [r for r in reqs if "extra ==" not in r]


def _req_name(r: str) -> str:
    m = re.match(r"[A-Za-z0-9._-]+", r)
    return re.sub(r"[-_.]+", "-", m.group(0)).lower() if m else r


def _project_dir() -> Path | None:
    """The source tree this package runs from (an editable install), to build its wheel."""
    root = Path(__file__).resolve().parent.parent
    pp = root / "pyproject.toml"
    return root if pp.is_file() and 'name = "edge-magistral"' in pp.read_text() else None


def pip_commands(spec: WheelSpec, dest: Path, requirements: list[str],
                 project: Path | None) -> tuple[list[list[str]], list[str], list[list[str]]]:
    """(steps, llama-cpp-python as a prebuilt wheel, its fallback: source + build tools).

    pip needs ``--only-binary=:all:`` for a foreign platform; llama-cpp-python publishes source
    only on PyPI, so it gets its own step: a wheel if the index has one for the target, else the
    sdist plus what building it offline takes."""
    pip = [sys.executable, "-m", "pip"]
    pv = spec.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    target = [*(f"--platform={p}" for p in spec.platforms), f"--python-version={pv}", "--implementation=cp",
              "--only-binary=:all:"] if spec.platforms else []
    dl = [*pip, "download", "--dest", str(dest), *spec.pip_args]
    llama = [r for r in requirements if _req_name(r) == LLAMA] or [LLAMA]
    others = [r for r in requirements if _req_name(r) != LLAMA] + _llama_runtime_deps()
    if project is not None:
        self_step = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest),
                     str(project)]
    else:
        self_step = [*dl, "--no-deps", f"edge-magistral=={__version__}"]
    steps = [self_step, [*dl, *target, *others]]
    prebuilt = [*dl, *target, "--no-deps", "--only-binary=:all:", *llama]
    from_source = [[*dl, "--no-deps", "--no-binary=:all:", *llama], [*dl, *target, *LLAMA_BUILD_TOOLS]]
    return steps, prebuilt, from_source


def _llama_runtime_deps() -> list[str]:
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in (requires(LLAMA) or []) if "extra ==" not in r]
    except PackageNotFoundError:
        return ["typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]


def _pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _pip_failed(cmd: list[str], r: subprocess.CompletedProcess[str]) -> EdgeMagistralError:
    lines = [x for x in (r.stderr or r.stdout).splitlines() if x.strip()]
    why = next((x for x in reversed(lines) if "ERROR" in x), lines[-1] if lines else f"exit {r.returncode}")
    return EdgeMagistralError(f"pip {cmd[3]} failed: {why.strip()} (it needs the package index; "
                              "--pip-arg=--index-url=URL for a mirror); no bundle was left")


def download_wheels(spec: WheelSpec, dest: Path) -> str:
    """Fill ``dest`` with edge-magistral and every dependency for the target; says how llama-cpp-python
    came (``wheel`` or ``source``)."""
    dest.mkdir(parents=True, exist_ok=True)
    steps, prebuilt, from_source = pip_commands(spec, dest, _requirements(), _project_dir())
    for cmd in steps:
        if (r := _pip(cmd)).returncode != 0:
            raise _pip_failed(cmd, r)
    if _pip(prebuilt).returncode == 0:
        return "wheel"
    for cmd in from_source:
        if (r := _pip(cmd)).returncode != 0:
            raise _pip_failed(cmd, r)
    return "source"


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
    if digest.sha256.hexdigest() != e.sha256:
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
    lines += [f"  {e.file}  {e.quant}  {human(e.size)}  {e.repo or 'local'}"
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
    if digest.sha256.hexdigest() != e.sha256:
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
