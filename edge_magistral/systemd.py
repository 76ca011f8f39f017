"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING) and unit installation.

Notification is one datagram per message to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace), so it needs no libsystemd. Everything here is a no-op when the process is not
run by systemd, and a send never raises into the server: a notification is best-effort, and the
server must keep answering requests if systemd's socket goes away.

The watchdog is what turns a hung GPU call into a restart. :class:`WatchdogPinger` sends
``WATCHDOG=1`` only while a health callback says yes; :class:`Heartbeat` is that callback for a
generation loop (healthy when idle, or when the last token is recent). When a llama.cpp call never
returns, the heartbeat goes stale, the pings stop, and after ``WatchdogSec=`` systemd kills and
restarts the unit.

The unit (:func:`render_unit`) is hardened for a GPU inference server: a dynamic user, a read-only
OS, no capabilities, a closed device policy that lets through only the GPU nodes (NVIDIA, DRM/KFD,
Jetson's nvhost/nvmap) and the API key as a systemd credential. :func:`install_service` writes it
and the service's config file atomically.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from edge_magistral.errors import BadInputError, StorageError

if TYPE_CHECKING:
    from edge_magistral.planner import Plan

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 2.0  # a wedged systemd must not wedge the server

# ====================================================================================== sd_notify


@dataclass
class Notifier:
    """Sends sd_notify messages; inert when ``address`` is None (not started by systemd).

    Every method returns True when the datagram was sent. Failures are logged once (then at
    debug level) and never raised.
    """

    address: str | None = None  # $NOTIFY_SOCKET as given: "/run/systemd/notify" or "@name"
    watchdog_usec: int | None = None  # $WATCHDOG_USEC, when the watchdog is meant for this process
    _warned: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, unset_environment: bool = False) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID.

        ``unset_environment`` removes them from ``os.environ`` so that child processes (the
        engine worker) do not think the notifications are theirs.
        """
        env = os.environ if environ is None else environ
        address = _valid_address(env.get("NOTIFY_SOCKET", ""))
        usec = _watchdog_usec(env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", ""))
        if unset_environment:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of ``WatchdogSec=`` (systemd's advice); None without a watchdog."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """The model is loaded and warmed up: systemd marks the unit started."""
        return self.notify("READY=1", *_status_field(status))

    def status(self, text: str) -> bool:
        """A one-line state shown by ``systemctl status``."""
        return self.notify(*_status_field(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (draining requests)."""
        return self.notify("STOPPING=1", *_status_field(status))

    def reloading(self) -> bool:
        """A reload has begun; send :meth:`ready` when it is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start-up (or stop) time: a slow disk can make a model load outlast the timeout."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram (newline-separated ``KEY=value`` lines)."""
        if self.address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(SEND_TIMEOUT_S)
                s.sendto("\n".join(fields).encode("utf-8", "replace"), _sockaddr(self.address))
            return True
        except OSError as e:
            self._failed(e)
            return False

    def _failed(self, e: OSError) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        log.log(level, "sd_notify to %s failed: %s (further failures logged at debug level)", self.address, e)
        self._warned = True


def _valid_address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("/") or (raw.startswith("@") and len(raw) > 1):
        return raw
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an @abstract name", raw)
    return None


def _watchdog_usec(usec: str, pid: str) -> int | None:
    """The watchdog timeout, if it is meant for this process (systemd sets WATCHDOG_PID to the main PID)."""
    if not usec:
        return None
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value if value > 0 else None


def _sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


def _status_field(text: str | None) -> tuple[str, ...]:
    """``STATUS=`` with newlines flattened: a newline would start a new (forged) field."""
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)


# ======================================================================================= watchdog


class Heartbeat:
    """A loop's pulse, to be read from another thread: healthy when idle or recently beaten.

    For the generation loop: ``begin()`` when a request starts, ``beat()`` per token (and per
    prefill batch), ``end()`` when it finishes or the worker is replaced. For an event loop: call
    ``begin()`` once and ``beat()`` from a periodic callback, so a blocked loop goes stale too.
    """

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic):
        if stall_after_s <= 0:
            raise ValueError("stall_after_s must be positive")
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._busy = False
        self._last = clock()

    def begin(self) -> None:
        with self._lock:
            self._busy, self._last = True, self._clock()

    def beat(self) -> None:
        with self._lock:
            self._last = self._clock()

    def end(self) -> None:
        with self._lock:
            self._busy, self._last = False, self._clock()

    def stalled_s(self) -> float:
        """Seconds since the last progress while busy; 0 when idle."""
        with self._lock:
            return self._clock() - self._last if self._busy else 0.0

    def healthy(self) -> bool:
        return self.stalled_s() <= self.stall_after_s


