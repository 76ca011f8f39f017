"""``edge-magistral install-service``: plan the model for this box, write the unit and its config."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import click

from edge_magistral.cli.cluster_opts import cluster_of, cluster_options
from edge_magistral.cli.group import cli
from edge_magistral.cli.render import echo_installed
from edge_magistral.cli.speculate_opts import speculate_options, speculation
from edge_magistral.errors import BadInputError, ModelNotFoundError
from edge_magistral.paths import CONFIG_DIR, UNIT_DIR
from edge_magistral.rpc.endpoints import cluster_yaml, worker_ips
from edge_magistral.systemd import (
    ALL_DEVICES,
    UNIT_NAME,
    InstallResult,
    ServiceConfig,
    UnitConfig,
    install_service,
    is_loopback,
    read_service_config,
    readable_notes,
    render_unit,
    this_box_devices,
)
from edge_magistral.systemd import install as sd_install


@cli.command("install-service")
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="GGUF to serve; planned for this box (without it, the existing config is kept).")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1, or the existing config's).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default 8080).")
@click.option("--ctx", type=click.IntRange(min=256), default=None, help="Require this context.")
@click.option("--n-gpu-layers", type=click.IntRange(min=0), default=None, help="Require these GPU layers.")
@click.option("--profile", default=None, help="Plan with this hardware profile.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="Require this many requests decoded at once (default: the profile's, lowered to what fits).")
@click.option("--hardware", "hardware_file", type=click.Path(dir_okay=False), default=None,
              help="Plan for the box described by this `detect --json` file instead of this one.")
@click.option("--think-budget", type=click.IntRange(min=0), default=None,
              help="Default thinking budget (default: the profile's).")
@click.option("--audit-log", default=None,
              help="Audit log path, or `none` (default /var/log/edge-magistral/audit.jsonl).")
@click.option("--stall-timeout", type=click.FloatRange(min=1), default=None,
              help="Seconds a request may make no progress before the worker is restarted (default 120).")
@click.option("--exec", "exec_path", default=None, type=click.Path(dir_okay=False),
              help="The edge-magistral executable for ExecStart= (default: this installation's).")
@click.option("--unit-dir", type=click.Path(file_okay=False), default=str(UNIT_DIR),
              show_default=True, help="Where to write edge-magistral.service.")
@click.option("--config-dir", type=click.Path(file_okay=False), default=str(CONFIG_DIR),
              show_default=True, help="Where to write config.yaml and the API key.")
@click.option("--watchdog-sec", type=click.IntRange(min=5), default=UnitConfig.watchdog_sec,
              show_default=True,
              help="WatchdogSec= of the unit: systemd restarts the service when its liveness pings stop this long.")
@click.option("--allow-from", multiple=True,
              help="IPAddressAllow= entry (repeatable; default localhost when bound to loopback, else any).")
@click.option("--no-api-key", is_flag=True, help="Serve without an API key (loopback only).")
@click.option("--devices", type=click.Choice(["auto", "all"]), default="auto", show_default=True,
              help="auto: the GPU device rules this box needs; all: every known GPU's.")
@click.option("--print", "print_only", is_flag=True, help="Print the unit and the config; write nothing.")
@speculate_options
@cluster_options
def install_service_cmd(model, host, port, ctx, n_gpu_layers, profile, parallel, hardware_file, think_budget, audit_log,
                        stall_timeout, exec_path, unit_dir, config_dir, watchdog_sec, allow_from, no_api_key,
                        devices, print_only, speculate, draft_model, workers, cluster_file,
                        allow_public_worker) -> None:
    """Install edge-magistral as a systemd service (hardened unit, API key credential, config).

    With RPC workers (--worker, --cluster) the cluster file goes beside the config and the unit's
    IPAddressAllow= admits the workers' addresses too. Rerunning it is safe: unchanged files are
    left alone and an existing API key is kept."""
    config_path = Path(config_dir) / "config.yaml"
    cluster = cluster_of(workers, cluster_file, allow_public_worker)
    cluster_path = Path(config_dir) / "cluster.yaml"
    overrides = {"host": host, "port": port, "think_budget": think_budget, "stall_timeout_s": stall_timeout,
                 **_speculation_settings(speculate, draft_model),
                 **({"cluster": str(cluster_path)} if cluster else {})}
    if model is not None:
        planned = _planned(model, ctx, n_gpu_layers, profile, hardware_file, parallel,
                           overrides.get("speculate"), overrides.get("draft_model"), cluster)
        service = _apply(planned, overrides, audit_log)
        effective = service
    else:
        existing = _existing(config_path)
        effective = _apply(existing, overrides, audit_log)
        service = effective if effective != existing else None  # None: leave the file (and its edits) alone
    unit = UnitConfig(
        exec_path=exec_path or _this_executable(),
        config_path=str(config_path),
        api_key_path=None if no_api_key else str(Path(config_dir) / "api-key"),
        env_file=str(Path(config_dir) / "env"),
        watchdog_sec=watchdog_sec,
        devices=this_box_devices() if devices == "auto" else ALL_DEVICES,
        ip_allow=_ip_allow(allow_from, effective.host, cluster),
    )
    extra = ((cluster_path, cluster_yaml(cluster).encode()),) if cluster else ()
    if print_only:
        click.echo(f"# {Path(unit_dir) / UNIT_NAME}\n{render_unit(unit)}\n"
                   f"# {config_path}\n{effective.to_yaml()}"
                   + "".join(f"# {p}\n{data.decode()}" for p, data in extra), nl=False)
        return
    result = install_service(unit, service, unit_dir, extra=extra)
    if service is not None and service.draft_model:
        result.notes += readable_notes(service.draft_model)
    _report(result, effective, unit)


def _ip_allow(allow_from: tuple[str, ...], host: str, cluster) -> tuple[str, ...]:
    """IPAddressAllow=: as asked, else localhost for a loopback bind (else no rule); a rule that
    restricts also admits the RPC workers' addresses, or the head could not reach them."""
    allow = tuple(allow_from) or (("localhost",) if is_loopback(host) else ())
    if allow and cluster is not None:
        allow += tuple(ip for ip in worker_ips(cluster) if ip not in allow)
    return allow


