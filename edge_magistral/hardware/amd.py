"""AMD GPUs: sysfs (``mem_info_vram_total/used``), else ``rocm-smi``."""

from __future__ import annotations

import json
import re

from edge_magistral.hardware.model import GPUInfo
from edge_magistral.hardware.parsing import as_int, norm_bus
from edge_magistral.hardware.readers import Reader


def probe_amd(reader: Reader) -> list[GPUInfo]:
    """AMD GPUs from sysfs (``mem_info_vram_total/used``), falling back to ``rocm-smi``."""
    gpus = []
    for card in reader.listdir("/sys/class/drm"):
        if not re.fullmatch(r"card\d+", card):
            continue
        dev = f"/sys/class/drm/{card}/device"
        if (reader.read(f"{dev}/vendor") or "").strip().lower() != "0x1002":
            continue
        total = as_int(reader.read(f"{dev}/mem_info_vram_total"))
        used = as_int(reader.read(f"{dev}/mem_info_vram_used"))
        if not total:
            continue
        name = (reader.read(f"{dev}/product_name") or "").strip() or _amd_name(reader, card)
        bus = reader.read(f"{dev}/uevent") or ""
        m = re.search(r"PCI_SLOT_NAME=(\S+)", bus)
        gpus.append(
            GPUInfo(
                vendor="amd",
                name=name,
                total_bytes=total,
                free_bytes=max(0, total - (used or 0)),
                unified=False,
                driver=(reader.read("/sys/module/amdgpu/version") or "").strip(),
                pci_bus_id=norm_bus(m.group(1)) if m else "",
                source="sysfs",
            )
        )
    smi = parse_rocm_smi(
        reader.run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"]) or ""
    )
    if not gpus:
        return smi
    for g, s in zip(gpus, smi, strict=False):  # sysfs rarely has a marketing name; rocm-smi does
        if g.name.startswith("AMD GPU"):
            g.name = s.name
    return gpus


def _amd_name(reader: Reader, card: str) -> str:
    dev = (reader.read(f"/sys/class/drm/{card}/device/device") or "").strip()
    return f"AMD GPU {dev}" if dev else "AMD GPU"


def parse_rocm_smi(text: str) -> list[GPUInfo]:
    """GPUs from ``rocm-smi --showproductname --showmeminfo vram --json``."""
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        return []
    gpus = []
    for key, d in sorted(data.items()):
        if not key.startswith("card") or not isinstance(d, dict):
            continue
        total = as_int(d.get("VRAM Total Memory (B)"))
        used = as_int(d.get("VRAM Total Used Memory (B)"))
        if not total:
            continue
        name = d.get("Card Series") or d.get("Card series") or d.get("Card model") or "AMD GPU"
        gpus.append(
            GPUInfo(
                vendor="amd",
                name=str(name),
                total_bytes=total,
                free_bytes=max(0, total - (used or 0)),
                unified=False,
                source="rocm-smi",
            )
        )
    return gpus
