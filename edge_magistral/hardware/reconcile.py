"""What llama.cpp sees against what the vendor tools see: each GPU paired with the ggml device
driving it, and a finding with the fix for a GPU the installed build cannot use."""

from __future__ import annotations

from edge_magistral.errors import BackendError
from edge_magistral.hardware.model import Finding, GGMLDevice, GPUInfo, Hardware

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


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


def require_usable(hw: Hardware) -> None:
    """Refuse a box whose GPU the installed llama.cpp cannot drive (an error-level finding), with
    the fix: never a silent CPU fallback."""
    errors = [f for f in hw.findings if f.level == "error"]
    if errors:
        raise BackendError("; ".join(f"{f.message} (fix: {f.fix})" if f.fix else f.message for f in errors))
