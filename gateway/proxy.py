"""Forwarding one request to one engine: JSON in, JSON or a server-sent event stream out.

Streams are passed through as they arrive: each chunk the engine sends is written to the client
at once, with no buffering and no re-chunking.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import BadRequest, UpstreamError, UpstreamTimeout
from gateway.metrics import Observation
from gateway.state import UPSTREAM
from sem.routes import ReplicaRoute

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
JSON_HEADERS = {"Content-Type": "application/json"}


@asynccontextmanager
async def engine_call(
    app: web.Application, replica: ReplicaRoute, path: str, body: bytes
) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST to an engine; 5xx and network errors raise typed errors."""
    try:
        url = f"{replica.url}{path}"
        async with app[UPSTREAM].post(url, data=body, headers=JSON_HEADERS) as response:
            if response.status >= 500:
                text = await response.text()
                raise UpstreamError(f"engine {replica.id} answered {response.status}: {text[:300]}")
            yield response
    except aiohttp.ClientConnectionError as exc:
        raise UpstreamError(f"engine {replica.id} unreachable: {exc}") from None
    except TimeoutError:
        raise UpstreamTimeout(f"engine {replica.id} did not answer in time") from None


async def engine_json(response: aiohttp.ClientResponse, replica: ReplicaRoute) -> dict[str, Any]:
    """The engine's JSON answer; a 4xx (the engine validated the request) becomes a 400."""
    return (await engine_body(response, replica))[0]


async def engine_body(
    response: aiohttp.ClientResponse, replica: ReplicaRoute
) -> tuple[dict[str, Any], bytes]:
    """The engine's JSON answer, parsed and as it came."""
    raw = await response.read()
    text = raw.decode(errors="replace")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise UpstreamError(f"engine {replica.id} answered with malformed JSON") from None
    if response.status >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message", text[:300]) if isinstance(error, dict) else text[:300]
        raise BadRequest(f"engine rejected the request: {message}")
    if not isinstance(data, dict):
        raise UpstreamError(f"engine {replica.id} answered with a non-object")
    return data, raw


async def relay(
    request: web.Request, replica: ReplicaRoute, body: bytes, stream: bool, obs: Observation
) -> web.StreamResponse:
    """Forward an OpenAI request's bytes as they are; a stream is relayed chunk by chunk."""
    async with engine_call(request.app, replica, request.path, body) as upstream:
        if not stream or upstream.status >= 400:
            data, raw = await engine_body(upstream, replica)
            obs.tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
            return web.Response(body=raw, content_type="application/json")  # as the engine sent it
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
            obs.chunk()
        await response.write_eof()
        return response


async def sse_events(upstream: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an engine's SSE stream, until `data: [DONE]`."""
    buffer = b""
    async for chunk in upstream.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                parsed = json.loads(data)
                if isinstance(parsed, dict) and "error" in parsed:
                    message = parsed["error"].get("message", "engine error")
                    raise UpstreamError(f"engine failed mid-stream: {message}")
                yield parsed


def sse(data: dict[str, Any] | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data)
    return f"data: {body}\n\n".encode()
