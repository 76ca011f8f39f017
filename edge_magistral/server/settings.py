"""The service's settings and their defaults, stated once: :class:`ServerConfig` (everything
``edge-magistral serve`` decides) and :class:`SupervisorConfig` (how the worker is watched). A
light module, so that the command line shows these defaults without importing the service."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_magistral.errors import BadInputError


@dataclass(frozen=True)
class SupervisorConfig:
    queue_size: int = 8  # requests waiting, not counting those generating
    stall_timeout_s: float = 120.0  # busy with no progress (or no beats) this long: restart
    beat_timeout_s: float = 5.0  # no heartbeat this long: unhealthy (no liveness pings to systemd)
    load_timeout_s: float = 900.0
    max_restarts: int = 5
    restart_window_s: float = 600.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    max_buffered_events: int = 4096  # a reader this far behind is cancelled (slow client)


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``edge-magistral serve`` decides; see the CLI for what each means."""

    model_path: str
    model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    ctx: int | None = None
    n_gpu_layers: int | None = None
    profile: str | None = None
    threads: int | None = None
    think_budget: int | None = None
    parallel: int | None = None  # decoding slots (None: the plan's)
    speculate: str | None = None  # ngram | draft | off (None: the plan's, else ngram)
    draft_model: str | None = None  # the draft GGUF of speculate=draft
    cluster: Any = None  # edge_magistral.rpc.endpoints.Cluster: RPC workers to place layers on (None: none)
    api_keys: tuple[str, ...] = ()
    insecure_no_auth: bool = False
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    queue_size: int = SupervisorConfig.queue_size
    max_body_bytes: int = 2 * 1024 * 1024
    max_tokens: int | None = None  # the cap on a request's max_tokens (default: the context)
    request_timeout_s: float = 600.0
    client_timeout_s: float = 30.0  # request headers, the body, and a stalled reader (each)
    stall_timeout_s: float = SupervisorConfig.stall_timeout_s
    load_timeout_s: float = SupervisorConfig.load_timeout_s
    drain_timeout_s: float = 30.0
    audit_log: str | None = None
    redact: str = "none"
    log_level: int = logging.WARNING
    hardware_file: str | None = None  # a recorded box (detect --json) instead of detecting; for tests
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)

    def __post_init__(self) -> None:
        if not self.model_name:
            object.__setattr__(self, "model_name", Path(self.model_path).stem)

    @property
    def model_created(self) -> int:
        try:
            return int(os.stat(self.model_path).st_mtime)
        except OSError:
            return 0

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address without a key unless told so explicitly."""
        from edge_magistral.hosts import is_loopback

        if not is_loopback(self.host) and not self.api_keys and not self.insecure_no_auth:
            raise BadInputError(f"refusing to listen on {self.host} without an API key: give --api-key-file, "
                                "$EDGE_MAGISTRAL_API_KEY or the systemd credential 'api-key' "
                                "(or --insecure-no-auth if the network is trusted)")
