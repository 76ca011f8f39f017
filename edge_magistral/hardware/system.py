"""The real machine as a :class:`~edge_magistral.hardware.readers.Reader`: files, commands,
NVML and the installed llama.cpp (asked in a child process)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_magistral.hardware.nvidia import nvml_gpus
from edge_magistral.paths import child_env


class SystemReader:
    """Reads the real machine. Commands time out; anything missing reads as None."""

    def __init__(self, timeout_s: float = 10.0):
        self.timeout_s = timeout_s

    def read(self, path: str) -> str | None:
        try:
            return Path(path).read_bytes().decode("utf-8", "replace")
        except OSError:
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def run(self, argv: list[str]) -> str | None:
        if shutil.which(argv[0]) is None:
            return None
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    def nvml(self) -> list[dict[str, Any]] | None:
        return nvml_gpus()

    def ggml_devices(self) -> list[dict[str, Any]] | None:
        """Ask the installed llama.cpp in a child process (a backend may abort or grab a GPU)."""
        try:
            r = subprocess.run(
                [sys.executable, "-m", "edge_magistral.hardware", "--ggml-devices"],
                capture_output=True,
                text=True,
                timeout=max(30.0, self.timeout_s),
                env=child_env(),
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if r.returncode != 0:
            return None
        try:
            devs = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None
        return devs if isinstance(devs, list) else None

    def disk_free(self, path: str) -> int | None:
        p = Path(path).expanduser()
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            return shutil.disk_usage(p).free
        except OSError:
            return None

    def system(self) -> tuple[str, str]:
        return platform.system().lower(), platform.machine().lower()
