"""Wiring: a :class:`ServerConfig` becomes the ASGI application (routes behind the guard, CORS
only when asked), the supervisor that owns the worker, the metrics and the audit sink."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_magistral import __version__
from edge_magistral.hashing import sha256_file
from edge_magistral.hosts import is_loopback
from edge_magistral.server import api
from edge_magistral.server.errors import ApiError
from edge_magistral.server.guard import Guard, GuardConfig, KeyChecker
from edge_magistral.server.metrics import Metrics
from edge_magistral.server.settings import ServerConfig
from edge_magistral.server.supervisor import Supervisor
from edge_magistral.server.worker import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class Service:
    """The pieces the runner needs: the ASGI app to serve and the supervisor to drain."""

    app: Any
    api: FastAPI
    supervisor: Supervisor
    metrics: Metrics
    config: ServerConfig


class AuditSink:
    """One hash-chained record per finished generation, written off the event loop in order."""

    def __init__(self, path: str, redact: str, model_path: str):
        from edge_magistral.audit import AuditLog

        self.log = AuditLog(Path(path), redact=redact)
        self.model_path = model_path
        self.sup: Supervisor | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._sha: str | None = None

    def record(self, request_id: str, kind: str, prompt: Any, outcome: Any) -> None:
        info = self.sup.info if self.sup is not None else {}
        self._pool.submit(self._write, request_id, kind, prompt, outcome, info)

    def _model_sha256(self, info: dict[str, Any]) -> str:
        """The sha256 admission verified; a model no manifest lists is hashed here, once."""
        if self._sha is None:
            self._sha = info.get("admission", {}).get("sha256") or sha256_file(self.model_path)
        return self._sha

    def _write(self, request_id: str, kind: str, prompt: Any, o: Any, info: dict[str, Any]) -> None:
        from edge_magistral.audit import AuditRecord

        try:
            d, plan = o.done, info.get("plan", {})
            self.log.append(AuditRecord(
                request_id=request_id, model_sha256=self._model_sha256(info), quant=plan.get("quant", ""), plan=plan,
                sampling={**d.sampling, "kind": kind}, prompt=prompt, thinking="".join(o.thinking),
                answer="".join(o.answer), watchdog_events=d.watchdog_events,
                usage={**asdict(d.usage), "completion_tokens": d.usage.completion_tokens},
                tool_calls=d.tool_calls, tool_error=d.tool_error,
                finish_reason=d.finish_reason, timings=asdict(d.timings)))
        except Exception:  # a full disk must not take the service down; the log stays valid
            log.exception("could not write the audit record of %s", request_id)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def build_service(config: ServerConfig, notifier: Any = None, on_fatal: Any = None) -> Service:
    metrics = Metrics()
    sup_config = config.supervisor
    sup_config = replace(
        sup_config, queue_size=config.queue_size, stall_timeout_s=config.stall_timeout_s,
        load_timeout_s=config.load_timeout_s,
        # a worker silent for half the stall timeout is unhealthy (no liveness pings) before it is killed
        beat_timeout_s=min(sup_config.beat_timeout_s, config.stall_timeout_s / 2))
    settings = WorkerSettings(model_path=config.model_path, ctx=config.ctx, n_gpu_layers=config.n_gpu_layers,
                              profile=config.profile, threads=config.threads, think_budget=config.think_budget,
                              model_name=config.model_name, hardware_file=config.hardware_file,
                              log_level=config.log_level, parallel=config.parallel,
                              speculate=config.speculate, draft_model=config.draft_model,
                              cluster=config.cluster)
    sup = Supervisor(settings, sup_config, notifier=notifier, metrics=metrics, on_fatal=on_fatal)
    audit = AuditSink(config.audit_log, config.redact, config.model_path) if config.audit_log else None
    if audit is not None:
        audit.sup = sup

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await sup.start()
        try:
            yield
        finally:
            await sup.stop()
            if audit is not None:
                await asyncio.to_thread(audit.close)

    fastapi = FastAPI(title="edge-magistral", version=__version__, lifespan=lifespan,
                      docs_url=None, redoc_url=None, openapi_url=None)
    fastapi.state.supervisor, fastapi.state.metrics, fastapi.state.config = sup, metrics, config
    fastapi.state.audit = audit
    fastapi.include_router(api.router)
    _install_error_handlers(fastapi)
    guard = GuardConfig(keys=KeyChecker(config.api_keys), loopback_only_hosts=is_loopback(config.host),
                        allowed_hosts=frozenset(h.lower() for h in config.allowed_hosts),
                        max_body_bytes=config.max_body_bytes, read_timeout_s=config.client_timeout_s)
    app: Any = Guard(fastapi, guard, metrics)
    if config.cors_origins:  # outside the guard: preflight requests carry no key
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"])
    return Service(app=app, api=fastapi, supervisor=sup, metrics=metrics, config=config)


# ---------------------------------------------------------------------------- errors

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _api_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such route", 405: "method not allowed on this route"}.get(e.status_code, str(e.detail))
        return _api_response(ApiError(e.status_code, message, headers=dict(e.headers or {})))


def _api_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def validation_error(errors: Any) -> ApiError:
    """pydantic's most specific complaint as an OpenAI 400, the field path in ``param``."""
    errs = list(errors)
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        return ApiError(400, f"the body is not valid JSON: {e.get('ctx', {}).get('error', 'parse error')}",
                        code="invalid_json")
    # In a union (stop: str | list) every branch complains; a branch's wrong-type complaint is the
    # least useful one when another branch says what is actually wrong.
    specific = [e for e in errs if not str(e.get("type", "")).endswith("_type")]
    first = (specific or errs or [{}])[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_branch_tag(p)]
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    param = ".".join(loc) or None
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _is_branch_tag(part: Any) -> bool:
    """pydantic names union branches in error locations ('constrained-str', 'list[...]')."""
    return isinstance(part, str) and (any(c in part for c in "[]-(") or part in _TYPE_NAMES)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}