def _speculation_settings(speculate: str | None, draft_model: str | None) -> dict:
    """The config's ``speculate`` and ``draft_model`` when either option is given (the pair replaces
    the existing config's: ``--speculate off`` drops its draft), else nothing."""
    if speculate is None and draft_model is None:
        return {}
    speculate, draft_model = speculation(speculate, draft_model)
    return {"speculate": speculate, "draft_model": _draft_path(draft_model) if draft_model else None}


def _draft_path(spec: str) -> str:
    """The draft GGUF as the service will open it: absolute (a symlink stays the thing named, as for
    the model), present, and outside what the unit's sandbox hides (ProtectHome=, PrivateTmp=)."""
    from edge_magistral.loader import resolve_draft

    path = os.path.abspath(resolve_draft(spec))
    if not Path(path).is_file():
        raise ModelNotFoundError(f"{spec}: no such draft model file")
    for p in (path, os.path.realpath(path)):
        if any(p == h or p.startswith(h + "/") for h in sd_install.SANDBOX_HIDDEN):
            raise BadInputError(
                f"the draft model is at {p}, which the service cannot see (ProtectHome=, PrivateTmp=): "
                "move it under /opt, /srv or /var/lib (see README, \"A headless box\")"
            )
    return path


def _apply(s: ServiceConfig, overrides: dict, audit_log: str | None) -> ServiceConfig:
    """The options given on the command line win; ``--audit-log none`` turns the audit log off.
    The speculation pair is set together (``draft_model`` None included)."""
    pair = ("speculate", "draft_model")
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None or k in pair})
    if audit_log is not None:
        s = dataclasses.replace(s, audit_log=None if audit_log == "none" else audit_log)
    return s


def _planned(model, ctx, n_gpu_layers, profile, hardware_file, parallel=None, speculate=None,
             draft_model=None, cluster=None) -> ServiceConfig:
    """The service config of ``loader.plan_model``'s plan for the model (planned for this box, or
    the one ``hardware_file`` records), the draft model's memory included."""
    from edge_magistral.loader import ModelRequest, plan_model

    path = os.path.abspath(model)  # not resolved: a `current.gguf` symlink stays the thing served
    if not Path(path).is_file():
        raise ModelNotFoundError(f"{model}: no such model file")
    plan, _ = plan_model(ModelRequest(model=path, ctx=ctx, n_gpu_layers=n_gpu_layers, parallel=parallel,
                                      profile=profile, hardware_file=hardware_file, speculate=speculate,
                                      draft_model=draft_model, cluster=cluster))
    return ServiceConfig.from_plan(plan)


def _existing(config_path: Path) -> ServiceConfig:
    if not config_path.is_file():
        raise BadInputError(f"{config_path} does not exist yet: pass --model FILE.gguf")
    return read_service_config(config_path)


def _this_executable() -> str:
    """The console script of this installation (the venv's, when run from one)."""
    beside = Path(sys.executable).parent / "edge-magistral"
    found = str(beside) if beside.is_file() else shutil.which("edge-magistral")
    if not found:
        raise BadInputError("cannot find the edge-magistral executable: pass --exec PATH")
    return os.path.abspath(found)


def _report(r: InstallResult, s: ServiceConfig, unit: UnitConfig) -> None:
    echo_installed(r)
    url_host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    steps = []
    if r.unit_path.parent.resolve() != UNIT_DIR:
        steps.append(f"sudo systemctl link {r.unit_path}        # or copy it to {UNIT_DIR}")
    steps += [
        "sudo systemctl enable --now edge-magistral   # start now and at boot (loading takes minutes)",
        "systemctl status edge-magistral              # the Status: line says loading / ready",
        "journalctl -u edge-magistral -f              # the log",
        f"curl -s http://{url_host}:{s.port}/health",
    ]
    if unit.api_key_path:
        steps.append(f"clients send: Authorization: Bearer $(sudo cat {unit.api_key_path})")
    click.echo("next:\n" + "\n".join(f"  {line}" for line in steps))
