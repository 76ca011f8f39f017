"""huggingface-hub's offline mode: every command runs with the hub offline; ``pull`` alone
turns it on, for its own calls (:func:`hub_online`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def hub_endpoint() -> str:
    """The hub's URL: ``$HF_ENDPOINT`` read at call time, else huggingface-hub's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


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