class WatchdogPinger:
    """A daemon thread that sends ``WATCHDOG=1`` every interval while ``healthy()`` is true.

    Without a watchdog (no ``WatchdogSec=``, not under systemd) :meth:`start` starts nothing.
    A health callback that raises counts as unhealthy: when in doubt, let systemd restart.
    """

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool], interval_s: float | None = None):
        self.notifier = notifier
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s()
        self.sent = 0  # pings sent
        self.withheld = 0  # ticks on which the callback said unhealthy
        self._healthy = healthy
        self._was_healthy = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """Check health once and ping if healthy; returns whether a ping was sent."""
        ok = self._check()
        if ok != self._was_healthy:
            if ok:
                log.warning("engine healthy again: watchdog pings resumed")
            else:
                log.error("engine unhealthy: withholding WATCHDOG=1, systemd will restart the service")
            self._was_healthy = ok
        if not ok:
            self.withheld += 1
            return False
        sent = self.notifier.watchdog()
        self.sent += int(sent)
        return sent

    def start(self) -> WatchdogPinger:
        if self.interval_s is None or not self.notifier.enabled or self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> WatchdogPinger:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        assert self.interval_s is not None
        self.tick()
        while not self._stop.wait(self.interval_s):
            self.tick()

    def _check(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:
            log.exception("watchdog health callback failed; treating the engine as unhealthy")
            return False


# ================================================================================== service config

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_CONFIG_DIR = Path("/etc/edge-magistral")
UNIT_NAME = "edge-magistral.service"
DEFAULT_EXEC = "/opt/edge-magistral/venv/bin/edge-magistral"
STATE_DIRS = (Path("/var/lib/edge-magistral"), Path("/var/lib/private/edge-magistral"))  # DynamicUser's
SANDBOX_HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")  # ProtectHome= and PrivateTmp=
SYSTEM_PREFIXES = ("/etc", "/usr", "/lib", "/run", "/var", "/opt", "/srv")


@dataclass(frozen=True)
class ServiceConfig:
    """What ``edge-magistral serve --config FILE`` reads: the model and how to serve it.

    ``ctx``, ``n_gpu_layers``, ``profile`` and ``parallel`` pin the plan made at install time (None
    lets the planner choose at start); a pinned plan that stops fitting fails at start with the reason.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    ctx: int | None = None
    n_gpu_layers: int | None = None
    profile: str | None = None
    parallel: int | None = None  # decoding slots (serve --parallel)
    think_budget: int | None = None
    audit_log: str | None = "/var/log/edge-magistral/audit.jsonl"
    stall_timeout_s: float = 120.0  # busy without progress this long: restart the worker, withhold pings

    @classmethod
    def from_plan(cls, plan: Plan) -> ServiceConfig:
        """The plan's model path and load settings (other fields at their defaults)."""
        return cls(model=plan.model_path, ctx=plan.n_ctx, n_gpu_layers=plan.n_gpu_layers,
                   profile=plan.profile, parallel=plan.n_slots, think_budget=plan.think_budget)

    def to_yaml(self) -> str:
        """The config file, commented; values are JSON scalars (valid YAML) so paths need no quoting rules."""
        def v(x: object) -> str:
            return "null" if x is None else _json_scalar(x)

        return "\n".join([
            "# edge-magistral service settings, read by `edge-magistral serve --config FILE`.",
            "# Written by `edge-magistral install-service`; rerun it (or edit, then restart) to change.",
            f"model: {v(self.model)}",
            "# Bind address: 127.0.0.1 keeps the API on this box. Another address needs the API key",
            "# (the systemd credential `api-key`) and an IPAddressAllow= that admits the clients.",
            f"host: {v(self.host)}",
            f"port: {v(self.port)}",
            "# The plan made at install time (null: let the planner choose at each start).",
            f"ctx: {v(self.ctx)}",
            f"n_gpu_layers: {v(self.n_gpu_layers)}",
            f"profile: {v(self.profile)}",
            "# Requests decoded at once; each slot keeps its own KV cache of ctx cells (plus one shared).",
            f"parallel: {v(self.parallel)}",
            "# Default maximum thinking tokens per request (a request may ask for fewer).",
            f"think_budget: {v(self.think_budget)}",
            "# Append-only, hash-chained record of every request (null: none).",
            f"audit_log: {v(self.audit_log)}",
            "# Seconds without progress during a request before the engine worker is restarted (and",
            "# watchdog pings stop until it is back). Keep it above the slowest prefill batch.",
            f"stall_timeout_s: {v(self.stall_timeout_s)}",
            "",
        ])


def _json_scalar(x: object) -> str:
    return json.dumps(x, ensure_ascii=False)


def read_service_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Load and check a config file; a mistake names the key and the file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{p}: no such file; write it with `edge-magistral install-service`") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadInputError(f"{p}: cannot read the config ({e})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{p}: expected `key: value` lines, got {type(data).__name__}")
    known = [f.name for f in fields(ServiceConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BadInputError(f"{p}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(known)}")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise BadInputError(f"{p}: `model` must be the path of a GGUF file")
    for key, value in data.items():
        _check_value(p, key, value)
    return ServiceConfig(**data)


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "host": (str,), "port": (int,), "ctx": (int,), "n_gpu_layers": (int,),
    "profile": (str,), "parallel": (int,), "think_budget": (int,), "audit_log": (str,),
    "stall_timeout_s": (int, float),
}
_NULLABLE = {"ctx", "n_gpu_layers", "profile", "parallel", "think_budget", "audit_log"}
_RANGES = {"port": (1, 65535), "ctx": (256, None), "n_gpu_layers": (0, None), "parallel": (1, 64),
           "think_budget": (0, None), "stall_timeout_s": (1, None)}


def _check_value(p: Path, key: str, value: object) -> None:
    if value is None and key in _NULLABLE:
        return
    if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
        want = " or ".join(t.__name__ for t in _TYPES[key])
        raise BadInputError(f"{p}: `{key}` must be {want}, got {value!r}")
    lo, hi = _RANGES.get(key, (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):  # type: ignore[operator]
        raise BadInputError(f"{p}: `{key}` is {value}, outside {lo}..{hi if hi is not None else ''}")


# ============================================================================================ unit

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
    config_path: str = str(DEFAULT_CONFIG_DIR / "config.yaml")
    api_key_path: str | None = str(DEFAULT_CONFIG_DIR / "api-key")  # None: serve without a key
    env_file: str = str(DEFAULT_CONFIG_DIR / "env")
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
    return "\n".join(lines)


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


# ========================================================================================= install


@dataclass
class InstallResult:
    """What :func:`install_service` did, for the CLI to report."""

    unit_path: Path
    config_path: Path
    api_key_path: Path | None
    written: list[Path] = field(default_factory=list)  # files created or changed
    unchanged: list[Path] = field(default_factory=list)
    daemon_reload: str = "not needed"  # "ran", "not needed", or why it was skipped/failed
    notes: list[str] = field(default_factory=list)  # what the admin should fix before starting


def install_service(
    unit: UnitConfig,
    service: ServiceConfig | None,
    unit_dir: str | os.PathLike[str] = DEFAULT_UNIT_DIR,
    *,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> InstallResult:
    """Write the unit, the config and (if missing) an API key, all or nothing; reload systemd.

    ``service`` None keeps the existing config file (re-rendering only the unit). Files whose
    content is already right are left alone, an existing API key is never replaced, and
    ``systemctl daemon-reload`` runs only when the unit changed in systemd's own directory.
    """
    unit_path = Path(unit_dir) / UNIT_NAME
    config_path = Path(unit.config_path)
    key_path = Path(unit.api_key_path) if unit.api_key_path else None
    _require_root_for([unit_path, config_path, *([key_path] if key_path else [])])
    _check_outside_sandbox_hidden("the edge-magistral executable", unit.exec_path)
    interpreter = _interpreter(unit.exec_path)
    if interpreter:
        _check_outside_sandbox_hidden(f"the Python of {unit.exec_path}", interpreter)
    if service is None and not config_path.is_file():
        raise BadInputError(f"{config_path} does not exist yet: pass --model FILE.gguf")
    if service is not None:
        _check_outside_sandbox_hidden("the model", service.model)

    files: list[tuple[Path, bytes, int]] = []
    if key_path is not None and not key_path.exists():
        files.append((key_path, (secrets.token_urlsafe(32) + "\n").encode(), 0o600))
    if service is not None:
        files.append((config_path, service.to_yaml().encode(), 0o644))
    files.append((unit_path, render_unit(unit).encode(), 0o644))

    result = InstallResult(unit_path, config_path, key_path)
    changed = [f for f in files if _current(f[0]) != f[1]]
    result.unchanged = [p for p, _, _ in files if p not in {c[0] for c in changed}]
    if key_path is not None and key_path not in {f[0] for f in files}:
        result.unchanged.insert(0, key_path)
    _write_all(changed)
    result.written = [p for p, _, _ in changed]
    if unit_path in result.written:
        result.daemon_reload = _daemon_reload(unit_path.parent, run)
    result.notes = _notes(unit, service)
    return result


def _current(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except OSError:
        return None


def _write_all(files: list[tuple[Path, bytes, int]]) -> None:
    """Stage every file beside its target, then rename them all: a failure leaves nothing behind."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
    except OSError as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {e.filename or 'the service files'}: {e.strerror or e}") from None
    for tmp, path in staged:
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a hidden temporary file next to ``path`` (same filesystem, so rename is atomic)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require_root_for(paths: list[Path]) -> None:
    if os.geteuid() == 0:
        return
    system = [p for p in paths if str(p.resolve()).startswith(tuple(s + "/" for s in SYSTEM_PREFIXES))]
    if system:
        raise StorageError(
            f"writing {system[0]} needs root: rerun as `sudo edge-magistral install-service …` "
            "(or pass --unit-dir/--config-dir to write elsewhere)"
        )


def _check_outside_sandbox_hidden(what: str, path: str) -> None:
    """The unit hides /home, /root and /tmp from the service: refuse a file it could not open."""
    for p in (path, os.path.realpath(path)):
        if any(p == h or p.startswith(h + "/") for h in SANDBOX_HIDDEN):
            raise BadInputError(
                f"{what} is at {p}, which the service cannot see (ProtectHome=, PrivateTmp=): "
                "move it under /opt, /srv or /var/lib (see README, \"A headless box\")"
            )


def _interpreter(script: str) -> str | None:
    """The ``#!`` interpreter of a console script (a venv's python may link into a home directory)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    parts = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    return parts[0] if parts else None


def _daemon_reload(unit_dir: Path, run: Callable[..., subprocess.CompletedProcess]) -> str:
    if unit_dir.resolve() != DEFAULT_UNIT_DIR:
        return f"skipped: {unit_dir} is not {DEFAULT_UNIT_DIR}"
    systemctl = shutil.which("systemctl")
    if systemctl is None or not _systemd_running():
        return "skipped: systemd is not running here"
    proc = run([systemctl, "daemon-reload"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"failed: {(proc.stderr or proc.stdout).strip()}"
    return "ran"


def _systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 (a container or a chroot may have systemctl without it)."""
    return Path("/run/systemd/system").is_dir()


def _notes(unit: UnitConfig, service: ServiceConfig | None) -> list[str]:
    notes = [*gpu_boot_notes()]
    if service is not None:
        notes += _readable_notes(service.model)
        if not is_loopback(service.host) and not unit.api_key_path:
            notes.append(f"host {service.host} is not loopback and no API key is configured: "
                         "the server will refuse to start; drop --no-api-key")
    return notes


def gpu_boot_notes(dev: Path = Path("/dev"), modules_load_d: Path = Path("/etc/modules-load.d")) -> list[str]:
    """NoNewPrivileges= stops nvidia-modprobe, so nvidia_uvm must be loaded (and its node made) at boot."""
    if not (dev / "nvidiactl").exists():
        return []
    confs = sorted(modules_load_d.glob("*.conf"))
    listed = any("nvidia_uvm" in _read(f) or "nvidia-uvm" in _read(f) for f in confs)
    notes = []
    if not listed:
        notes.append(f"load nvidia_uvm at boot: echo nvidia_uvm | sudo tee {modules_load_d}/nvidia-uvm.conf")
    if not (dev / "nvidia-uvm").exists():
        notes.append("/dev/nvidia-uvm is missing: run `sudo nvidia-modprobe -u -c=0` now, and add the udev "
                     "rule from README (\"A headless box\") so that it exists after every boot")
    return notes


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def _readable_notes(model: str) -> list[str]:
    """The service runs as a dynamic user: a model outside its StateDirectory (which systemd hands
    to that user) must be world-readable, in world-searchable directories."""
    p = Path(model).resolve()
    if any(p.is_relative_to(d) for d in STATE_DIRS):
        return []
    try:
        if not p.stat().st_mode & stat.S_IROTH:
            return [f"{p} is not world-readable: sudo chmod o+r {p}"]
        for d in p.parents:
            if not d.stat().st_mode & stat.S_IXOTH:
                return [f"{d} is not world-searchable: sudo chmod o+x {d}"]
    except OSError as e:
        return [f"cannot check {p}: {e.strerror}"]
    return []
