"""The gateway's HTTP app: its routes and their wiring (aiohttp's server).

POST /generate (sem's own format, see gateway.generate), POST /v1/completions and
/v1/chat/completions (OpenAI, streaming included), GET /v1/models, /health, /metrics, and the
API's description: /openapi.json and /docs (gateway.openapi).

A request goes one way, each layer calling only the next: a handler here parses and validates
it, picks its relay and hands it over -> its journey (gateway.journey: admission, attempts,
retries, metrics) -> the relay (gateway.proxy) -> the engine client (gateway.upstream).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from pydantic import ValidationError

from contract import defaults
from gateway.admission import Admission
from gateway.body import parse_body, read_body
from gateway.errors import InvalidField
from gateway.fastpath import Route
from gateway.frontdoor import FrontDoor, middleware_for
from gateway.generate import (
    ENGINE_PATH,
    STREAM_OPTIONS,
    GenerateAnswer,
    GenerateRequest,
    generate_events,
)
from gateway.journey import Journeys
from gateway.keys import KeyGate
from gateway.limits import Limits
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.openai_requests import validate
from gateway.openapi import add_routes
from gateway.proxy import Answer, AnswerOn, JsonRelay, Opener, Relay, StreamRelay, Whole
from gateway.retry import RetryBudget
from gateway.routes import RouteWatcher
from gateway.state import ADMISSION, DOOR, JOURNEYS, KEYS, METRICS, RETRY, UPSTREAM, WATCHER
from gateway.upstream import UpstreamPool

REQUEST_ID = "x-request-id"  # the client's name for a request, used in the logs
# Request headers, looked up by lower-case name (aiohttp's are case-insensitive; the front
# door's own server gives them lower-cased).
Headers = Mapping[str, str]


def priority_of(headers: Headers) -> int:
    """The `X-Priority` header: an integer, higher is served first (default 0)."""
    raw = headers.get("x-priority", "0")
    try:
        return int(raw)
    except ValueError:
        raise InvalidField(
            f"X-Priority: expected an integer, got {raw!r}", param="X-Priority"
        ) from None


def validation_error(exc: ValidationError) -> InvalidField:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )
    return InvalidField(problems, param=field)


# -- the hot routes: served by aiohttp's server (these handlers) or by the front door's own
# -- (gateway.fastpath), both through the answers below ------------------------------------


def on_aiohttp(answer: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A hot route's answer as aiohttp's handler: the body read within the front door's limits
    (gateway.body), a stream answered through aiohttp's response."""

    async def handler(request: web.Request) -> web.StreamResponse:
        raw = await read_body(request, request.app[DOOR].limits)
        answered = await answer(request.headers, raw, AnswerOn(request))
        return answered.as_response() if isinstance(answered, Whole) else answered

    return handler


async def generate_answer(
    app: web.Application, headers: Headers, raw: bytes, opener: Opener
) -> Answer:
    """/generate (see gateway.generate): validated, then sent as a completion request."""
    body = await parse_body(raw, app[DOOR].limits)
    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    engine_body = req.model_dump(exclude_none=True)
    if req.stream:
        engine_body["stream_options"] = STREAM_OPTIONS
    payload = json.dumps(engine_body).encode()
    pool = app[UPSTREAM]
    relay: Relay
    if req.stream:
        relay = StreamRelay(
            pool, opener, ENGINE_PATH, engine_body, payload, convert=generate_events
        )
    else:
        relay = JsonRelay(pool, opener, ENGINE_PATH, payload, reshape=GenerateAnswer(req.model))
    return await hand_over(app, headers, "/generate", relay, req.model, payload)


async def openai_answer(
    app: web.Application, path: str, headers: Headers, raw: bytes, opener: Opener
) -> Answer:
    """/v1/completions and /v1/chat/completions: the fields sem reads validated (see
    gateway.openai_requests), routed by `model`, the body passed through as it came."""
    body = await parse_body(raw, app[DOOR].limits)
    try:
        validate(path, body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    pool = app[UPSTREAM]
    relay: Relay
    if body.get("stream") is True:
        relay = StreamRelay(pool, opener, path, body, raw)
    else:
        relay = JsonRelay(pool, opener, path, raw)
    return await hand_over(app, headers, path, relay, body["model"], raw)


async def hand_over(
    app: web.Application, headers: Headers, path: str, relay: Relay, model: str, body: bytes
) -> Answer:
    """The request's journey (gateway.journey), with what it needs from the HTTP request, once
    its API key lets it (gateway.keys: 401, 403 or 429 if not)."""
    keys = app[KEYS]
    key_id = keys.admit(headers.get("authorization"), model)
    charge = None if key_id is None else functools.partial(keys.charge, key_id)
    return await app[JOURNEYS].run(
        relay, model, path, body, priority_of(headers), headers.get(REQUEST_ID), charge
    )


async def list_models(request: web.Request) -> web.Response:
    """The models; with API keys on, those the presented key may use."""
    table = request.app[WATCHER].table
    key = request.app[KEYS].identify(request.headers.get("Authorization"))
    data = [
        {"id": name, "object": "model", "owned_by": "sem", "sem_state": route.state}
        for name, route in sorted(table.models.items())
        if key is None or key.models is None or name in key.models
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


def create_app(
    watcher: RouteWatcher,
    admission: Admission | None = None,
    upstream_timeout: float = defaults.UPSTREAM_TIMEOUT,
    retry: RetryBudget | None = None,
    limits: Limits | None = None,
    require_keys: bool = False,
) -> web.Application:
    """The gateway app; it owns its pool of engine connections (closed at the app's cleanup)
    and its front door (gateway.frontdoor: serve it with `app[DOOR].listen`). API keys
    (gateway.keys) are checked when the route table has some, or always with `require_keys`."""
    door = FrontDoor(limits or Limits())
    app = web.Application(middlewares=[middleware_for(door)], client_max_size=door.limits.max_body)
    app[DOOR] = door
    app[WATCHER] = watcher
    app[RETRY] = retry or RetryBudget()
    app[UPSTREAM] = UpstreamPool(timeout=upstream_timeout)
    app[ADMISSION] = admission or Admission(watcher)
    app[METRICS] = GatewayMetrics(watcher, app[ADMISSION])
    app[METRICS].registry.register(door.collector())
    app[KEYS] = KeyGate(watcher, require=require_keys)
    app[KEYS].register(app[METRICS].registry)
    app[JOURNEYS] = Journeys(watcher, app[ADMISSION], app[RETRY], app[METRICS])
    hot: dict[str, Route] = {  # served by the front door's own server, else by aiohttp's
        "/generate": functools.partial(generate_answer, app),
        "/v1/completions": functools.partial(openai_answer, app, "/v1/completions"),
        "/v1/chat/completions": functools.partial(openai_answer, app, "/v1/chat/completions"),
    }
    for path, answer in hot.items():
        app.router.add_post(path, on_aiohttp(answer))
    door.fast_routes = {path.encode(): answer for path, answer in hot.items()}
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    add_routes(app)
    app.on_shutdown.append(stop_fast_path)
    app.on_cleanup.append(close_upstream)
    return app


async def stop_fast_path(app: web.Application) -> None:
    """Stopping: the requests the front door serves itself drain meanwhile aiohttp's own do
    (one --shutdown-timeout for both)."""
    app[DOOR].stop()


async def close_upstream(app: web.Application) -> None:
    """After every request has finished or been cancelled, the fast path's too."""
    await app[DOOR].drained()
    await app[UPSTREAM].close()
