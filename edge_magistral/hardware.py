"""What this box has: CPU, RAM (and the container's limit), disk, and every GPU.

The primary source is what llama.cpp itself sees (the ggml backend devices of the installed
library): that is what will run the model. Vendor probes (NVML / ``nvidia-smi``, AMD sysfs /
``rocm-smi``, macOS ``sysctl``, Jetson release files) add detail and catch the classic mistake of a
GPU that is present while the installed llama.cpp build cannot use it.

Every probe reads through a :class:`Reader`, so tests feed recorded real outputs
(:class:`RecordedReader`) and ``--hardware FILE`` plans for a box described by another box's
``detect --json``.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_magistral.errors import BackendError, BadInputError

SCHEMA_VERSION = 1
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
GiB = 1024**3
MiB = 1024**2

# ----------------------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------------------- readers


class Reader(Protocol):
    """Where probes get their raw text; the only part that touches the real system."""

    def read(self, path: str) -> str | None: ...

    def listdir(self, path: str) -> list[str]: ...

    def run(self, argv: list[str]) -> str | None: ...

    def nvml(self) -> list[dict[str, Any]] | None: ...

    def ggml_devices(self) -> list[dict[str, Any]] | None: ...

    def disk_free(self, path: str) -> int | None: ...

    def system(self) -> tuple[str, str]: ...


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
        return _nvml_gpus()

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


class RecordedReader:
    """Replays a recorded box from a folder (tests, and planning for a box described by files).

    Layout: ``fs/<absolute path>`` for files, ``cmd/<argv joined by '_'>.txt`` for command output,
    ``nvml.json`` and ``ggml_devices.json`` for the library probes, ``system.json`` for
    ``{"os", "machine", "disk_free"}``. Whatever is absent reads as missing.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def read(self, path: str) -> str | None:
        p = self.root / "fs" / path.lstrip("/")
        return p.read_text() if p.is_file() else None

    def listdir(self, path: str) -> list[str]:
        p = self.root / "fs" / path.lstrip("/")
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def run(self, argv: list[str]) -> str | None:
        p = self.root / "cmd" / (command_key(argv) + ".txt")
        return p.read_text() if p.is_file() else None

    def _json(self, name: str) -> Any:
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else None

    def nvml(self) -> list[dict[str, Any]] | None:
        return self._json("nvml.json")

    def ggml_devices(self) -> list[dict[str, Any]] | None:
        return self._json("ggml_devices.json")

    def disk_free(self, path: str) -> int | None:
        return (self._json("system.json") or {}).get("disk_free")

    def system(self) -> tuple[str, str]:
        s = self._json("system.json") or {}
        return s.get("os", "linux"), s.get("machine", "x86_64")


