"""What this box has, as data: CPU, RAM (and the container's limit), disk, every GPU, and what
the installed llama.cpp sees. Round-trips through ``detect --json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class CPUInfo:
    """The CPU: what threads to use and which kernels llama.cpp can pick."""

    model: str
    arch: str  # x86_64, aarch64, arm64
    cores_physical: int
    cores_logical: int
    flags: list[str] = field(default_factory=list)  # normalized ISA names: AVX2, AVX512F, NEON, ...


@dataclass
class GPUInfo:
    """One GPU as the vendor tools (and, when it can use it, llama.cpp) describe it."""

    vendor: str  # nvidia | amd | apple | intel | unknown
    name: str
    total_bytes: int
    free_bytes: int
    unified: bool  # shares system RAM (Jetson, Apple Silicon): one pool with the host
    driver: str = ""
    compute_capability: str = ""
    pci_bus_id: str = ""
    ggml_device: str | None = None  # the llama.cpp device that drives it ("CUDA0"), None if none does
    bandwidth_gbs: float | None = None  # memory bandwidth estimate, for predicted tokens/s
    source: str = ""  # which probe found it


@dataclass
class GGMLDevice:
    """A device exactly as the installed llama.cpp (ggml backend registry) reports it."""

    name: str  # "CPU", "CUDA0", "Metal", "Vulkan0"
    description: str
    type: str  # cpu | gpu | igpu | accel | meta
    backend: str  # registry name: "CPU", "CUDA", "Metal", "ROCm", "Vulkan"
    free_bytes: int
    total_bytes: int
    device_id: str = ""  # PCI bus id when known


@dataclass
class Finding:
    """Something the user should know; ``error`` means the box will not run as it could."""

    level: str  # info | warning | error
    message: str
    fix: str = ""


@dataclass
class Hardware:
    """Everything the planner needs about one box; round-trips through JSON."""

    os: str
    machine: str
    cpu: CPUInfo
    ram_total_bytes: int
    ram_available_bytes: int
    cgroup_limit_bytes: int | None = None
    cgroup_usage_bytes: int | None = None
    disk_free_bytes: int | None = None
    store_dir: str = ""
    gpus: list[GPUInfo] = field(default_factory=list)
    ggml_devices: list[GGMLDevice] | None = None  # None: llama.cpp not installed / not probed
    board: str = ""  # device-tree model or Mac model ("NVIDIA Jetson AGX Orin Developer Kit")
    jetson_release: str = ""  # first line of /etc/nv_tegra_release
    findings: list[Finding] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    @property
    def usable_ram_bytes(self) -> int:
        """RAM a new process may use: MemAvailable, capped by the container limit."""
        avail = self.ram_available_bytes
        if self.cgroup_limit_bytes is not None:
            avail = min(avail, max(0, self.cgroup_limit_bytes - (self.cgroup_usage_bytes or 0)))
        return avail

    @property
    def is_jetson(self) -> bool:
        return bool(self.jetson_release) or "jetson" in self.board.lower()

    def runnable_gpus(self) -> list[GPUInfo]:
        """GPUs the installed llama.cpp can drive (all vendor GPUs when llama.cpp was not probed)."""
        if self.ggml_devices is None:
            return list(self.gpus)
        return [g for g in self.gpus if g.ggml_device]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
