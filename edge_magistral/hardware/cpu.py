"""The CPU and RAM: model, cores, ISA flags (Linux ``/proc``, macOS ``sysctl``), the memory
cgroup's limit."""

from __future__ import annotations

from edge_magistral.hardware.model import CPUInfo
from edge_magistral.hardware.parsing import parse_sysctl
from edge_magistral.hardware.readers import Reader

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
