"""Running the service: uvicorn with our own SIGTERM handling and systemd notifications.

SIGTERM (or Ctrl-C): ``STOPPING=1``, stop accepting connections, answer queued requests 503, let
the generation in flight finish within ``drain_timeout_s`` (then cancel it), stop the worker,
exit 0. A worker that cannot be loaded (a model that fails its manifest's sha256 included), or
that keeps failing, ends the service with a non-zero status so that systemd's restart policy and
start limit take over. Connections go through :mod:`.connections` (client timeouts, the limit).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

import uvicorn

from edge_magistral import log_limit
from edge_magistral.errors import BadInputError, EdgeMagistralError
from edge_magistral.server.app import ServerConfig, build_service
from edge_magistral.server.connections import ConnectionLimits, protocol_class

if TYPE_CHECKING:
    from edge_magistral.planner import Plan

log = logging.getLogger(__name__)


class ServiceFailed(EdgeMagistralError):
    """The service stopped itself: the model could not be loaded or the worker kept failing."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _Server(uvicorn.Server):
    """uvicorn, with a hook on the exit signal and without re-raising it after the drain
    (uvicorn would, and the process would then die by SIGTERM instead of exiting 0)."""

    def __init__(self, config: uvicorn.Config, on_signal: Any):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        try:  # a signal handler interrupts arbitrary code: act from the loop instead
            asyncio.get_running_loop().call_soon_threadsafe(self._on_signal)
        except RuntimeError:
            self._on_signal()


def serve(config: ServerConfig, notifier: Any = None) -> None:
    """Serve until SIGTERM/SIGINT; raise :class:`ServiceFailed` if the service gave up."""
    config.check_exposure()
    if notifier is None:
        notifier = _notifier()
    failure: list[tuple[int, str]] = []
    server: _Server | None = None

    def on_fatal(code: int, message: str) -> None:
        failure.append((code, message))
        if server is not None:
            server.should_exit = True

    def on_signal() -> None:
        notifier.stopping()
        svc.supervisor.begin_drain()

    svc = build_service(config, notifier=notifier, on_fatal=on_fatal)
    closed = svc.metrics.connections_closed
    limits = ConnectionLimits(config.client_timeout_s, on_close=lambda reason: closed.labels(reason).inc())
    uv = uvicorn.Config(
        svc.app, host=config.host, port=config.port, log_level=logging.getLevelName(config.log_level).lower(),
        access_log=config.log_level <= logging.INFO, timeout_graceful_shutdown=config.drain_timeout_s,
        limit_concurrency=max(64, 4 * config.queue_size), timeout_keep_alive=5, server_header=False,
        lifespan="on", http=protocol_class(limits),
    )
    # after uvicorn.Config set up its handlers; not its access log, whose formatter takes only its own
    # records (it is on only with -v, and one line per request is not a flood of one line)
    log_limit.install(("", "uvicorn"))
    server = _Server(uv, on_signal)
    sock = bind(config.host, config.port)
    try:
        n_slots = preflight(config).n_slots
    except EdgeMagistralError as e:
        sock.close()
        notifier.status(f"failed: cannot load the model: {e}")
        raise ServiceFailed(f"cannot load the model: {e}", e.exit_code) from None
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"edge-magistral: listening on http://{url_host}:{port} ({config.model_name}, "
          f"{n_slots} slot{'s' if n_slots > 1 else ''})", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        svc.supervisor.kill_now()  # after an abnormal exit only; a clean one has stopped it already
    if failure:
        raise ServiceFailed(failure[0][1], failure[0][0])


def preflight(config: ServerConfig) -> Plan:
    """Detect the box and plan the model before anything listens or loads: a GPU the installed
    llama.cpp cannot drive, or a model that does not fit, stops the start here with what to do
    (DoesNotFitError says what to change), instead of a worker that loads on the wrong device or
    dies in a restart loop. The worker plans again when it loads (free memory may have changed by
    then)."""
    from edge_magistral.loader import ModelRequest, plan_model

    return plan_model(ModelRequest(model=config.model_path, ctx=config.ctx, n_gpu_layers=config.n_gpu_layers,
                                   parallel=config.parallel, profile=config.profile,
                                   hardware_file=config.hardware_file, threads=config.threads,
                                   think_budget=config.think_budget, speculate=config.speculate,
                                   draft_model=config.draft_model, cluster=config.cluster))[0]


def bind(host: str, port: int) -> socket.socket:
    """Bind before anything is loaded, so that a busy port is a one-line error, not a crash."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise BadInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _notifier() -> Any:
    from edge_magistral.systemd import Notifier

    return Notifier.from_env(unset_environment=True)  # the worker must not think it is the main process
