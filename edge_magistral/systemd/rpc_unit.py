"""The ``edge-magistral-rpc-worker`` unit: the main service's hardening, its own directories, and
a firewall of its own (``IPAddressAllow=`` only the heads), since llama.cpp's RPC has no
authentication. Installed as the main unit is: written atomically, systemd reloaded only when its
own directory changed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_magistral.paths import CONFIG_DIR, UNIT_DIR
from edge_magistral.systemd import install as sd_install
from edge_magistral.systemd.unit import ALL_DEVICES, DEFAULT_EXEC, UnitConfig, _exec_quote, _sandbox_lines

RPC_UNIT_NAME = "edge-magistral-rpc-worker.service"
RPC_DIR_NAME = "edge-magistral-rpc-worker"  # its StateDirectory= and CacheDirectory=


@dataclass(frozen=True)
class RpcUnitConfig:
    """The knobs of the worker's unit file."""

    bind: str
    allow: tuple[str, ...] = ()
    exec_path: str = DEFAULT_EXEC
    use_cpu: bool = False
    threads: int | None = None  # None: the command's default
    env_file: str = str(CONFIG_DIR / "env")
    devices: tuple[str, ...] = ALL_DEVICES
    restart_sec: int = 5
    stop_timeout_sec: int = 30


def exec_start(c: RpcUnitConfig) -> str:
    args = [_exec_quote(c.exec_path), "rpc-worker", "--bind", _exec_quote(c.bind)]
    for a in c.allow:
        args += ["--allow", _exec_quote(a)]
    if c.use_cpu:
        args.append("--cpu")
    if c.threads is not None:
        args += ["--threads", str(c.threads)]
    # %S is /var/lib; under DynamicUser= systemd links it to the private state directory.
    args += ["--cache-dir", f"%S/{RPC_DIR_NAME}/rpc-cache"]
    return " ".join(args)


def render_rpc_unit(c: RpcUnitConfig) -> str:
    """The unit file text for ``c``."""
    return "\n".join(_service_lines(c) + _retarget(_sandbox_lines(_as_main_unit(c))))


def _as_main_unit(c: RpcUnitConfig) -> UnitConfig:
    """The main unit's config whose sandbox this unit shares: the same devices, and the network
    closed to all but loopback and the heads."""
    return UnitConfig(exec_path=c.exec_path, env_file=c.env_file, devices=c.devices,
                      ip_allow=("localhost", *c.allow))


def _retarget(lines: list[str]) -> list[str]:
    """The main unit's sandbox with this unit's own state and cache directories (sharing the main
    service's would let two dynamic users fight over their ownership); it has no logs or config."""
    own = {"StateDirectory": RPC_DIR_NAME, "CacheDirectory": RPC_DIR_NAME}
    out = []
    for line in lines:
        key = line.partition("=")[0]
        if key in own:
            out.append(f"{key}={own[key]}")
        elif key not in ("LogsDirectory", "ConfigurationDirectory"):
            out.append(line)
    return out


def _service_lines(c: RpcUnitConfig) -> list[str]:
    return [
        "# edge-magistral rpc-worker: this box's GPUs (or CPU) as layers of a head's model, through",
        "# llama.cpp's RPC. Written by `edge-magistral install-rpc-worker`; local changes belong in a",
        "# drop-in (`systemctl edit edge-magistral-rpc-worker`). llama.cpp's RPC has no authentication:",
        "# IPAddressAllow= admits only loopback and the heads given with --allow.",
        "[Unit]",
        "Description=edge-magistral rpc-worker (llama.cpp RPC server for a head)",
        "Wants=network-online.target",
        "After=network-online.target nvidia-persistenced.service",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={exec_start(c)}",
        f"EnvironmentFile=-{_exec_quote(c.env_file)}",
        f"Environment=PYTHONUNBUFFERED=1 HOME=%S/{RPC_DIR_NAME} XDG_CACHE_HOME=%C/{RPC_DIR_NAME}"
        f" CUDA_CACHE_PATH=%C/{RPC_DIR_NAME}/cuda",
        "# The command restarts llama.cpp's server itself; systemd restarts the command.",
        "Restart=on-failure",
        f"RestartSec={c.restart_sec}",
        f"TimeoutStopSec={c.stop_timeout_sec}",
        "OOMPolicy=stop",
        "LimitCORE=0",
        "",
    ]


def install_rpc_unit(c: RpcUnitConfig, unit_dir: str | os.PathLike[str] = UNIT_DIR, *,
                     run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> sd_install.InstallResult:
    """Write the unit atomically (left alone when unchanged) and reload systemd when needed."""
    unit_path = Path(unit_dir) / RPC_UNIT_NAME
    sd_install._require_root_for([unit_path])
    sd_install._check_outside_sandbox_hidden("the edge-magistral executable", c.exec_path)
    interpreter = sd_install._interpreter(c.exec_path)
    if interpreter:
        sd_install._check_outside_sandbox_hidden(f"the Python of {c.exec_path}", interpreter)
    data = render_rpc_unit(c).encode()
    result = sd_install.InstallResult(unit_path, Path(c.env_file), None)
    if sd_install._current(unit_path) == data:
        result.unchanged = [unit_path]
    else:
        sd_install._write_all([(unit_path, data, 0o644)])
        result.written = [unit_path]
        result.daemon_reload = sd_install.daemon_reload(unit_path.parent, run)
    result.notes = sd_install.gpu_boot_notes() if not c.use_cpu else []
    return result
