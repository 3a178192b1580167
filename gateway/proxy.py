"""The relay: one client request forwarded to an engine, attempt by attempt (the journey, see
gateway.journey, picks the replica of each attempt and decides whether there is another).

`JsonRelay` forwards a non-stream request and passes the answer back whole (as it came, or
reshaped for /generate); `StreamRelay` passes a server-sent event stream through as it arrives:
what the engine sent since the last read is written to the client at once, with no buffering, no
re-chunking and no parsing (events are counted, see gateway.usage), and a stream whose engine
failed goes on from where it broke (see gateway.resume). Engines are called through
gateway.upstream; their failures come out of here as the gateway's typed errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from aiohttp import web

from contract.routes import ReplicaRoute
from gateway.errors import BadRequest, GatewayError, UpstreamError, UpstreamTimeout, error_body
from gateway.metrics import Observation
from gateway.resume import Partial, Splice, StreamLog, continuation, finish_events
from gateway.sse import events, sse
from gateway.upstream import EngineDisconnected, Exchange, UpstreamPool
from gateway.usage import StreamTally, completion_tokens

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class Relay(Protocol):
    """What the journey needs of a relay."""

    @property
    def started(self) -> bool:
        """Bytes reached the client: a failure is resumed rather than replayed, and an error
        can only end the stream (its status went out with the first bytes)."""

    async def attempt(self, replica: ReplicaRoute, obs: Observation) -> web.StreamResponse:
        """Send the request to `replica` and relay its answer; an engine failure raises
        UpstreamError (a timeout UpstreamTimeout, the engine's 4xx BadRequest)."""

    async def give_up(self, error: GatewayError) -> web.StreamResponse:
        """End a started answer with `error`."""


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


def engine_call(pool: UpstreamPool, replica: ReplicaRoute, path: str, body: bytes) -> Exchange:
    """POST `body` to the engine: `async with engine_call(...) as upstream` (inside
    `engine_errors`)."""
    assert replica.url is not None  # ready replicas have one
    return pool.post(replica.url, path, body, replica.api_key)


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


class JsonRelay:
    """A non-stream request: its bytes forwarded as they came, the engine's answer passed back
    as it came, or parsed and reshaped by `reshape` (/generate's answer). Nothing reaches the
    client before the answer is whole, so a failed attempt is simply replayed."""

    __slots__ = ("body", "path", "pool", "reshape")
    started = False

    def __init__(
        self,
        pool: UpstreamPool,
        path: str,
        body: bytes,
        reshape: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.pool = pool
        self.path = path
        self.body = body
        self.reshape = reshape

    async def attempt(self, replica: ReplicaRoute, obs: Observation) -> web.StreamResponse:
        with engine_errors(replica):
            async with engine_call(self.pool, replica, self.path, self.body) as upstream:
                raw = await upstream.read()
        if self.reshape is None:
            check_answer(upstream.status, raw, replica)
            obs.tokens += completion_tokens(raw) or 0
            return web.Response(body=raw, content_type="application/json")
        data = engine_json(upstream.status, raw, replica)
        usage = data.get("usage") or {}
        obs.tokens += int(usage.get("completion_tokens") or 0)
        return web.json_response(self.reshape(data))

    async def give_up(self, error: GatewayError) -> web.StreamResponse:
        raise error  # never started: the error is the answer


def in_band_error(out: bytes) -> tuple[int, str] | None:
    """Where an error event starts in `out` (complete events) and its message: vLLM's way to
    fail a stream that already answered 200. Cheap when there is none: one substring search."""
    if b'"error"' not in out:
        return None
    start = 0
    while start < len(out):
        end = out.find(b"\n\n", start)
        end = len(out) if end < 0 else end + 2
        for data in events(out[start:end]):
            try:
                parsed = json.loads(data)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                return start, str(parsed["error"].get("message", "engine error"))
        start = end
    return None


class StreamRelay:
    """One client stream, across engine attempts: the first attempt sends the request as it
    came; after an engine failure mid-stream the next attempt sends the continuation (see
    gateway.resume) and splices its events in, so the client sees one unbroken stream.

    `convert` reshapes complete engine events before they are written (/generate's own event
    format); without it the engine's bytes go out as they are, unparsed.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        request: web.Request,
        path: str,
        body: dict[str, Any],
        raw: bytes,
        convert: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.pool = pool
        self.request = request
        self.path = path
        self.body = body
        self.raw = raw
        self.convert = convert
        self.chat = path.endswith("/chat/completions")
        self.response: web.StreamResponse | None = None  # prepared: bytes reached the client
        self.log = StreamLog()

    @property
    def started(self) -> bool:
        return self.response is not None

    async def attempt(self, replica: ReplicaRoute, obs: Observation) -> web.StreamResponse:
        request = self.request
        splice: Splice | None = None
        payload = self.raw
        if self.response is not None:  # resuming
            partial = Partial.of(self.log.sent)
            follow = None if partial.finished else continuation(self.path, self.body, partial)
            if follow is None:  # nothing left to generate, or cannot be resumed
                return await self.finish(finish_events(partial, self.chat))
            payload, splice = json.dumps(follow).encode(), Splice(partial, self.chat)
        with engine_errors(replica):
            async with engine_call(self.pool, replica, self.path, payload) as upstream:
                if upstream.status >= 400:
                    check_answer(upstream.status, await upstream.read(), replica)
                if self.response is None:
                    self.response = web.StreamResponse(headers=SSE_HEADERS)
                    await self.response.prepare(request)
                tally = StreamTally()
                try:
                    plain = splice is None and self.convert is None
                    response = self.response
                    async for chunk in upstream:
                        out = self.log.complete(chunk)
                        if not out:
                            continue
                        if b'"error"' in out and (error := in_band_error(out)) is not None:
                            cut, message = error
                            self.log.unsend(cut)
                            await self._write(out[:cut], splice, obs, tally)  # what came before
                            raise UpstreamError(f"engine {replica.id} failed mid-stream: {message}")
                        if plain:  # the hot path: bytes as they came
                            await response.write(out)
                            obs.first_token()
                            tally.feed(out)
                        else:
                            await self._write(out, splice, obs, tally)
                    await self.response.write_eof()
                except ConnectionResetError:  # the client went away (before its handler noticed)
                    obs.outcome = "client_gone"
                obs.tokens += tally.tokens()
                return self.response

    async def _write(
        self, out: bytes, splice: Splice | None, obs: Observation, tally: StreamTally
    ) -> None:
        """Complete engine events to the client: spliced into the stream (a continuation),
        converted (/generate), written."""
        if splice is not None and out:
            out = b"".join(e for d in events(out) if (e := splice.event(d)))
        if self.convert is not None and out:
            out = self.convert(out)
        if out:
            assert self.response is not None
            await self.response.write(out)
            obs.first_token()
            tally.feed(out)

    async def finish(self, tail: bytes) -> web.StreamResponse:
        """End the client's stream with `tail` (already in the client's format)."""
        assert self.response is not None
        if tail:
            await self.response.write(self.convert(tail) if self.convert else tail)
        await self.response.write_eof()
        return self.response

    async def give_up(self, error: GatewayError) -> web.StreamResponse:
        """The stream cannot go on: end it with an error event (its status was sent long ago)."""
        return await self.finish(sse(error_body(error)) + sse("[DONE]"))