def child_env() -> dict[str, str]:
    """Environment for a child ``python -m edge_magistral...``: this package importable from anywhere."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def command_key(argv: list[str]) -> str:
    """File-name-safe key for a recorded command."""
    return re.sub(r"[^A-Za-z0-9.,=-]+", "_", "_".join(argv)).strip("_")


# ------------------------------------------------------------------------------------ CPU / RAM

_X86_FLAGS = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "avx_vnni": "AVX_VNNI",
    "amx_int8": "AMX_INT8",
    "amx_bf16": "AMX_BF16",
}
_ARM_FLAGS = {
    "asimd": "NEON",
    "asimddp": "DOTPROD",
    "asimdhp": "FP16",
    "sve": "SVE",
    "sve2": "SVE2",
    "i8mm": "I8MM",
    "bf16": "BF16",
}
_MAC_FLAGS = {
    "hw.optional.neon": "NEON",
    "hw.optional.arm.FEAT_DotProd": "DOTPROD",
    "hw.optional.arm.FEAT_FP16": "FP16",
    "hw.optional.arm.FEAT_I8MM": "I8MM",
    "hw.optional.arm.FEAT_BF16": "BF16",
    "hw.optional.arm.FEAT_SME": "SME",
}


def parse_cpuinfo(text: str) -> tuple[str, int, int, list[str]]:
    """Model name, physical and logical cores, ISA flags from Linux ``/proc/cpuinfo``."""
    model, logical, cores, raw_flags = "", 0, set(), set()
    phys = core = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip().lower(), val.strip()
        if key == "processor":
            logical += 1
        elif key in ("model name", "hardware", "cpu model") and not model:
            model = val
        elif key in ("flags", "features"):
            raw_flags.update(val.split())
        elif key == "physical id":
            phys = val
        elif key == "core id":
            core = val
            cores.add((phys, core))
    table = {**_X86_FLAGS, **_ARM_FLAGS}
    flags = sorted({table[f] for f in raw_flags if f in table})
    physical = len(cores) or logical
    return model, physical, logical, flags


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes; MemAvailable, not MemFree, is what a process can get."""
    vals = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            vals[key.strip()] = int(parts[0]) * 1024
    total = vals.get("MemTotal", 0)
    avail = vals.get("MemAvailable", vals.get("MemFree", 0) + vals.get("Cached", 0))
    return total, avail


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl -a``-style ``key: value`` lines."""
    out = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep:
            out[key.strip()] = val.strip()
    return out


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


def probe_cpu(reader: Reader, os_name: str, machine: str) -> CPUInfo:
    if os_name == "darwin":
        s = parse_sysctl(reader.run(["sysctl", "-a"]) or "")
        flags = sorted({v for k, v in _MAC_FLAGS.items() if s.get(k) == "1"})
        return CPUInfo(
            model=s.get("machdep.cpu.brand_string", "Apple"),
            arch=machine,
            cores_physical=int(s.get("hw.physicalcpu", 0) or 0),
            cores_logical=int(s.get("hw.logicalcpu", 0) or 0),
            flags=flags,
        )
    model, physical, logical, flags = parse_cpuinfo(reader.read("/proc/cpuinfo") or "")
    if not model:
        model = (reader.read("/proc/device-tree/model") or "").strip("\x00\n ") or machine
    return CPUInfo(model=model, arch=machine, cores_physical=physical, cores_logical=logical, flags=flags)


def _cgroup_number(text: str | None) -> int | None:
    if text is None:
        return None
    t = text.strip()
    if not t or t == "max" or not t.isdigit():
        return None
    v = int(t)
    return None if v >= 1 << 60 else v  # v1 "unlimited" is 9223372036854771712


def probe_cgroup(reader: Reader) -> tuple[int | None, int | None]:
    """(limit, usage) of this process's memory cgroup, v2 or v1; the tightest limit up the tree."""
    v2_path = v1_path = None
    for line in (reader.read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    candidates = []
    if v1_path is not None:
        candidates.append(
            ("/sys/fs/cgroup/memory", v1_path, "memory.limit_in_bytes", "memory.usage_in_bytes")
        )
    if v2_path is not None:
        candidates.append(("/sys/fs/cgroup", v2_path, "memory.max", "memory.current"))
    for base, rel, limit_file, usage_file in candidates:
        limit = usage = None
        for d in _ancestors(rel):
            lim = _cgroup_number(reader.read(f"{base}{d}/{limit_file}"))
            if lim is not None and (limit is None or lim < limit):
                limit = lim
            if usage is None:
                usage = _cgroup_number(reader.read(f"{base}{d}/{usage_file}"))
        if limit is not None or usage is not None:
            return limit, usage
    return None, None


def _ancestors(rel: str) -> list[str]:
    """'/a/b' -> ['/a/b', '/a', '']: a limit anywhere above this cgroup applies too."""
    parts = [p for p in rel.strip().split("/") if p]
    return ["/" + "/".join(parts[:i]) if i else "" for i in range(len(parts), -1, -1)]


# ------------------------------------------------------------------------------------------ GPUs

# memory bandwidth (GB/s) by name, for predicted tokens/s only; first match wins
_BANDWIDTH = [
    (r"H200", 4800),
    (r"H100.*(SXM|HBM3)", 3350),
    (r"H100", 2000),
    (r"A100.*80", 2039),
    (r"A100", 1555),
    (r"L40", 864),
    (r"A6000", 768),
    (r"RTX 6000 Ada", 960),
    (r"5090", 1792),
    (r"4090", 1008),
    (r"3090", 936),
    (r"4080", 717),
    (r"5080", 960),
    (r"4070 Ti SUPER", 672),
    (r"4070", 504),
    (r"4060 Ti", 288),
    (r"3080", 760),
    (r"3060", 360),
    (r"4060.*Laptop", 256),
    (r"4060", 272),
    (r"4050", 192),
    (r"3050", 192),
    (r"2080", 448),
    (r"AGX Orin", 204.8),
    (r"Orin NX", 102.4),
    (r"Orin Nano", 68),
    (r"Orin", 204.8),
    (r"7900 XTX", 960),
    (r"7900 XT", 800),
    (r"7800 XT", 624),
    (r"6900 XT", 512),
    (r"6800", 512),
    (r"MI300", 5300),
    (r"MI250", 3200),
    (r"MI210", 1600),
    (r"M\d Ultra", 800),
    (r"M\d Max", 400),
    (r"M4 Pro", 273),
    (r"M\d Pro", 200),
    (r"M4", 120),
    (r"M[123]", 100),
]


def bandwidth_for(name: str) -> float | None:
    for pattern, gbs in _BANDWIDTH:
        if re.search(pattern, name, re.I):
            return float(gbs)
    return None


def _nvml_gpus() -> list[dict[str, Any]] | None:
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
        driver = _s(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc = f"{major}.{minor}"
            except Exception:
                cc = ""
            try:
                bus = _s(pynvml.nvmlDeviceGetPciInfo(h).busId)
            except Exception:
                bus = ""
            out.append(
                {
                    "name": _s(pynvml.nvmlDeviceGetName(h)),
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


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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
        total = _mib(cols[2])
        free = _mib(cols[3])
        gpus.append(
            GPUInfo(
                vendor="nvidia",
                name=cols[1],
                total_bytes=total,
                free_bytes=free,
                unified=False,
                driver=cols[4],
                compute_capability=cols[5] if len(cols) > 5 else "",
                pci_bus_id=_norm_bus(cols[6]) if len(cols) > 6 else "",
                source="nvidia-smi",
            )
        )
    return gpus


def _mib(s: str) -> int:
    try:
        return int(float(s) * MiB)
    except ValueError:  # "[N/A]" on Jetson
        return 0


def _norm_bus(bus: str) -> str:
    """'00000000:01:00.0' (NVML) and '0000:01:00.0' (ggml) -> '0000:01:00.0'."""
    bus = bus.strip().lower()
    m = re.match(r"([0-9a-f]+):([0-9a-f]+):([0-9a-f]+)\.([0-9a-f]+)", bus)
    if not m:
        return bus
    return f"{int(m.group(1), 16):04x}:{m.group(2)[-2:]}:{m.group(3)[-2:]}.{m.group(4)}"


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
                pci_bus_id=_norm_bus(d.get("pci_bus_id", "")),
                source="nvml",
            )
            for d in nv
        ]
    return parse_nvidia_smi(reader.run(NVIDIA_SMI_QUERY) or "")


def probe_amd(reader: Reader) -> list[GPUInfo]:
    """AMD GPUs from sysfs (``mem_info_vram_total/used``), falling back to ``rocm-smi``."""
    gpus = []
    for card in reader.listdir("/sys/class/drm"):
        if not re.fullmatch(r"card\d+", card):
            continue
        dev = f"/sys/class/drm/{card}/device"
        if (reader.read(f"{dev}/vendor") or "").strip().lower() != "0x1002":
            continue
        total = _int(reader.read(f"{dev}/mem_info_vram_total"))
        used = _int(reader.read(f"{dev}/mem_info_vram_used"))
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
                pci_bus_id=_norm_bus(m.group(1)) if m else "",
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
        total = _int(d.get("VRAM Total Memory (B)"))
        used = _int(d.get("VRAM Total Used Memory (B)"))
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


def _int(v: Any) -> int | None:
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        return None


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


# ------------------------------------------------------------------------------- llama.cpp side

_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


class _Caps(ctypes.Structure):
    _fields_ = [
        ("async_", ctypes.c_bool),
        ("host_buffer", ctypes.c_bool),
        ("buffer_from_host_ptr", ctypes.c_bool),
        ("events", ctypes.c_bool),
        ("mmap_support", ctypes.c_bool),
    ]


class _Props(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("description", ctypes.c_char_p),
        ("memory_free", ctypes.c_size_t),
        ("memory_total", ctypes.c_size_t),
        ("type", ctypes.c_int),
        ("device_id", ctypes.c_char_p),
        ("caps", _Caps),
    ]


def llama_lib_dir() -> Path | None:
    """The folder holding libllama/libggml: ``LLAMA_CPP_LIB_PATH`` or ``llama_cpp/lib``."""
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _load(lib_dir: Path, stem: str) -> ctypes.CDLL:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        p = lib_dir / name
        if p.exists():
            return ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
    raise OSError(f"{stem} not found in {lib_dir}")


def ggml_devices_here() -> list[dict[str, Any]]:
    """The devices the installed llama.cpp sees, through ggml's C API (runs in this process)."""
    lib_dir = llama_lib_dir()
    if lib_dir is None:
        raise OSError("llama_cpp is not installed")
    base = _load(lib_dir, "ggml-base")
    ggml = _load(lib_dir, "ggml")
    vp = ctypes.c_void_p
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = vp
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn, res in (
        ("ggml_backend_dev_name", ctypes.c_char_p),
        ("ggml_backend_dev_description", ctypes.c_char_p),
        ("ggml_backend_dev_type", ctypes.c_int),
        ("ggml_backend_dev_backend_reg", vp),
    ):
        f = getattr(base, fn)
        f.restype, f.argtypes = res, [vp]
    base.ggml_backend_dev_memory.argtypes = [
        vp,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_get_props.argtypes = [vp, ctypes.POINTER(_Props)]
    base.ggml_backend_dev_get_props.restype = None
    base.ggml_backend_reg_name.argtypes = [vp]
    base.ggml_backend_reg_name.restype = ctypes.c_char_p
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all()  # builds with dynamic backends register them only here
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        props = _Props()
        base.ggml_backend_dev_get_props(dev, ctypes.byref(props))
        reg = base.ggml_backend_dev_backend_reg(dev)
        out.append(
            {
                "name": _s(base.ggml_backend_dev_name(dev) or b""),
                "description": _s(base.ggml_backend_dev_description(dev) or b""),
                "type": _DEV_TYPES.get(base.ggml_backend_dev_type(dev), "unknown"),
                "backend": _s(base.ggml_backend_reg_name(reg) or b"") if reg else "",
                "free_bytes": int(free.value),
                "total_bytes": int(total.value),
                "device_id": _s(props.device_id or b""),
            }
        )
    return out


def parse_ggml_devices(raw: list[dict[str, Any]] | None) -> list[GGMLDevice] | None:
    if raw is None:
        return None
    return [
        GGMLDevice(
            name=str(d["name"]),
            description=str(d.get("description", "")),
            type=str(d["type"]),
            backend=str(d.get("backend", "")),
            free_bytes=int(d["free_bytes"]),
            total_bytes=int(d["total_bytes"]),
            device_id=_norm_bus(str(d.get("device_id", ""))),
        )
        for d in raw
    ]


# ------------------------------------------------------------------------------------ reconcile


def reinstall_command(vendor: str, jetson: bool = False) -> str:
    flags = {
        "nvidia": "-DGGML_CUDA=on",
        "amd": "-DGGML_HIP=on",
        "apple": "-DGGML_METAL=on",
        "intel": "-DGGML_SYCL=on",
    }.get(vendor, "-DGGML_VULKAN=on")
    if jetson:
        flags += " -DCMAKE_CUDA_ARCHITECTURES=87"
    return (
        f'CMAKE_ARGS="{flags}" pip install --force-reinstall --no-cache-dir '
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    )


_VENDOR_BACKENDS = {
    "nvidia": ("CUDA",),
    "amd": ("ROCm", "HIP", "CUDA"),
    "apple": ("Metal", "MTL"),
    "intel": ("SYCL",),
}


def link_gpus(gpus: list[GPUInfo], devices: list[GGMLDevice] | None, jetson: bool) -> list[Finding]:
    """Pair each vendor GPU with the llama.cpp device driving it; findings for unpaired ones."""
    if devices is None:
        return [
            Finding(
                "warning",
                "llama.cpp (llama-cpp-python) could not be loaded, so what it can use is "
                "unknown; planning trusts the vendor tools",
                f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            )
        ]
    findings = []
    accel = [d for d in devices if d.type in ("gpu", "igpu")]
    used: set[str] = set()
    for g in gpus:
        dev = _match_device(g, accel, used)
        if dev is None and accel:
            # a Vulkan build drives any vendor's GPU
            dev = _match_device(g, [d for d in accel if d.backend.lower() == "vulkan"], used, strict=False)
        if dev is None:
            findings.append(
                Finding(
                    "error",
                    f"{g.name} is present but the installed llama.cpp has no backend for it "
                    f"(it sees: {', '.join(d.name for d in devices) or 'nothing'}); "
                    "the model would run on the CPU only",
                    reinstall_command(g.vendor, jetson),
                )
            )
            continue
        used.add(dev.name)
        g.ggml_device = dev.name
        if dev.total_bytes and not g.unified:
            g.free_bytes = dev.free_bytes  # what llama.cpp will actually get
    return findings


def _match_device(
    g: GPUInfo, devs: list[GGMLDevice], used: set[str], strict: bool = True
) -> GGMLDevice | None:
    free = [d for d in devs if d.name not in used]
    if g.pci_bus_id:
        for d in free:
            if d.device_id and d.device_id == g.pci_bus_id:
                return d
    backends = [b.lower() for b in _VENDOR_BACKENDS.get(g.vendor, ())]
    for d in free:
        if not strict or d.backend.lower() in backends or any(d.name.lower().startswith(b) for b in backends):
            return d
    return None


# ---------------------------------------------------------------------------------------- detect


def require_usable(hw: Hardware) -> None:
    """Refuse a box whose GPU the installed llama.cpp cannot drive (an error-level finding), with
    the fix: never a silent CPU fallback."""
    errors = [f for f in hw.findings if f.level == "error"]
    if errors:
        raise BackendError("; ".join(f"{f.message} (fix: {f.fix})" if f.fix else f.message for f in errors))


def default_store_dir() -> str:
    """The model store's folder (where ``detect`` reports free disk): the store decides."""
    from edge_magistral.store import default_root

    return str(default_root())


def detect(reader: Reader | None = None, store_dir: str | None = None) -> Hardware:
    """Probe the box (or a recorded one) and reconcile what llama.cpp sees with the vendor tools."""
    reader = reader or SystemReader()
    store_dir = store_dir or default_store_dir()
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


# ----------------------------------------------------------------------------------------- JSON


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


if __name__ == "__main__" and sys.argv[1:] == ["--ggml-devices"]:
    print(json.dumps(ggml_devices_here()))
