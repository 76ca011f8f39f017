"""The one progress protocol of long work (build, store, admission): ``task(description, total)``
starts a task and returns its ``advance(n)``, called with each amount done (bytes, tensors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    """A reporter of long work; the CLI's is a progress bar, a library caller's may be silent."""

    def task(self, description: str, total: int) -> Advance: ...


class Silent:
    """Reports nothing."""

    def task(self, description: str, total: int) -> Advance:
        return _ignore


def _ignore(n: int) -> None:
    pass
