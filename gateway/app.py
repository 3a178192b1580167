"""The gateway's HTTP app (aiohttp: server and upstream client, chosen for the hot path).

POST /generate {model, prompt, ...} -> {model, text, finish_reason, usage}, through the engine's
/v1/completions. GET /health, GET /v1/models.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import (
    BadRequest,
    GatewayError,
    InvalidField,
    ModelNotFound,
    ModelNotReady,
    UpstreamError,
    UpstreamTimeout,
    error_response,
)
from gateway.routes import RouteWatcher
from sem.routes import ReplicaRoute

log = logging.getLogger("sem.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WATCHER = web.AppKey("watcher", RouteWatcher)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)


class GenerateRequest(BaseModel):
    """/generate's body. Unknown fields are sampling parameters, passed to the engine as is."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    stream: bool = False


class Balancer:
    """Least outstanding requests across a model's ready replicas (ties: the first listed)."""

    def __init__(self) -> None:
        self.outstanding: dict[str, int] = {}

    def pick(self, replicas: tuple[ReplicaRoute, ...]) -> ReplicaRoute:
        return min(replicas, key=lambda r: self.outstanding.get(r.id, 0))

    def acquire(self, replica: ReplicaRoute) -> None:
        self.outstanding[replica.id] = self.outstanding.get(replica.id, 0) + 1

    def release(self, replica: ReplicaRoute) -> None:
        self.outstanding[replica.id] -= 1


BALANCER = web.AppKey("balancer", Balancer)


def choose_replica(app: web.Application, model: str) -> ReplicaRoute:
    watcher = app[WATCHER]
    route = watcher.table.models.get(model)
    if route is None:
        known = ", ".join(sorted(watcher.table.models)) or "none"
        raise ModelNotFound(f"model {model!r} is not served here (known: {known})", param="model")
    ready = route.ready_replicas
    if not ready:
        raise ModelNotReady(
            f"model {model!r} is {route.state}, not ready yet ({route.reason}); retry shortly",
            retry_after=5,
        )
    return app[BALANCER].pick(ready)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    return body


def validation_error(exc: ValidationError) -> InvalidField:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )
    return InvalidField(problems, param=field)


async def post_engine(
    app: web.Application, replica: ReplicaRoute, path: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """POST JSON to one engine; its JSON answer, or a typed error."""
    balancer = app[BALANCER]
    balancer.acquire(replica)
    try:
        async with app[UPSTREAM].post(f"{replica.url}{path}", json=payload) as response:
            text = await response.text()
            if response.status >= 500:
                raise UpstreamError(f"engine {replica.id} answered {response.status}: {text[:300]}")
            data = json.loads(text)
            if response.status >= 400:
                # The engine validated the request (e.g. max_tokens past the context): pass it on.
                message = data.get("error", {}).get("message", text[:300])
                raise BadRequest(f"engine rejected the request: {message}")
            return dict(data)
    except aiohttp.ClientConnectionError as exc:
        raise UpstreamError(f"engine {replica.id} unreachable: {exc}") from None
    except TimeoutError:
        raise UpstreamTimeout(f"engine {replica.id} did not answer in time") from None
    except json.JSONDecodeError:
        raise UpstreamError(f"engine {replica.id} answered with malformed JSON") from None
    finally:
        balancer.release(replica)


async def generate(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if req.stream:
        raise InvalidField("stream: streaming /generate is not supported yet", param="stream")
    replica = choose_replica(request.app, req.model)
    payload = req.model_dump(exclude_none=True, exclude={"stream"})
    started = time.perf_counter()
    data = await post_engine(request.app, replica, "/v1/completions", payload)
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    log.debug("generate %s on %s in %.3fs", req.model, replica.id, time.perf_counter() - started)
    return web.json_response(
        {
            "model": req.model,
            "text": choice.get("text", ""),
            "finish_reason": choice.get("finish_reason"),
            "usage": {
                "prompt_tokens": usage.get("prompt_tokens", 0),
                "completion_tokens": usage.get("completion_tokens", 0),
                "total_tokens": usage.get("total_tokens", 0),
            },
        }
    )


async def list_models(request: web.Request) -> web.Response:
    table = request.app[WATCHER].table
    data = [
        {"id": name, "object": "model", "owned_by": "sem", "sem_state": route.state}
        for name, route in sorted(table.models.items())
    ]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    watcher = request.app[WATCHER]
    ready = sorted(n for n, r in watcher.table.models.items() if r.ready_replicas)
    return web.json_response(
        {"status": "ok", "supervisor": watcher.connected, "ready_models": ready}
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_http_error(exc))


def _http_error(exc: web.HTTPException) -> GatewayError:
    err = GatewayError(exc.reason)
    err.status, err.type = exc.status, "invalid_request_error"
    return err


def create_app(
    watcher: RouteWatcher, upstream: aiohttp.ClientSession, balancer: Balancer | None = None
) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=32 * 1024**2)
    app[WATCHER] = watcher
    app[UPSTREAM] = upstream
    app[BALANCER] = balancer or Balancer()
    app.router.add_post("/generate", generate)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    return app
