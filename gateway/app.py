"""The gateway's HTTP app (aiohttp's server; engines are called through gateway.upstream).

POST /generate {model, prompt, ...} -> {model, text, finish_reason, usage} (or with stream: true,
SSE of {"text": delta}), through the engine's /v1/completions. POST /v1/completions and
/v1/chat/completions (OpenAI, streaming included), GET /v1/models, GET /health.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.admission import Admission
from gateway.errors import (
    BadRequest,
    GatewayError,
    InvalidField,
    InvalidRequest,
    error_response,
)
from gateway.metrics import CONTENT_TYPE, GatewayMetrics, Observation
from gateway.proxy import (
    SSE_HEADERS,
    check_answer,
    engine_call,
    engine_errors,
    engine_json,
    fail_stream,
    relay,
    sse,
    sse_events,
)
from gateway.routes import RouteWatcher
from gateway.state import ADMISSION, METRICS, UPSTREAM, WATCHER
from gateway.upstream import EngineDisconnected, UpstreamPool
from sem.routes import ReplicaRoute

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GenerateRequest(BaseModel):
    """/generate's body. Unknown fields are sampling parameters, passed to the engine as is."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    stream: bool = False


def priority_of(request: web.Request) -> int:
    """The `X-Priority` header: an integer, higher is served first (default 0)."""
    raw = request.headers.get("X-Priority", "0")
    try:
        return int(raw)
    except ValueError:
        raise InvalidField(
            f"X-Priority: expected an integer, got {raw!r}", param="X-Priority"
        ) from None


async def read_json_object(request: web.Request) -> tuple[dict[str, Any], bytes]:
    """The body parsed (to route and validate it) and as the bytes that came (to forward)."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    return body, raw


def validation_error(exc: ValidationError) -> InvalidField:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )
    return InvalidField(problems, param=field)


async def generate(request: web.Request) -> web.StreamResponse:
    body, _ = await read_json_object(request)
    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    payload = json.dumps(req.model_dump(exclude_none=True)).encode()

    async def call(replica: ReplicaRoute, obs: Observation) -> web.StreamResponse:
        if req.stream:
            return await generate_stream(request, replica, payload, obs)
        with engine_errors(replica):
            async with engine_call(request, replica, "/v1/completions", payload) as upstream:
                data = engine_json(upstream.status, await upstream.read(), replica)
        usage = data.get("usage") or {}
        obs.tokens += int(usage.get("completion_tokens") or 0)
        choice = data["choices"][0]
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

    return await admitted(request, req.model, "/generate", call)


async def generate_stream(
    request: web.Request, replica: ReplicaRoute, payload: bytes, obs: Observation
) -> web.StreamResponse:
    """/generate with stream: true: `data: {"text": delta}` events, then `data: [DONE]`."""
    with engine_errors(replica):
        async with engine_call(request, replica, "/v1/completions", payload) as upstream:
            if upstream.status >= 400:
                check_answer(upstream.status, await upstream.read(), replica)
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            try:
                async for event in sse_events(upstream):
                    for choice in event.get("choices", []):
                        delta: dict[str, Any] = {"text": choice.get("text", "")}
                        if choice.get("finish_reason"):
                            delta["finish_reason"] = choice["finish_reason"]
                        await response.write(sse(delta))
                        obs.first_token()
                        obs.tokens += 1
                await response.write(sse("[DONE]"))
                await response.write_eof()
            except (EngineDisconnected, TimeoutError, GatewayError) as exc:
                await fail_stream(response, exc, replica, obs)
            return response


async def openai_route(request: web.Request) -> web.StreamResponse:
    """/v1/completions and /v1/chat/completions: routed by `model`, the body passed through."""
    body, raw = await read_json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidField("model: a model name is required", param="model")
    stream = bool(body.get("stream"))

    async def call(replica: ReplicaRoute, obs: Observation) -> web.StreamResponse:
        return await relay(request, replica, raw, stream, obs)

    return await admitted(request, model, request.path, call)


async def admitted(
    request: web.Request,
    model: str,
    route: str,
    call: Callable[[ReplicaRoute, Observation], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Observe the request, and run `call` while holding a slot on a replica of `model`
    (queueing for it if need be). Unknown model names share one metrics label."""
    app = request.app
    priority = priority_of(request)
    label = model if model in app[WATCHER].table.models else "(unknown)"
    obs = Observation(app[METRICS].model(label), route)
    error: BaseException | None = None
    try:
        admission = app[ADMISSION]
        replica = await admission.acquire(model, priority)
        try:
            obs.admitted()
            return await call(replica, obs)
        finally:
            admission.release(replica)
    except BaseException as exc:
        error = exc
        raise
    finally:
        obs.finished(error)


async def list_models(request: web.Request) -> web.Response:
    table = request.app[WATCHER].table
    data = [
        {"id": name, "object": "model", "owned_by": "sem", "sem_state": route.state}
        for name, route in sorted(table.models.items())
    ]
    return web.json_response({"object": "list", "data": data})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


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
        return error_response(InvalidRequest(exc.reason, status=exc.status))


def create_app(
    watcher: RouteWatcher, admission: Admission | None = None, upstream_timeout: float = 600.0
) -> web.Application:
    """The gateway app; it owns its pool of engine connections (closed at the app's cleanup)."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=32 * 1024**2)
    app[WATCHER] = watcher
    app[UPSTREAM] = UpstreamPool(timeout=upstream_timeout)
    app[ADMISSION] = admission or Admission(watcher)
    app[METRICS] = GatewayMetrics(watcher, app[ADMISSION])
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", openai_route)
    app.router.add_post("/v1/chat/completions", openai_route)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_cleanup.append(close_upstream)
    return app


async def close_upstream(app: web.Application) -> None:
    await app[UPSTREAM].close()
