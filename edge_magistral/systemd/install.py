"""``install-service``: the unit, the config file and (if missing) an API key written all or
nothing, and systemd told (``daemon-reload``) only when its own directory changed."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_magistral.errors import BadInputError, StorageError
from edge_magistral.hosts import is_loopback
from edge_magistral.paths import STATE_DIRS, UNIT_DIR
from edge_magistral.systemd.config import ServiceConfig
from edge_magistral.systemd.unit import UnitConfig, render_unit

UNIT_NAME = "edge-magistral.service"
SANDBOX_HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")  # ProtectHome= and PrivateTmp=
SYSTEM_PREFIXES = ("/etc", "/usr", "/lib", "/run", "/var", "/opt", "/srv")


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
    unit_dir: str | os.PathLike[str] = UNIT_DIR,
    *,
    extra: tuple[tuple[Path, bytes], ...] = (),
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> InstallResult:
    """Write the unit, the config and (if missing) an API key, all or nothing; reload systemd.

    ``service`` None keeps the existing config file (re-rendering only the unit). Files whose
    content is already right are left alone, an existing API key is never replaced, and
    ``systemctl daemon-reload`` runs only when the unit changed in systemd's own directory.
    ``extra``: more files the config names (the cluster file), written with the others.
    """
    unit_path = Path(unit_dir) / UNIT_NAME
    config_path = Path(unit.config_path)
    key_path = Path(unit.api_key_path) if unit.api_key_path else None
    _require_root_for([unit_path, config_path, *([key_path] if key_path else []), *(p for p, _ in extra)])
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
    files += [(p, data, 0o644) for p, data in extra]
    files.append((unit_path, render_unit(unit).encode(), 0o644))

    result = InstallResult(unit_path, config_path, key_path)
    changed = [f for f in files if _current(f[0]) != f[1]]
    result.unchanged = [p for p, _, _ in files if p not in {c[0] for c in changed}]
    if key_path is not None and key_path not in {f[0] for f in files}:
        result.unchanged.insert(0, key_path)
    _write_all(changed)
    result.written = [p for p, _, _ in changed]
    if unit_path in result.written:
        result.daemon_reload = daemon_reload(unit_path.parent, run)
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
            staged.append((stage_file(path, data, mode), path))
    except OSError as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {e.filename or 'the service files'}: {e.strerror or e}") from None
    for tmp, path in staged:
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def stage_file(path: Path, data: bytes, mode: int) -> Path:
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


def daemon_reload(unit_dir: Path, run: Callable[..., subprocess.CompletedProcess]) -> str:
    if unit_dir.resolve() != UNIT_DIR:
        return f"skipped: {unit_dir} is not {UNIT_DIR}"
    systemctl = shutil.which("systemctl")
    if systemctl is None or not systemd_running():
        return "skipped: systemd is not running here"
    proc = run([systemctl, "daemon-reload"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"failed: {(proc.stderr or proc.stdout).strip()}"
    return "ran"


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 (a container or a chroot may have systemctl without it)."""
    return Path("/run/systemd/system").is_dir()


def _notes(unit: UnitConfig, service: ServiceConfig | None) -> list[str]:
    notes = [*gpu_boot_notes()]
    if service is not None:
        notes += readable_notes(service.model)
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


def readable_notes(model: str) -> list[str]:
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
