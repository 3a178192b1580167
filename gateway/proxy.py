"""Forwarding one request to one engine: JSON in, JSON or a server-sent event stream out.

Streams are passed through as they arrive: what the engine sent since the last read is written to
the client at once, with no buffering, no re-chunking and no parsing (events are counted, see
gateway.usage).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from aiohttp import web

from gateway.errors import BadRequest, GatewayError, UpstreamError, UpstreamTimeout, error_body
from gateway.metrics import Observation
from gateway.state import UPSTREAM
from gateway.upstream import EngineDisconnected, Exchange
from gateway.usage import StreamTally, completion_tokens
from sem.routes import ReplicaRoute

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def gateway_error(exc: BaseException, replica: ReplicaRoute) -> GatewayError | None:
    """`exc` as the gateway's typed error: network failures and timeouts of an engine call become
    502 and 504; gateway errors stay as they are; anything else is None."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, EngineDisconnected):
        return UpstreamError(f"engine {replica.id} unreachable: {exc}")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"engine {replica.id} did not answer in time")
    return None


class engine_errors:  # used like a function: `with engine_errors(replica):`
    """Network failures and timeouts of an engine call, raised as the gateway's typed errors."""

    __slots__ = ("_replica",)

    def __init__(self, replica: ReplicaRoute) -> None:
        self._replica = replica

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        error = None if exc is None else gateway_error(exc, self._replica)
        if error is not None and error is not exc:
            raise error from None


async def fail_stream(
    response: web.StreamResponse, exc: BaseException, replica: ReplicaRoute, obs: Observation
) -> None:
    """Once the headers went out, an error can only travel in the stream: one event in the
    OpenAI error shape (as vLLM sends its own), then the end of the response, without
    `data: [DONE]`. Anything but an engine or gateway failure is raised again."""
    error = gateway_error(exc, replica)
    if error is None:
        raise exc
    obs.outcome = error.type
    try:
        await response.write(sse(error_body(error)))
        await response.write_eof()
    except ConnectionResetError:  # the client is gone too
        pass


def engine_call(request: web.Request, replica: ReplicaRoute, path: str, body: bytes) -> Exchange:
    """POST `body` to the engine: `async with engine_call(...) as upstream` (inside
    `engine_errors`)."""
    assert replica.url is not None  # ready replicas have one
    return request.app[UPSTREAM].post(replica.url, path, body)


def check_answer(status: int, raw: bytes, replica: ReplicaRoute) -> None:
    """An engine's 5xx is a 502; its 4xx (it validated the request) a 400 with its message."""
    if status < 400:
        return
    text = raw.decode(errors="replace")
    if status >= 500:
        raise UpstreamError(f"engine {replica.id} answered {status}: {text[:300]}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message", text[:300]) if isinstance(error, dict) else text[:300]
    raise BadRequest(f"engine rejected the request: {message}")


def engine_json(status: int, raw: bytes, replica: ReplicaRoute) -> dict[str, Any]:
    """The engine's JSON answer, parsed (for /generate, which reshapes it)."""
    check_answer(status, raw, replica)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise UpstreamError(f"engine {replica.id} answered with malformed JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError(f"engine {replica.id} answered with a non-object")
    return data


async def relay(
    request: web.Request, replica: ReplicaRoute, body: bytes, stream: bool, obs: Observation
) -> web.StreamResponse:
    """Forward an OpenAI request's bytes as they are; a stream is relayed as it comes."""
    with engine_errors(replica):
        async with engine_call(request, replica, request.path, body) as upstream:
            if not stream or upstream.status >= 400:
                raw = await upstream.read()
                check_answer(upstream.status, raw, replica)
                obs.tokens += completion_tokens(raw) or 0
                # as the engine sent it
                return web.Response(body=raw, content_type="application/json")
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            tally = StreamTally()
            try:
                async for chunk in upstream:
                    await response.write(chunk)
                    obs.first_token()
                    tally.feed(chunk)
                await response.write_eof()
            except ConnectionResetError:  # the client went away (before its handler was cancelled)
                obs.outcome = "client_gone"
            except (EngineDisconnected, TimeoutError) as exc:
                await fail_stream(response, exc, replica, obs)
            obs.tokens += tally.tokens()
            return response


async def sse_events(upstream: Exchange) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an engine's SSE stream, until `data: [DONE]`."""
    buffer = b""
    async for chunk in upstream:
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
