"""``serve``: the OpenAI-compatible HTTP service (see edge_magistral/server/)."""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from edge_magistral.cli.cluster_opts import cluster_of, cluster_options
from edge_magistral.cli.group import cli
from edge_magistral.cli.speculate_opts import speculate_options, speculation
from edge_magistral.errors import ModelNotFoundError
from edge_magistral.loader import MODEL_ENV
from edge_magistral.server import ServerConfig


def _resolve_model(spec: str | None) -> str:
    """A GGUF path or a quant in the model store; serve never downloads, and never guesses: a
    service names its model."""
    if not spec:
        raise ModelNotFoundError(f"no model: pass --model FILE.gguf, set `model:` in --config, or set {MODEL_ENV}")
    from edge_magistral.loader import resolve_model

    return resolve_model(spec)


def _from_file(config_file: str | None) -> dict:
    """The settings of a service config file (what ``install-service`` writes), by our names."""
    if not config_file:
        return {}
    from edge_magistral.systemd import read_service_config

    c = read_service_config(config_file)
    return {"model": c.model, "host": c.host, "port": c.port, "ctx": c.ctx, "n_gpu_layers": c.n_gpu_layers,
            "profile": c.profile, "parallel": c.parallel, "think_budget": c.think_budget, "audit_log": c.audit_log,
            "stall_timeout_s": c.stall_timeout_s, "speculate": c.speculate, "draft_model": c.draft_model}


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Service config file (written by install-service); options given here override it.")
@click.option("--model", default=None, help=f"GGUF file or a quant in the store (default: ${MODEL_ENV}).")
@click.option("--model-name", default=None, help="The model id clients see (default: the file name).")
@click.option("--host", default=None,
              help=f"Bind address (default {ServerConfig.host}; another one needs an API key).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help=f"Port (default {ServerConfig.port}; 0: any free port).")
@click.option("--ctx", type=click.IntRange(min=256), default=None, help="Override the planned context.")
@click.option("--n-gpu-layers", type=click.IntRange(min=0), default=None, help="Override planned GPU layers.")
@click.option("--profile", default=None, help="Hardware profile to plan with.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Override the planned CPU threads.")
@click.option("--think-budget", type=click.IntRange(min=0), default=None,
              help="Default think budget per request (default: the plan's).")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="Requests decoded at once (default: the plan's, from the profile; 1 on small boxes). Each "
                   "slot keeps its own KV cache of --ctx cells, and one more holds the shared prefix: N slots "
                   "cost (N + 1) times the KV memory of one. If they cannot fit, the start is refused.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="API keys, one per line. Also read: $EDGE_MAGISTRAL_API_KEY and the systemd credential "
                   "'api-key'. Keys are never taken on the command line.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Allow a non-loopback bind without any API key (only on a network you trust).")
@click.option("--allowed-host", multiple=True,
              help="Extra Host header accepted while bound to loopback, e.g. behind a reverse proxy (repeatable).")
@click.option("--cors-origin", multiple=True, help="Allow browser requests from this origin (repeatable; "
                                                   "default: CORS off).")
@click.option("--queue-size", type=click.IntRange(min=0, max=1024),
              default=ServerConfig.queue_size, show_default=True,
              help="Requests that may wait while every slot generates; beyond that, 429.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=ServerConfig.max_body_bytes, show_default=True,
              help="Largest request body (413 above it, before parsing).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Largest max_tokens a request may ask for, and the default (default: the context).")
@click.option("--request-timeout", type=click.FloatRange(min=1),
              default=ServerConfig.request_timeout_s, show_default=True,
              help="Seconds a request may take, queue wait included (the turn ends: finish_reason length).")
@click.option("--client-timeout", type=click.FloatRange(min=0.5),
              default=ServerConfig.client_timeout_s, show_default=True,
              help="Seconds a client may take to send its request headers, to send its body, or to take the next "
                   "part of a response once its buffers are full; beyond that the connection is closed (408 for "
                   "a slow body) and its generation cancelled.")
@click.option("--stall-timeout", type=click.FloatRange(min=1), default=None,
              help="Seconds a busy engine may make no progress before the worker is restarted and the liveness "
                   f"pings to systemd stop (default {ServerConfig.stall_timeout_s:g}; above the slowest prefill "
                   "batch).")
@click.option("--hang-timeout", "hang_timeout", type=click.FloatRange(min=1), default=None, hidden=True,
              help="Deprecated name of --stall-timeout.")
