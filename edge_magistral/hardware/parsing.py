"""Small readers of probe output shared by the vendor probes."""

from __future__ import annotations

import re
from typing import Any

from edge_magistral.units import MiB


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl -a``-style ``key: value`` lines."""
    out = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep:
            out[key.strip()] = val.strip()
    return out


def as_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def as_int(v: Any) -> int | None:
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        return None


def mib_bytes(s: str) -> int:
    try:
        return int(float(s) * MiB)
    except ValueError:  # "[N/A]" on Jetson
        return 0


def norm_bus(bus: str) -> str:
    """'00000000:01:00.0' (NVML) and '0000:01:00.0' (ggml) -> '0000:01:00.0'."""
    bus = bus.strip().lower()
    m = re.match(r"([0-9a-f]+):([0-9a-f]+):([0-9a-f]+)\.([0-9a-f]+)", bus)
    if not m:
        return bus
    return f"{int(m.group(1), 16):04x}:{m.group(2)[-2:]}:{m.group(3)[-2:]}.{m.group(4)}"
