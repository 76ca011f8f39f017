"""Byte units: binary ones for memory (what the planner and llama.cpp count in), decimal ones for
file sizes (how the hub and the catalog state them)."""

from __future__ import annotations

MiB = 1024**2
GiB = 1024**3


def human_size(n: int) -> str:
    """A file size in decimal units, one decimal: ``1.2 MB``, ``14.3 GB``."""
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"

