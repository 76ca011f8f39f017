"""The unit file, hardened for a GPU inference server: a dynamic user, a read-only OS, no
capabilities, a closed device policy that lets through only the GPU nodes (NVIDIA, DRM/KFD,
Jetson's nvhost/nvmap) and the API key as a systemd credential."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_magistral.paths import CONFIG_DIR

DEFAULT_EXEC = "/opt/edge-magistral/venv/bin/edge-magistral"


# Groups are names in /proc/devices: major 195 is "nvidia-frontend" on old drivers, "nvidia" and
# "nvidiactl" on current ones; nvidia-uvm and nvidia-caps have dynamic majors.
NVIDIA_DEVICES = (
    "char-nvidia-frontend rw",
    "char-nvidia rw",
    "char-nvidiactl rw",
    "char-nvidia-uvm rw",
    "char-nvidia-caps r",  # MIG capability files
)
DRM_DEVICES = ("char-drm rw", "char-kfd rw")  # /dev/dri/* (Vulkan, Intel, AMD) and ROCm's /dev/kfd
JETSON_DEVICES = tuple(  # nvgpu's legacy and v2 nodes, nvmap (a misc device) and host1x syncpoints
    f"{node} rw"
    for node in (
        "/dev/nvmap",
        "/dev/nvhost-ctrl",
        "/dev/nvhost-ctrl-gpu",
        "/dev/nvhost-gpu",
        "/dev/nvhost-as-gpu",
        "/dev/nvhost-tsg-gpu",
        "/dev/nvhost-power-gpu",
        "/dev/nvhost-sched-gpu",
        "/dev/nvhost-nvsched-gpu",
        "/dev/nvgpu/igpu0/ctrl",
        "/dev/nvgpu/igpu0/channel",
        "/dev/nvgpu/igpu0/as",
        "/dev/nvgpu/igpu0/tsg",
        "/dev/nvgpu/igpu0/power",
        "/dev/host1x-fence",
    )
)
ALL_DEVICES = NVIDIA_DEVICES + DRM_DEVICES + JETSON_DEVICES


@dataclass(frozen=True)
class UnitConfig:
    """The knobs of the unit file; the defaults render ``systemd/edge-magistral.service``."""

    exec_path: str = DEFAULT_EXEC
    config_path: str = str(CONFIG_DIR / "config.yaml")
    api_key_path: str | None = str(CONFIG_DIR / "api-key")  # None: serve without a key
    env_file: str = str(CONFIG_DIR / "env")
    watchdog_sec: int = 30
    start_timeout_sec: int = 900  # a 14-25 GB model from an SD card or a USB disk, then a warm-up
    stop_timeout_sec: int = 30
    restart_sec: int = 5
    start_limit_interval_sec: int = 1800  # longer than 5 slow loads, so a crash loop does hit the limit
    start_limit_burst: int = 5
    devices: tuple[str, ...] = ALL_DEVICES
    ip_allow: tuple[str, ...] = ("localhost",)  # empty: any address may connect


def render_unit(c: UnitConfig) -> str:
    """The unit file text for ``c``."""
    return "\n".join(_service_lines(c) + _sandbox_lines(c))


def _service_lines(c: UnitConfig) -> list[str]:
    """[Unit] and how the service runs: notify, the command, restarts and limits."""
    exec_start = [_exec_quote(c.exec_path), "serve", "--config", _exec_quote(c.config_path)]
    if c.api_key_path:
        exec_start += ["--api-key-file", "%d/api-key"]
    lines = [
        "# edge-magistral: Magistral Small 1.1 behind an OpenAI-compatible HTTP API.",
        "# Written by `edge-magistral install-service`; local changes belong in a drop-in",
        "# (`systemctl edit edge-magistral`). GPU kernel modules must be loaded at boot:",
        "# NoNewPrivileges= stops the setuid nvidia-modprobe (see README, \"A headless box\").",
        "[Unit]",
        "Description=edge-magistral (Magistral Small 1.1, OpenAI-compatible API)",
        "Wants=network-online.target",
        "After=network-online.target nvidia-persistenced.service",
        f"StartLimitIntervalSec={c.start_limit_interval_sec}",
        f"StartLimitBurst={c.start_limit_burst}",
        "",
        "[Service]",
        "# READY=1 comes after the model is loaded and a first token generated; only the main",
        "# process (the HTTP front, not the engine worker) may notify.",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(exec_start)}",
        f"EnvironmentFile=-{_exec_quote(c.env_file)}",
        "Environment=PYTHONUNBUFFERED=1 HOME=%S/edge-magistral XDG_CACHE_HOME=%C/edge-magistral"
        " CUDA_CACHE_PATH=%C/edge-magistral/cuda",
    ]
    if c.api_key_path:
        lines.append(f"LoadCredential=api-key:{_exec_quote(c.api_key_path)}")
    lines += [
        "# WATCHDOG=1 is sent only while the engine makes progress or is idle: a hung GPU call",
        "# stops it, and systemd kills (SIGABRT; Python's faulthandler prints the stacks) and restarts.",
        f"WatchdogSec={c.watchdog_sec}",
        "Restart=on-failure",
        f"RestartSec={c.restart_sec}",
        f"TimeoutStartSec={c.start_timeout_sec}",
        f"TimeoutStopSec={c.stop_timeout_sec}",
        "OOMPolicy=stop",
        "LimitCORE=0",
        "",
    ]
    return lines


def _sandbox_lines(c: UnitConfig) -> list[str]:
    """Identity, files, devices, privileges, kernel and network: the hardening."""
    return [
        "# Identity and files: a transient user; state, cache and logs are the only writable places.",
        "DynamicUser=yes",
        "SupplementaryGroups=video render",
        "StateDirectory=edge-magistral",
        "CacheDirectory=edge-magistral",
        "LogsDirectory=edge-magistral",
        "ConfigurationDirectory=edge-magistral",
        "UMask=0077",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "",
        "# Devices: the GPU needs real device nodes, so PrivateDevices=no with a closed policy",
        "# that admits only GPU nodes. A group this box lacks matches nothing; install-service",
        "# keeps only the node paths this box has.",
        "PrivateDevices=no",
        "DevicePolicy=closed",
        *(f"DeviceAllow={d}" for d in c.devices),
        "",
        "# Privileges, kernel and network.",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        *_ip_lines(c.ip_allow),
        "LockPersonality=yes",
        "# Seen working with CUDA (PTX JIT included) and ctypes callbacks.",
        "MemoryDenyWriteExecute=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "# @resources stays allowed: ggml sets thread affinity/priority and NUMA memory policy.",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]


def _ip_lines(allow: tuple[str, ...]) -> list[str]:
    if not allow:
        return []
    return [f"IPAddressAllow={' '.join(allow)}", "IPAddressDeny=any"]


def _exec_quote(arg: str) -> str:
    """One argument for a unit file: escape specifiers (%) and variables ($); quote if spaced."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(ch.isspace() or ch in "\"'\\" for ch in arg):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def resolve_devices(rules: tuple[str, ...], proc_devices: str,
                    stat_fn: Callable[[str], os.stat_result] = os.stat) -> tuple[str, ...]:
    """This box's device rules: a node path becomes its driver's group, absent nodes are dropped.

    Device majors are dynamic and change between boots; group names do not. A group also covers
    sibling nodes (nvgpu's legacy and v2 names share one). Misc devices (major 10: /dev/nvmap)
    keep their path, since the misc group would admit /dev/kvm, /dev/fuse and the like.
    """
    names = _char_groups(proc_devices)
    out: list[str] = []
    for rule in rules:
        target, _, access = rule.partition(" ")
        if not target.startswith("/dev/"):
            out.append(rule)
            continue
        try:
            st = stat_fn(target)
        except OSError:
            continue
        if not stat.S_ISCHR(st.st_mode):
            continue
        name = names.get(os.major(st.st_rdev))
        out.append(rule if name in (None, "misc") else f"char-{name} {access}".rstrip())
    return tuple(dict.fromkeys(out))


def _char_groups(proc_devices: str) -> dict[int, str]:
    """{major: first name} of the "Character devices:" section of /proc/devices."""
    groups: dict[int, str] = {}
    in_char = False
    for line in proc_devices.splitlines():
        if line.strip().endswith("devices:"):
            in_char = line.startswith("Character")
            continue
        parts = line.split(None, 1)
        if in_char and len(parts) == 2 and parts[0].isdigit():
            groups.setdefault(int(parts[0]), parts[1].strip())
    return groups


def this_box_devices() -> tuple[str, ...]:
    """:data:`ALL_DEVICES` resolved against this box's /dev and /proc/devices."""
    try:
        proc = Path("/proc/devices").read_text()
    except OSError:
        return ALL_DEVICES
    return resolve_devices(ALL_DEVICES, proc)
