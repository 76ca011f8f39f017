"""What this box has: CPU, RAM (and the container's limit), disk, and every GPU.

The primary source is what llama.cpp itself sees (the ggml backend devices of the installed
library): that is what will run the model. Vendor probes (NVML / ``nvidia-smi``, AMD sysfs /
``rocm-smi``, macOS ``sysctl``, Jetson release files) add detail and catch the classic mistake of a
GPU that is present while the installed llama.cpp build cannot use it.

Every probe reads through a :class:`Reader`, so tests feed recorded real outputs
(:class:`RecordedReader`) and ``--hardware FILE`` plans for a box described by another box's
``detect --json``.

Modules: :mod:`.model` (the data), :mod:`.readers` and :mod:`.system` (recorded and real boxes),
:mod:`.cpu` (CPU, RAM, cgroup), :mod:`.nvidia`, :mod:`.amd`, :mod:`.apple`, :mod:`.jetson`,
:mod:`.bandwidth`, :mod:`.ggml` (what llama.cpp sees), :mod:`.reconcile` (pairing the two, with
fixes), :mod:`.probe` (``detect``) and :mod:`.serialize` (``detect --json`` files).
"""

from edge_magistral.hardware.ggml import llama_lib_dir
from edge_magistral.hardware.model import SCHEMA_VERSION, CPUInfo, Finding, GGMLDevice, GPUInfo, Hardware
from edge_magistral.hardware.nvidia import parse_nvidia_smi
from edge_magistral.hardware.probe import detect
from edge_magistral.hardware.readers import Reader, RecordedReader
from edge_magistral.hardware.reconcile import require_usable
from edge_magistral.hardware.serialize import from_dict, load_hardware
from edge_magistral.hardware.system import SystemReader

__all__ = [
    "SCHEMA_VERSION", "CPUInfo", "Finding", "GGMLDevice", "GPUInfo", "GiB", "Hardware", "MiB", "Reader",
    "RecordedReader", "SystemReader", "detect", "from_dict", "llama_lib_dir", "load_hardware", "parse_nvidia_smi",
    "require_usable",
]
