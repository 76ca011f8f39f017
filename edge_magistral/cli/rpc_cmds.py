"""``rpc-worker`` (serve this box's devices to a head through llama.cpp's RPC) and
``install-rpc-worker`` (its systemd unit)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from edge_magistral.cli.group import cli
from edge_magistral.cli.render import echo_installed
from edge_magistral.paths import UNIT_DIR
from edge_magistral.rpc.worker import DEFAULT_BIND, WorkerConfig, check_bind, default_cache_dir, default_threads

_ALLOW_HELP = ("A head's IP address or network (repeatable). Required for a non-loopback --bind: llama.cpp's "
               "RPC has no authentication, so only the heads may connect.")


@cli.command("rpc-worker")
@click.option("--bind", default=DEFAULT_BIND, show_default=True,
              help="HOST:PORT to listen on; another host than loopback needs --allow.")
@click.option("--allow", multiple=True, help=_ALLOW_HELP)
@click.option("--cpu", "use_cpu", is_flag=True, help="Serve the CPU even where GPUs exist.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for the CPU device (default: half the cores).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Where llama.cpp keeps the weights heads sent, so the next load skips sending them "
                   "(default: <store>/rpc-cache).")
@click.option("--no-cache", is_flag=True, help="Keep no cache: every load sends the weights again.")
def rpc_worker_cmd(bind, allow, use_cpu, threads, cache_dir, no_cache) -> None:
    """Serve this box's GPUs (or CPU) to a head's model through llama.cpp's RPC backend.

    A head places layers here with `--worker HOST:PORT` (run, chat, serve). The port also answers
    `GET /info` (this box's devices and memory, the state, the connected head). SIGTERM stops it."""
    from edge_magistral.errors import BadInputError
    from edge_magistral.rpc.worker import run_worker

    if cache_dir and no_cache:
        raise BadInputError("--cache-dir and --no-cache contradict each other: pass one")
    check_bind(bind, allow)
    rpc_log = logging.getLogger("edge_magistral.rpc")
    if rpc_log.getEffectiveLevel() > logging.INFO:  # a daemon: its log is what the admin reads
        rpc_log.setLevel(logging.INFO)
    run_worker(WorkerConfig(bind=bind, allow=tuple(allow), use_cpu=use_cpu, threads=threads or default_threads(),
                            cache_dir=None if no_cache else cache_dir or default_cache_dir()))


@cli.command("install-rpc-worker")
@click.option("--bind", required=True, help="HOST:PORT the worker listens on (this box's address on the head's link).")
@click.option("--allow", multiple=True, help=_ALLOW_HELP)
@click.option("--cpu", "use_cpu", is_flag=True, help="Serve the CPU even where GPUs exist.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: half the cores).")
@click.option("--exec", "exec_path", default=None, type=click.Path(dir_okay=False),
              help="The edge-magistral executable for ExecStart= (default: this installation's).")
@click.option("--unit-dir", type=click.Path(file_okay=False), default=str(UNIT_DIR), show_default=True,
              help="Where to write edge-magistral-rpc-worker.service.")
@click.option("--devices", type=click.Choice(["auto", "all"]), default="auto", show_default=True,
              help="auto: the GPU device rules this box needs; all: every known GPU's.")
@click.option("--dry-run", is_flag=True, help="Print the unit; write nothing.")
def install_rpc_worker_cmd(bind, allow, use_cpu, threads, exec_path, unit_dir, devices, dry_run) -> None:
    """Install `rpc-worker` as a hardened systemd service that only the heads can reach."""
    from edge_magistral.cli.service_cmds import _this_executable
    from edge_magistral.systemd.rpc_unit import RPC_UNIT_NAME, RpcUnitConfig, install_rpc_unit, render_rpc_unit
    from edge_magistral.systemd.unit import ALL_DEVICES, this_box_devices

    ep = check_bind(bind, allow)
    unit = RpcUnitConfig(bind=str(ep), allow=tuple(allow), exec_path=exec_path or _this_executable(),
                         use_cpu=use_cpu, threads=threads,
                         devices=this_box_devices() if devices == "auto" else ALL_DEVICES)
    if dry_run:
        click.echo(f"# {Path(unit_dir) / RPC_UNIT_NAME}\n{render_rpc_unit(unit)}", nl=False)
        return
    r = install_rpc_unit(unit, unit_dir)
    echo_installed(r)
    steps = []
    if r.unit_path.parent.resolve() != UNIT_DIR:
        steps.append(f"sudo systemctl link {r.unit_path}   # or copy it to {UNIT_DIR}")
    steps += ["sudo systemctl enable --now edge-magistral-rpc-worker",
              "journalctl -u edge-magistral-rpc-worker -f",
              f"on the head: edge-magistral run --worker {ep} ..."]
    click.echo("next:\n" + "\n".join(f"  {s}" for s in steps))
