"""NVIDIA GPUs: NVML (nvidia-ml-py) when it loads, else ``nvidia-smi``."""

from __future__ import annotations

from typing import Any

from edge_magistral.hardware.model import GPUInfo
from edge_magistral.hardware.parsing import as_str, mib_bytes, norm_bus
from edge_magistral.hardware.readers import Reader


def nvml_gpus() -> list[dict[str, Any]] | None:
    """NVIDIA GPUs through NVML (nvidia-ml-py); None when NVML is not there."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    try:
        out = []
        driver = as_str(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc = f"{major}.{minor}"
            except Exception:
                cc = ""
            try:
                bus = as_str(pynvml.nvmlDeviceGetPciInfo(h).busId)
            except Exception:
                bus = ""
            out.append(
                {
                    "name": as_str(pynvml.nvmlDeviceGetName(h)),
                    "total": int(mem.total),
                    "free": int(mem.free),
                    "driver": driver,
                    "compute_capability": cc,
                    "pci_bus_id": bus,
                }
            )
        return out
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap,pci.bus_id",
    "--format=csv,noheader,nounits",
]


def parse_nvidia_smi(text: str) -> list[GPUInfo]:
    """GPUs from ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 5 or not cols[0].isdigit():
            continue
        total = mib_bytes(cols[2])
        free = mib_bytes(cols[3])
        gpus.append(
            GPUInfo(
                vendor="nvidia",
                name=cols[1],
                total_bytes=total,
                free_bytes=free,
                unified=False,
                driver=cols[4],
                compute_capability=cols[5] if len(cols) > 5 else "",
                pci_bus_id=norm_bus(cols[6]) if len(cols) > 6 else "",
                source="nvidia-smi",
            )
        )
    return gpus


def probe_nvidia(reader: Reader) -> list[GPUInfo]:
    nv = reader.nvml()
    if nv:
        return [
            GPUInfo(
                vendor="nvidia",
                name=d["name"],
                total_bytes=int(d["total"]),
                free_bytes=int(d["free"]),
                unified=False,
                driver=d.get("driver", ""),
                compute_capability=d.get("compute_capability", ""),
                pci_bus_id=norm_bus(d.get("pci_bus_id", "")),
                source="nvml",
            )
            for d in nv
        ]
    return parse_nvidia_smi(reader.run(NVIDIA_SMI_QUERY) or "")
