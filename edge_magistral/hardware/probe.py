"""``detect``: probe the box (or a recorded one) and reconcile what llama.cpp sees with the
vendor tools."""

from __future__ import annotations

from edge_magistral.hardware.amd import probe_amd
from edge_magistral.hardware.apple import probe_apple
from edge_magistral.hardware.bandwidth import bandwidth_for
from edge_magistral.hardware.cpu import parse_meminfo, probe_cgroup, probe_cpu
from edge_magistral.hardware.ggml import parse_ggml_devices
from edge_magistral.hardware.jetson import probe_jetson
from edge_magistral.hardware.model import Finding, Hardware
from edge_magistral.hardware.nvidia import probe_nvidia
from edge_magistral.hardware.readers import Reader
from edge_magistral.hardware.reconcile import link_gpus
from edge_magistral.hardware.system import SystemReader
from edge_magistral.paths import default_store_root
from edge_magistral.units import GiB


def detect(reader: Reader | None = None, store_dir: str | None = None) -> Hardware:
    """Probe the box (or a recorded one) and reconcile what llama.cpp sees with the vendor tools."""
    reader = reader or SystemReader()
    store_dir = store_dir or str(default_store_root())
    os_name, machine = reader.system()
    cpu = probe_cpu(reader, os_name, machine)
    board = release = ""
    if os_name == "darwin":
        gpus, board, ram_total, avail = probe_apple(reader)
        ram_avail = avail if avail is not None else ram_total // 2
    else:
        ram_total, ram_avail = parse_meminfo(reader.read("/proc/meminfo") or "")
        gpus, board, release = probe_jetson(reader, ram_total, ram_avail)
        if not gpus:
            gpus = probe_nvidia(reader) + probe_amd(reader)
    for g in gpus:
        g.bandwidth_gbs = g.bandwidth_gbs or bandwidth_for(g.name)
    limit, usage = probe_cgroup(reader) if os_name == "linux" else (None, None)
    devices = parse_ggml_devices(reader.ggml_devices())
    hw = Hardware(
        os=os_name,
        machine=machine,
        cpu=cpu,
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_avail,
        cgroup_limit_bytes=limit,
        cgroup_usage_bytes=usage,
        disk_free_bytes=reader.disk_free(store_dir),
        store_dir=store_dir,
        gpus=gpus,
        ggml_devices=devices,
        board=board,
        jetson_release=release,
    )
    hw.findings = link_gpus(gpus, devices, hw.is_jetson) + _memory_findings(hw)
    return hw


def _memory_findings(hw: Hardware) -> list[Finding]:
    out = []
    if hw.cgroup_limit_bytes is not None and hw.cgroup_limit_bytes < hw.ram_total_bytes:
        out.append(
            Finding(
                "warning",
                f"this process is in a container limited to "
                f"{hw.cgroup_limit_bytes / GiB:.1f} GiB of the box's {hw.ram_total_bytes / GiB:.1f} GiB; "
                "plans use the limit",
            )
        )
    if not hw.gpus:
        out.append(Finding("info", "no GPU found: the model runs on the CPU"))
    return out
