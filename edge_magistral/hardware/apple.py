"""Apple Silicon: one unified memory pool, of which the GPU may wire a part."""

from __future__ import annotations

import re

from edge_magistral.hardware.bandwidth import bandwidth_for
from edge_magistral.hardware.model import GPUInfo
from edge_magistral.hardware.parsing import parse_sysctl
from edge_magistral.hardware.readers import Reader
from edge_magistral.units import GiB, MiB


def parse_vm_stat(text: str) -> int | None:
    """Bytes macOS can hand out now: free + inactive + speculative + purgeable pages."""
    m = re.search(r"page size of (\d+) bytes", text)
    if not m:
        return None
    page = int(m.group(1))
    pages = 0
    for key in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
        mm = re.search(rf"^{key}:\s+(\d+)", text, re.M)
        if mm:
            pages += int(mm.group(1))
    return pages * page


def probe_apple(reader: Reader) -> tuple[list[GPUInfo], str, int, int | None]:
    """Apple Silicon: one unified pool; the GPU may wire at most the wired limit of it.

    Returns (gpus, model, memsize, available RAM).
    """
    s = parse_sysctl(reader.run(["sysctl", "-a"]) or "")
    memsize = int(s.get("hw.memsize", 0) or 0)
    avail = parse_vm_stat(reader.run(["vm_stat"]) or "")
    if s.get("hw.optional.arm64") != "1" or not memsize:
        return [], s.get("hw.model", ""), memsize, avail
    wired_mb = int(s.get("iogpu.wired_limit_mb", 0) or 0)
    # macOS's default GPU working set: about 2/3 of RAM up to 36 GiB, 3/4 above
    limit = wired_mb * MiB if wired_mb else int(memsize * (0.75 if memsize > 36 * GiB else 2 / 3))
    chip = s.get("machdep.cpu.brand_string", "Apple Silicon")
    free = min(limit, avail) if avail is not None else limit
    gpu = GPUInfo(
        vendor="apple",
        name=chip,
        total_bytes=limit,
        free_bytes=free,
        unified=True,
        driver=s.get("kern.osproductversion", ""),
        bandwidth_gbs=bandwidth_for(chip),
        source="sysctl",
    )
    return [gpu], s.get("hw.model", ""), memsize, avail