@click.option("--load-timeout", type=click.FloatRange(min=1),
              default=ServerConfig.load_timeout_s, show_default=True,
              help="Seconds the model may take to load and warm up.")
@click.option("--drain-timeout", type=click.FloatRange(min=0),
              default=ServerConfig.drain_timeout_s, show_default=True,
              help="On SIGTERM, seconds the request in flight may take to finish before it is cancelled.")
@click.option("--audit-log", default=None, type=click.Path(dir_okay=False),
              help="Append a hash-chained record of each request to this JSONL file.")
@click.option("--redact", type=click.Choice(["none", "thinking", "prompt", "all"]), default=ServerConfig.redact,
              show_default=True, help="What the audit record stores only as a sha256.")
@click.option("--hardware", "hardware_file", type=click.Path(dir_okay=False), default=None, hidden=True,
              help="Plan for this recorded box (detect --json) instead of detecting this one (tests).")
@speculate_options
@cluster_options
def serve(config_file: str | None, **options: Any) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat and raw completions, SSE streaming,
    /health, /metrics), --parallel generations at once, the engine in a supervised worker process.

    Binds 127.0.0.1:8080 by default. SIGTERM drains: no new requests, those in flight finish
    (or is cancelled after --drain-timeout), exit 0. Under systemd (Type=notify) it reports
    READY=1 after the model is loaded and warmed up, STATUS= lines, WATCHDOG=1 (liveness) while
    the engine is healthy, and STOPPING=1. A model listed in a manifest.json beside it is checked
    against its sha256 before it is loaded (and again on a worker restart if the file changed); a
    mismatch stops the service. Before anything loads, it detects the box and plans the model: a
    GPU the installed llama.cpp cannot use, or a model that does not fit, stops it with the fix.
    Prompts and answers are never logged; only --audit-log records them."""
    from edge_magistral.server import serve as run_server

    run_server(_server_config(_from_file(config_file), **options))


def _server_config(file: dict, *, model, model_name, host, port, ctx, n_gpu_layers, profile, threads, think_budget,
                   parallel, api_key_file, insecure_no_auth, allowed_host, cors_origin, queue_size, max_body_bytes,
                   max_tokens, request_timeout, client_timeout, stall_timeout, hang_timeout, load_timeout,
                   drain_timeout, audit_log, redact, hardware_file, speculate, draft_model, workers, cluster_file,
                   allow_public_worker) -> Any:
    """The options given, else the config file's settings, else the server's defaults."""
    from edge_magistral.loader import resolve_draft
    from edge_magistral.server import load_api_keys

    if speculate is None and draft_model is None:  # the options, else the file's, as a pair
        speculate, draft_model = file.get("speculate"), file.get("draft_model")
    speculate, draft_model = speculation(speculate, draft_model)

    def pick(value: Any, key: str) -> Any:
        return value if value is not None else file.get(key)

    from_file = {"host": pick(host, "host"), "port": pick(port, "port"), "ctx": pick(ctx, "ctx"),
                 "n_gpu_layers": pick(n_gpu_layers, "n_gpu_layers"), "profile": pick(profile, "profile"),
                 "think_budget": pick(think_budget, "think_budget"), "parallel": pick(parallel, "parallel"),
                 "audit_log": pick(audit_log, "audit_log"),
                 "stall_timeout_s": pick(stall_timeout if stall_timeout is not None else hang_timeout,
                                         "stall_timeout_s")}
    return ServerConfig(
        model_path=_resolve_model(pick(model, "model") or os.environ.get(MODEL_ENV)), model_name=model_name or "",
        threads=threads, api_keys=tuple(load_api_keys(api_key_file)), insecure_no_auth=insecure_no_auth,
        allowed_hosts=tuple(allowed_host), cors_origins=tuple(cors_origin), queue_size=queue_size,
        max_body_bytes=max_body_bytes, max_tokens=max_tokens, request_timeout_s=request_timeout,
        client_timeout_s=client_timeout, load_timeout_s=load_timeout, drain_timeout_s=drain_timeout, redact=redact,
        log_level=logging.getLogger().getEffectiveLevel(), hardware_file=hardware_file, speculate=speculate,
        draft_model=resolve_draft(draft_model) if draft_model else None,
        cluster=cluster_of(tuple(workers), pick(cluster_file, "cluster"), allow_public_worker),
        **{k: v for k, v in from_file.items() if v is not None})
