"""NVIDIA Jetson: an integrated GPU that shares the host's RAM."""

from __future__ import annotations

from edge_magistral.hardware.bandwidth import bandwidth_for
from edge_magistral.hardware.model import GPUInfo
from edge_magistral.hardware.readers import Reader


def probe_jetson(reader: Reader, ram_total: int, ram_available: int) -> tuple[list[GPUInfo], str, str]:
    """Jetson: the integrated GPU shares RAM, so its free memory is MemAvailable (not MemFree)."""
    release = (reader.read("/etc/nv_tegra_release") or "").strip().splitlines()
    model = (reader.read("/proc/device-tree/model") or "").strip("\x00\n ")
    if not release and "jetson" not in model.lower():
        return [], model, ""
    name = model or "NVIDIA Jetson"
    gpu = GPUInfo(
        vendor="nvidia",
        name=name,
        total_bytes=ram_total,
        free_bytes=ram_available,
        unified=True,
        driver=release[0] if release else "",
        compute_capability="8.7" if "orin" in name.lower() else "",
        bandwidth_gbs=bandwidth_for(name),
        source="tegra",
    )
    return [gpu], model, release[0] if release else ""
