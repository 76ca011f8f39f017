"""What a pull will fetch: the request, the hub's (or its cache's) description of each file,
and what each needs (already present, copy from the hub cache, download or resume)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from edge_magistral.build import manifest as mf
from edge_magistral.catalog import HF_REPO
from edge_magistral.errors import BadInputError, CorruptModelError, ModelNotFoundError
from edge_magistral.paths import hub_cache_dir
from edge_magistral.store.local import Store, safe_relpath
from edge_magistral.store.offline import hub_endpoint, hub_online

DEFAULT_REPO = HF_REPO
DEFAULT_PATTERN = "Magistral-Small-2507-{quant}.gguf"
OFFICIAL_QUANTS = ("BF16", "Q8_0", "Q5_K_M", "Q4_K_M")  # what DEFAULT_REPO publishes
CHECKPOINT_REPO = "mistralai/Magistral-Small-2507"
CHECKPOINT_FILES = ("params.json", "consolidated.safetensors", "tekken.json", "SYSTEM_PROMPT.txt")
CHECKPOINT = "checkpoint"  # the manifest's quant field for checkpoint files

HEAD_TIMEOUT_S = 10.0


class DownloadError(ModelNotFoundError):
    """The hub could not be reached, or a transfer broke off (its bytes are kept for a resume)."""


class NotOnHubError(ModelNotFoundError):
    """The repository or revision does not exist on the hub (or needs a token)."""


class FileNotOnHubError(NotOnHubError):
    """The repository has no such file (e.g. a quant it does not publish)."""


def is_checkable_etag(etag: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", etag))


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


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a broken network raises: retried by a download, a fall back to the hub cache in a plan."""
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


def partial_meta(tmp: Path) -> Path:
    """Beside a staged download: which file its bytes belong to (only that file resumes from them)."""
    return tmp.with_name(tmp.name + ".json")


def resumable(tmp: Path, rf: RemoteFile) -> int:
    """Bytes of an earlier download of these very bytes (same etag and size); 0 otherwise."""
    try:
        meta = json.loads(partial_meta(tmp).read_text())
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
        except transient_errors() as e:
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
            items.append(PullItem(rf, file, "download", resumable(store.stage_path(file), rf)))
    return PullPlan(req, items, source, note)


def _same_bytes(e: mf.FileEntry, rf: RemoteFile) -> bool:
    """A store entry holds the hub's file: same sha256, or (non-LFS: git sha1) same commit."""
    if len(rf.etag) == 64:
        return e.sha256 == rf.etag
    return e.repo == rf.repo and e.revision == rf.revision and e.size == rf.size
