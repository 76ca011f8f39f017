"""How the supervisor watches the worker: the limits and timeouts, with their defaults stated
once (the server's configuration and the ``serve`` command take theirs from here). A light
module, so that the command line can show the defaults without importing the service."""

from __future__ import annotations

from dataclasses import dataclass


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
