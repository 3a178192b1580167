"""The gateway's HTTP app (aiohttp's server; engines are called through gateway.upstream).

POST /generate {model, prompt, ...} -> {model, text, finish_reason, usage} (or with stream: true,
SSE of {"text": delta}), through the engine's /v1/completions. POST /v1/completions and
/v1/chat/completions (OpenAI, streaming included), GET /v1/models, GET /health.

An engine that fails a request (dies, hangs until the supervisor kills it, answers 5xx or an
in-band stream error) costs the client nothing: the request is sent again to another ready
replica or to the restarted one (`replay`); a stream that had started goes on from where it
broke (`resume`, see gateway.resume). Bounded by the retry budget (gateway.retry).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract import defaults
from contract.routes import ReplicaRoute
from gateway.admission import Admission
from gateway.errors import (
    BadRequest,
    GatewayError,
    InvalidField,
    InvalidRequest,
    RequestQuarantined,
    UpstreamError,
    error_response,
)
from gateway.metrics import CONTENT_TYPE, GatewayMetrics, Observation
from gateway.proxy import StreamRelay, engine_call, engine_errors, engine_json, relay, sse
from gateway.resume import events
from gateway.retry import RetryBudget
from gateway.routes import RouteWatcher
from gateway.state import ADMISSION, METRICS, RETRY, UPSTREAM, WATCHER
from gateway.upstream import UpstreamPool

log = logging.getLogger("sem.gateway")
Call = Callable[[ReplicaRoute, Observation], Awaitable[web.StreamResponse]]

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
    engine_body = req.model_dump(exclude_none=True)
    payload = json.dumps(engine_body).encode()
    if req.stream:
        stream = StreamRelay(
            request, "/v1/completions", engine_body, payload, convert=generate_events
        )
        return await admitted(request, req.model, "/generate", stream.attempt, stream, payload)

    async def call(replica: ReplicaRoute, obs: Observation) -> web.StreamResponse:
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

    return await admitted(request, req.model, "/generate", call, None, payload)


def generate_events(raw: bytes) -> bytes:
    """/generate's stream format from the engine's completion events: `data: {"text": delta}`
    (with `finish_reason` on the last), then `data: [DONE]`; error events pass as they are."""
    out = []
    for data in events(raw):
        if data == b"[DONE]":
            out.append(sse("[DONE]"))
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            out.append(sse(chunk))
        for choice in chunk.get("choices", []):
            delta: dict[str, Any] = {"text": choice.get("text", "")}
            if choice.get("finish_reason"):
                delta["finish_reason"] = choice["finish_reason"]
            out.append(sse(delta))
    return b"".join(out)


async def openai_route(request: web.Request) -> web.StreamResponse:
    """/v1/completions and /v1/chat/completions: routed by `model`, the body passed through."""
    body, raw = await read_json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidField("model: a model name is required", param="model")
    if body.get("stream"):
        stream = StreamRelay(request, request.path, body, raw)
        return await admitted(request, model, request.path, stream.attempt, stream, raw)

    async def call(replica: ReplicaRoute, obs: Observation) -> web.StreamResponse:
        return await relay(request, replica, raw, obs)

    return await admitted(request, model, request.path, call, None, raw)


async def admitted(
    request: web.Request,
    model: str,
    route: str,
    call: Call,
    stream: StreamRelay | None,
    body: bytes,
) -> web.StreamResponse:
    """Observe the request, and run `call` while holding a slot on a replica of `model`
    (queueing for it if need be); after an engine failure, again on another replica (or the
    restarted one), within the retry budget. Unknown model names share one metrics label."""
    app = request.app
    priority = priority_of(request)
    label = model if model in app[WATCHER].table.models else "(unknown)"
    obs = Observation(app[METRICS].model(label), route)
    budget = app[RETRY]
    error: BaseException | None = None
    try:
        if budget.quarantined and (until := budget.quarantined_until(
            budget.digest(model, route, body)
        )):  # fmt: skip
            raise RequestQuarantined(
                f"this exact request failed on engines {budget.max_attempts} times; it is"
                f" refused until {time.strftime('%H:%M:%S', time.localtime(until))}"
                " (it may be what makes them fail)"
            )
        admission = app[ADMISSION]
        replica = await admission.acquire(model, priority)
        obs.admitted()
        failures = 0
        rid = ""  # made up on the first failure (the logs need it only then)
        while True:
            try:
                return await call(replica, obs)
            except UpstreamError as exc:  # not a timeout: a hung engine is the supervisor's to kill
                failures += 1
                rid = rid or request_id(request)
                admission.suspect(replica.url or "", budget.suspect_for)
                if failures >= budget.max_attempts:
                    raise give_up(rid, budget, model, route, body, failures, exc) from None
                retry = "resume" if stream is not None and stream.response else "replay"
                (obs.metrics.resumes if retry == "resume" else obs.metrics.replays).inc()
                log.warning(
                    "request %s (%s): %s; %s (attempt %d of %d)", rid, model,
                    exc.message, retry, failures + 1, budget.max_attempts,
                )  # fmt: skip
            finally:
                admission.release(replica)
            replica = await admission.acquire_again(model, budget.replay_timeout)
    except BaseException as exc:
        error = exc
        if isinstance(exc, GatewayError) and stream is not None and stream.response is not None:
            return await stream.give_up(exc)  # the client has a stream: end it with the error
        raise
    finally:
        obs.finished(error)


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id, or one made up for the logs."""
    return request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]


def give_up(
    rid: str,
    budget: RetryBudget,
    model: str,
    route: str,
    body: bytes,
    failures: int,
    last: UpstreamError,
) -> UpstreamError:
    """The error for a request that met `failures` engine failures; it is quarantined."""
    budget.exhausted(budget.digest(model, route, body))
    log.error("request %s (%s): failed on engines %d times; giving up and refusing it for %.0fs",
              rid, model, failures, budget.quarantine)  # fmt: skip
    return type(last)(
        f"{last.message}; the request failed on engines {failures} times and is not retried"
        f" (it may be what makes them fail: refused for {budget.quarantine:.0f}s)"
    )


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
    watcher: RouteWatcher,
    admission: Admission | None = None,
    upstream_timeout: float = defaults.UPSTREAM_TIMEOUT,
    retry: RetryBudget | None = None,
) -> web.Application:
    """The gateway app; it owns its pool of engine connections (closed at the app's cleanup)."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=32 * 1024**2)
    app[WATCHER] = watcher
    app[RETRY] = retry or RetryBudget()
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
