"""The OpenAI-compatible HTTP service: ``edge-magistral serve``.

Modules: :mod:`.app` (configuration and wiring), :mod:`.api` (routes and response formats),
:mod:`.schemas` (validated request bodies), :mod:`.guard` (host, key, body limits),
:mod:`.supervisor` (the worker process, the queue, restarts), :mod:`.worker` (the process that
owns the Engine), :mod:`.admission` (the model's sha256 against its manifest), :mod:`.connections`
(client timeouts, the connection limit), :mod:`.metrics` (Prometheus), :mod:`.run` (uvicorn,
signals, sd_notify).
"""

from edge_magistral.server.app import ServerConfig, build_service
from edge_magistral.server.guard import load_api_keys
from edge_magistral.server.run import ServiceFailed, serve

__all__ = ["ServerConfig", "ServiceFailed", "build_service", "load_api_keys", "serve"]
