"""Where things live: the model store, huggingface-hub's cache, the service's unit, config and
state directories, and this package itself (for child processes). Read at call time, so a test or
a service's environment decides."""

from __future__ import annotations

import os
from pathlib import Path

STORE_ENV = "EDGE_MAGISTRAL_STORE"
SYSTEM_STORE = Path("/var/lib/edge-magistral/models")  # the service's (StateDirectory=edge-magistral)

UNIT_DIR = Path("/etc/systemd/system")
CONFIG_DIR = Path("/etc/edge-magistral")
STATE_DIRS = (Path("/var/lib/edge-magistral"), Path("/var/lib/private/edge-magistral"))  # DynamicUser's


def default_store_root() -> Path:
    """``$EDGE_MAGISTRAL_STORE``; else the service's state directory; else the user's cache."""
    if env := os.environ.get(STORE_ENV):
        return Path(env).expanduser()
    if state := os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(state.split(":")[0]) / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "edge-magistral" / "models"


def hub_cache_dir() -> Path:
    """huggingface-hub's cache, read at call time (its constants are fixed at its import)."""
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return Path(home).expanduser() / "hub"


def source_root() -> Path:
    """The directory holding the ``edge_magistral`` package."""
    return Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """Environment for a child ``python -m edge_magistral...``: this package importable from anywhere."""
    root = str(source_root())
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
