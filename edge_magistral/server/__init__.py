"""The OpenAI-compatible HTTP service: ``edge-magistral serve``.

Modules: :mod:`.settings` (the configuration and its defaults), :mod:`.app` (wiring), :mod:`.api`
(routes and response formats), :mod:`.schemas` (validated request bodies), :mod:`.guard` (host,
key, body limits), :mod:`.supervisor` (the worker process, the queue, restarts), :mod:`.link`
(one worker process and the threads that talk to it), :mod:`.protocol` (the messages between the
two processes), :mod:`.worker` (the process that owns the engine), :mod:`.admission` (the model's
sha256 against its manifest), :mod:`.connections` (client timeouts, the connection limit),
:mod:`.metrics` (Prometheus), :mod:`.run` (uvicorn, signals, sd_notify).

The names below load on first use, so that the command line can read the service's defaults
(:mod:`.settings`, a light module) without importing the web framework.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"ServerConfig": "settings", "build_service": "app", "load_api_keys": "guard", "ServiceFailed": "run",
            "serve": "run", "SupervisorConfig": "settings"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
