"""systemd integration: sd_notify (:mod:`.notify`), the service's config file (:mod:`.config`),
the hardened unit file (:mod:`.unit`) and ``install-service`` (:mod:`.install`).

The unit is hardened for a GPU inference server: a dynamic user, a read-only OS, no capabilities,
a closed device policy that lets through only the GPU nodes (NVIDIA, DRM/KFD, Jetson's
nvhost/nvmap) and the API key as a systemd credential. :func:`install_service` writes it and the
service's config file atomically.
"""

from edge_magistral.hosts import is_loopback
from edge_magistral.systemd.config import ServiceConfig, read_service_config
from edge_magistral.systemd.install import (
    SANDBOX_HIDDEN,
    UNIT_NAME,
    InstallResult,
    gpu_boot_notes,
    install_service,
    readable_notes,
)
from edge_magistral.systemd.notify import Notifier
from edge_magistral.systemd.unit import (
    ALL_DEVICES,
    DEFAULT_EXEC,
    DRM_DEVICES,
    JETSON_DEVICES,
    NVIDIA_DEVICES,
    UnitConfig,
    render_unit,
    resolve_devices,
    this_box_devices,
)

__all__ = [
    "ALL_DEVICES", "DEFAULT_EXEC", "DRM_DEVICES", "JETSON_DEVICES", "NVIDIA_DEVICES", "SANDBOX_HIDDEN", "UNIT_NAME",
    "InstallResult", "Notifier", "ServiceConfig", "UnitConfig", "gpu_boot_notes", "install_service", "is_loopback",
    "read_service_config", "readable_notes", "render_unit", "resolve_devices", "this_box_devices",
]
