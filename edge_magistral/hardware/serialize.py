"""A ``detect --json`` file back into a :class:`~edge_magistral.hardware.model.Hardware`, every
field checked (a wrong one is a BadInputError that says how to write the file again)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edge_magistral.errors import BadInputError
from edge_magistral.hardware.model import SCHEMA_VERSION, CPUInfo, Finding, GGMLDevice, GPUInfo, Hardware


def from_dict(d: Any, source: str = "hardware JSON") -> Hardware:
    """Rebuild a Hardware from ``detect --json`` output; any wrong field is a BadInputError."""
    if not isinstance(d, dict):
        raise BadInputError(f"{source}: expected a JSON object as written by `edge-magistral detect --json`")
    try:
        if d.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise BadInputError(
                f"{source}: schema {d.get('schema')!r} is not {SCHEMA_VERSION}; "
                "re-run `edge-magistral detect --json` with this version"
            )
        hw = Hardware(
            os=_req(d, "os", str, source),
            machine=_req(d, "machine", str, source),
            cpu=CPUInfo(**_req(d, "cpu", dict, source)),
            ram_total_bytes=_req(d, "ram_total_bytes", int, source),
            ram_available_bytes=_req(d, "ram_available_bytes", int, source),
            cgroup_limit_bytes=d.get("cgroup_limit_bytes"),
            cgroup_usage_bytes=d.get("cgroup_usage_bytes"),
            disk_free_bytes=d.get("disk_free_bytes"),
            store_dir=str(d.get("store_dir", "")),
            gpus=[GPUInfo(**g) for g in _req(d, "gpus", list, source)],
            ggml_devices=None
            if d.get("ggml_devices") is None
            else [GGMLDevice(**g) for g in d["ggml_devices"]],
            board=str(d.get("board", "")),
            jetson_release=str(d.get("jetson_release", "")),
            findings=[Finding(**f) for f in d.get("findings", [])],
        )
    except TypeError as e:  # unknown or missing dataclass fields
        raise BadInputError(f"{source}: malformed ({e}); re-run `edge-magistral detect --json`") from None
    _check_numbers(hw, source)
    return hw


def _req(d: dict[str, Any], key: str, typ: type, source: str) -> Any:
    if key not in d:
        raise BadInputError(f"{source}: missing field {key!r}; re-run `edge-magistral detect --json`")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise BadInputError(f"{source}: field {key!r} must be {typ.__name__}, got {type(v).__name__}")
    return v


def _check_numbers(hw: Hardware, source: str) -> None:
    nums = {"ram_total_bytes": hw.ram_total_bytes, "ram_available_bytes": hw.ram_available_bytes}
    for i, g in enumerate(hw.gpus):
        nums[f"gpus[{i}].total_bytes"] = g.total_bytes
        nums[f"gpus[{i}].free_bytes"] = g.free_bytes
    for k, v in nums.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BadInputError(f"{source}: field {k!r} must be a non-negative integer, got {v!r}")
    if hw.ram_total_bytes == 0:
        raise BadInputError(f"{source}: ram_total_bytes is 0; re-run `edge-magistral detect --json`")


def load_hardware(path: str | os.PathLike[str]) -> Hardware:
    """Read a ``detect --json`` file written on another box."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise BadInputError(
            f"{p}: no such hardware file; write one with `edge-magistral detect --json > FILE`"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{p}: cannot read hardware file ({e})") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise BadInputError(
            f"{p}: not valid JSON ({e}); write it with `edge-magistral detect --json > FILE`"
        ) from None
    return from_dict(d, str(p))
