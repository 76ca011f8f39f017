"""Where probes get their raw text: the :class:`Reader` protocol, and :class:`RecordedReader`,
which replays a box recorded as files (tests, and planning for a box described by files)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Protocol


class Reader(Protocol):
    """Where probes get their raw text; the only part that touches the real system."""

    def read(self, path: str) -> str | None: ...

    def listdir(self, path: str) -> list[str]: ...

    def run(self, argv: list[str]) -> str | None: ...

    def nvml(self) -> list[dict[str, Any]] | None: ...

    def ggml_devices(self) -> list[dict[str, Any]] | None: ...

    def disk_free(self, path: str) -> int | None: ...

    def system(self) -> tuple[str, str]: ...


class RecordedReader:
    """Replays a recorded box from a folder (tests, and planning for a box described by files).

    Layout: ``fs/<absolute path>`` for files, ``cmd/<argv joined by '_'>.txt`` for command output,
    ``nvml.json`` and ``ggml_devices.json`` for the library probes, ``system.json`` for
    ``{"os", "machine", "disk_free"}``. Whatever is absent reads as missing.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def read(self, path: str) -> str | None:
        p = self.root / "fs" / path.lstrip("/")
        return p.read_text() if p.is_file() else None

    def listdir(self, path: str) -> list[str]:
        p = self.root / "fs" / path.lstrip("/")
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def run(self, argv: list[str]) -> str | None:
        p = self.root / "cmd" / (command_key(argv) + ".txt")
        return p.read_text() if p.is_file() else None

    def _json(self, name: str) -> Any:
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else None

    def nvml(self) -> list[dict[str, Any]] | None:
        return self._json("nvml.json")

    def ggml_devices(self) -> list[dict[str, Any]] | None:
        return self._json("ggml_devices.json")

    def disk_free(self, path: str) -> int | None:
        return (self._json("system.json") or {}).get("disk_free")

    def system(self) -> tuple[str, str]:
        s = self._json("system.json") or {}
        return s.get("os", "linux"), s.get("machine", "x86_64")


def command_key(argv: list[str]) -> str:
    """File-name-safe key for a recorded command."""
    return re.sub(r"[^A-Za-z0-9.,=-]+", "_", "_".join(argv)).strip("_")
