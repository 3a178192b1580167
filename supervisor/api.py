"""The supervisor's admin REST API (FastAPI). Errors leave as {"error": {"type", "message"}}.

Secrets never leave it: a model's `env` values, and `engine_args` whose names look secret, are
answered as "***" (the keys stay, so an operator sees what is set). No CORS headers are sent.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.errors import error_body
from supervisor.cache import ModelCache
from supervisor.cache_api import cache_router
from supervisor.config import ModelSpec, format_loc
from supervisor.demand import DemandBoard
from supervisor.errors import InvalidConfig, SupervisorError, Unauthorized
from supervisor.events import EventLog
from supervisor.hosts import HostCheck
from supervisor.keys_api import keys_router
from supervisor.manager import Manager
from supervisor.metrics import SupervisorMetrics
from supervisor.metrics_api import metrics_router
from supervisor.reconcile import ConfigDiff
from supervisor.report_api import report_router

Reload = Callable[[bool], Awaitable[ConfigDiff]]  # its argument: removing every model is confirmed

REDACTED = "***"
_SECRET_NAME = re.compile(
    r"(^|[-_])(api[-_]?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE
)


def redact(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A model's snapshot as answered: every env value, and engine_args that look secret
    (api-key, hf-token...), replaced by "***"."""
    spec = dict(snapshot["spec"])
    spec["env"] = dict.fromkeys(spec.get("env") or {}, REDACTED)
    spec["engine_args"] = {
        k: REDACTED if _SECRET_NAME.search(k) else v
        for k, v in (spec.get("engine_args") or {}).items()
    }
    return {**snapshot, "spec": spec}


def create_app(
    manager: Manager,
    events: EventLog,
    token: str | None = None,
    reload: Reload | None = None,
    cache: ModelCache | None = None,
    allowed_hosts: frozenset[str] | None = None,
    metrics: SupervisorMetrics | None = None,
    demand: DemandBoard | None = None,
) -> FastAPI:
    """The app; `allowed_hosts` (hosts.allowed_hosts) turns the Host header check on, which the
    daemon always does (in-process tests leave it off)."""
    app = FastAPI(title="sem supervisor", version="0.1.0")
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    token = token or None  # an empty SEM_ADMIN_TOKEN= means no token, not the empty one

    async def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        """Mutating calls need `Authorization: Bearer <token>` when a token is configured."""
        if token is None:
            return
        presented = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer ...)")

    mutating = [Depends(require_token)]

    @app.exception_handler(SupervisorError)
    async def _supervisor_error(_: Request, exc: SupervisorError) -> JSONResponse:
        return JSONResponse(error_body(exc.type, exc.message, exc.status), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{format_loc(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(
            error_body("invalid_request", "; ".join(problems), 422), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body("http_error", str(exc.detail), exc.status_code),
            status_code=exc.status_code,
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(manager.entries())}

    @app.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"models": [redact(entry.snapshot()) for entry in manager.entries()]}

    @app.get("/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        return redact(manager.get(name).snapshot())

    @app.post("/models", status_code=202, dependencies=mutating)
    async def add_model(spec: ModelSpec) -> dict[str, Any]:
        return redact((await manager.add(spec)).snapshot())

    @app.delete("/models/{name}", status_code=202, dependencies=mutating)
    async def remove_model(
        name: str, timeout: Annotated[float, Query(ge=0, le=3600)] = 30.0
    ) -> dict[str, Any]:
        return redact(manager.remove(name, drain_timeout=timeout).snapshot())

    @app.post("/reload", dependencies=mutating)
    async def reload_config(confirm_remove_all: bool = False) -> dict[str, Any]:
        """Apply models.yaml's changes (the file the supervisor started with); 409 if the file
        lists no model any more, unless `confirm_remove_all=true`."""
        if reload is None:
            raise InvalidConfig("this supervisor was started without a models.yaml to reload")
        return (await reload(confirm_remove_all)).to_json()

    @app.get("/resources")
    async def resources() -> dict[str, Any]:
        """Devices with total, free (measured) and reserved (by sem) bytes, and who holds what."""
        return {"devices": await manager.resources()}

    @app.get("/routes", dependencies=mutating)
    async def routes(
        after: Annotated[int, Query(ge=-1)] = -1,
        timeout: Annotated[float, Query(ge=0, le=60)] = 0.0,
        client: Literal["gateway"] | None = None,
    ) -> dict[str, Any]:
        """The route table; with `after=V&timeout=S`, a long-poll for a version newer than V.
        `client=gateway`: the gateway polls, holding table V (engines are signalled only once
        it holds a table without them). It holds secrets (engine keys, API key hashes): the
        admin token is required when one is set; without one the API listens on loopback only
        (docs/security.md)."""
        gateway = client == "gateway"
        table = await manager.wait_routes(after, timeout, gateway) if timeout else manager.routes
        return table.to_json()

    @app.get("/events", response_model=None)
    async def get_events(
        subject: str | None = None,
        limit: Annotated[int, Query(ge=1, le=2000)] = 200,
        follow: bool = False,
    ) -> dict[str, Any] | StreamingResponse:
        """Recent events; with `follow=true`, a server-sent event stream of new ones."""
        if not follow:
            return {"events": [e.to_json() for e in events.recent(subject, limit)]}

        async def stream() -> AsyncIterator[bytes]:
            yield b": following sem events\n\n"
            async for event in events.follow():
                if subject is None or event.subject.startswith(subject):
                    yield f"data: {json.dumps(event.to_json())}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    if cache is not None:
        app.include_router(cache_router(manager, cache, mutating))
    if metrics is not None:
        app.include_router(metrics_router(metrics))
    if demand is not None:
        app.include_router(report_router(demand, mutating))
    app.include_router(keys_router(manager.keys, demand or manager.demand, mutating))
    return app
