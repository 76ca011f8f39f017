"""The model store: where model files live, how they get there, and how they are checked.

One directory (per user under the XDG cache, ``/var/lib/edge-magistral/models`` for the service,
or ``--store``/``$EDGE_MAGISTRAL_STORE``) holds the model files and a ``manifest.json`` in the
build's format, whose entries also name the hub repository and commit a file came from.

Files enter the store in one way only: staged under ``.partial/`` in the store (same filesystem),
verified (sha256 against the hub's LFS metadata or the bundle's manifest, then the GGUF pre-check),
renamed into place, and only then listed in the manifest. A failure at any point leaves the store
as it was; an interrupted download leaves its staged bytes so the next ``pull`` resumes.

Nothing here touches the network except :func:`plan_pull` and :func:`fetch` (``pull``);
:func:`offline_by_default` puts huggingface-hub in offline mode for everything else. The store
does not plan: which quant suits a box is the planner's answer, asked by the CLI.

Modules: :mod:`.local` (the store directory), :mod:`.offline` (the hub's offline mode),
:mod:`.hub` (what a pull fetches), :mod:`.transfer` (downloads and copies, verified),
:mod:`.bundle` and :mod:`.wheels` (air-gap bundles), :mod:`.importing` (``import``).
"""

from edge_magistral.paths import STORE_ENV, SYSTEM_STORE, default_store_root, hub_cache_dir
from edge_magistral.store.bundle import Bundle, BundleRequest, make_bundle
from edge_magistral.store.hub import (
    CHECKPOINT,
    CHECKPOINT_REPO,
    DEFAULT_PATTERN,
    DEFAULT_REPO,
    OFFICIAL_QUANTS,
    DownloadError,
    FileNotOnHubError,
    NotOnHubError,
    PullItem,
    PullPlan,
    PullRequest,
    RemoteFile,
    checkpoint_request,
    gguf_request,
    plan_pull,
)
from edge_magistral.store.importing import ImportResult, import_bundle
from edge_magistral.store.local import PARTIAL, Staged, Store
from edge_magistral.store.offline import offline_by_default, user_wants_offline
from edge_magistral.store.transfer import fetch
from edge_magistral.store.wheels import WheelSpec, pip_commands

__all__ = [
    "CHECKPOINT", "CHECKPOINT_REPO", "DEFAULT_PATTERN", "DEFAULT_REPO", "OFFICIAL_QUANTS", "PARTIAL", "STORE_ENV",
    "SYSTEM_STORE", "Bundle", "BundleRequest", "DownloadError", "FileNotOnHubError", "ImportResult", "NotOnHubError",
    "PullItem", "PullPlan", "PullRequest", "RemoteFile", "Staged", "Store", "WheelSpec", "checkpoint_request",
    "default_store_root", "fetch", "gguf_request", "hub_cache_dir", "import_bundle", "make_bundle",
    "offline_by_default", "pip_commands", "plan_pull", "user_wants_offline",
]
