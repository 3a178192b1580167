"""The relay: one client request forwarded to an engine, attempt by attempt (the journey, see
gateway.journey, picks the replica of each attempt and decides whether there is another).

`JsonRelay` forwards a non-stream request and passes the answer back whole (as it came, or
reshaped for /generate); `StreamRelay` passes a server-sent event stream through as it arrives:
what the engine sent since the last read is written to the client at once, with no buffering, no
re-chunking and no parsing (events are counted, see gateway.usage), and a stream whose engine
failed goes on from where it broke (see gateway.resume). Engines are called through
gateway.upstream; their failures come out of here as the gateway's typed errors.

Every streamed piece is searched a few times (an in-band error, the stream's end, usage to
strip: gateway.ending, gateway.usage), so those searches are `piece.find(x) >= 0`, not
`x in piece`: on bytes, `in` first tries `x` as an integer and makes and clears a TypeError,
which cost as much as the search itself (~110 of ~260 ns on a 170-byte piece here).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Protocol

from aiohttp import web

from contract.routes import ReplicaRoute
from gateway.ending import (
    Ending,
    asked_limit,
    asked_tokens,
    ends_stream,
    finish_reasons,
)
from gateway.errors import BadRequest, GatewayError, UpstreamError, UpstreamTimeout, error_body
from gateway.metrics import Observation
from gateway.progress import Attempt
from gateway.resume import (
    Partial,
    Splice,
    StreamLog,
    continuation,
    finish_events,
    not_resumable,
    unfinished,
)
from gateway.sse import events, sse
from gateway.upstream import EngineDisconnected, Exchange, UpstreamPool
from gateway.usage import (
    ENGINE_STREAM_OPTIONS,
    UsageFilter,
    completion_tokens,
    stream_tokens,
    with_engine_usage,
)

log = logging.getLogger("sem.gateway")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class Whole:
    """A whole (non-stream) JSON answer: aiohttp's handler makes it aiohttp's response
    (`as_response`); the front door's own server has written it out as it is the moment the
    relay had it (`Opener.whole`: building aiohttp's response object only to read it back was
    ~3% of a request's CPU, and the request's bookkeeping comes after the client has its
    answer)."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    def as_response(self) -> web.Response:
        return web.Response(body=self.body, content_type="application/json")


# What a relay (and a request's journey) answers: a whole answer, or a stream's response (its
# status and headers sent already) or an error's.
Answer = Whole | web.StreamResponse


class Relay(Protocol):
    """What the journey needs of a relay."""

    @property
    def started(self) -> bool:
        """Bytes reached the client: a failure is resumed rather than replayed, and an error
        can only end the stream (its status went out with the first bytes)."""

    @property
    def streams(self) -> bool:
        """The answer comes piece by piece (a first-byte deadline applies)."""

    async def attempt(self, replica: ReplicaRoute, obs: Observation, watch: Attempt) -> Answer:
        """Send the request to `replica` and relay its answer, beating `watch` as bytes come;
        an engine failure raises UpstreamError (an attempt `watch` abandoned too; a timeout
        UpstreamTimeout, the engine's 4xx BadRequest)."""

    async def give_up(self, error: GatewayError) -> Answer:
        """End a started answer with `error`."""


def gateway_error(
    exc: BaseException, replica: ReplicaRoute, watch: Attempt | None = None
) -> GatewayError | None:
    """`exc` as the gateway's typed error: network failures and timeouts of an engine call become
    502 and 504, an attempt its watch abandoned (gateway.progress: a stall, the first-byte
    deadline; cancelled by a TimeoutError) 502, which is retried; gateway errors stay as they
    are; anything else is None."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, EngineDisconnected):  # its address goes to the log, not to the client
        log.warning("engine %s (%s): %s", replica.id, replica.url, exc)
        return UpstreamError(f"engine {replica.id} unreachable")
    if isinstance(exc, TimeoutError):
        if watch is not None and watch.reason is not None:
            return UpstreamError(f"engine {replica.id} {watch.reason}")
        return UpstreamTimeout(f"engine {replica.id} did not answer in time")
    return None


class engine_errors:  # used like a function: `with engine_errors(replica, watch):`
    """Network failures and timeouts of an engine call, and an attempt abandoned by its `watch`
    (before it began too), raised as the gateway's typed errors."""

    __slots__ = ("_replica", "_watch")

    def __init__(self, replica: ReplicaRoute, watch: Attempt | None = None) -> None:
        self._replica = replica
        self._watch = watch

    def __enter__(self) -> None:
        if self._watch is not None and self._watch.reason is not None:
            raise UpstreamError(f"engine {self._replica.id} {self._watch.reason}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        error = None if exc is None else gateway_error(exc, self._replica, self._watch)
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

    __slots__ = ("body", "opener", "path", "pool", "reshape")
    started = False
    streams = False

    def __init__(
        self,
        pool: UpstreamPool,
        opener: Opener,
        path: str,
        body: bytes,
        reshape: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.pool = pool
        self.opener = opener
        self.path = path
        self.body = body
        self.reshape = reshape

    async def attempt(self, replica: ReplicaRoute, obs: Observation, watch: Attempt) -> Answer:
        with engine_errors(replica, watch), watch.guard:
            async with engine_call(self.pool, replica, self.path, self.body) as up:
                raw = await up.read()
        upstream = up
        watch.beat()
        if upstream.status < 400 and (cut := cut_answer(self.body, raw)) is not None:
            raise UpstreamError(f"engine {replica.id} {cut}")
        if self.reshape is None:
            check_answer(upstream.status, raw, replica)
            answer = self.opener.whole(raw)
            obs.tokens += completion_tokens(raw) or 0  # counted once the client has it
            return answer
        data = engine_json(upstream.status, raw, replica)
        usage = data.get("usage") or {}
        obs.tokens += int(usage.get("completion_tokens") or 0)
        return self.opener.whole(json.dumps(self.reshape(data)).encode())

    async def give_up(self, error: GatewayError) -> Answer:
        raise error  # never started: the error is the answer


def cut_answer(request: bytes, answer: bytes) -> str | None:
    """Why a whole (non-stream) answer is not the model's end (gateway.ending); None if it is.
    Byte-level: the request's token limit and the answer's finish and usage, unparsed."""
    reasons = finish_reasons(answer)
    if "abort" not in reasons and (not reasons or "stop" in reasons):
        return None  # the model stopped
    asked = asked_limit(request)
    return Ending(reasons, completion_tokens(answer), asked, len(reasons), True).cut()


def in_band_error(out: bytes, view: str) -> tuple[int, str] | None:
    """Where an error event starts in `out` (complete events; `view`: as latin-1, see
    gateway.ending.ends_stream) and its message: vLLM's way to fail a stream that already
    answered 200. Cheap when there is none: one substring search."""
    if view.find('"error"') < 0:
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


class Opener(Protocol):
    """Answers the client: through aiohttp's response (`AnswerOn`) or the front door's own
    server (gateway.fastpath)."""

    async def open(self) -> tuple[web.StreamResponse, ClientSocket | None]:
        """A stream's answer, its status and headers sent; and its socket when the relay may
        write to it directly (see ClientSocket)."""

    def whole(self, body: bytes) -> Whole:
        """A whole answer: sent now where the server can (the front door's), else for the
        handler to send."""


class AnswerOn:
    """A stream's answer through aiohttp's server, to `request`'s client."""

    __slots__ = ("request",)

    def __init__(self, request: web.Request) -> None:
        self.request = request

    async def open(self) -> tuple[web.StreamResponse, ClientSocket | None]:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(self.request)
        return response, ClientSocket.of(self.request, response)

    def whole(self, body: bytes) -> Whole:
        return Whole(body)  # the handler returns it: aiohttp sends it after


# The head of a chunk of each size up to 4 KiB (a streamed piece is a few hundred bytes), made
# once: concatenating costs a third of what formatting it does, on every piece.
_CHUNK_HEADS: Final = [b"%x\r\n" % size for size in range(4096)]


def http_chunk(data: bytes) -> bytes:
    """`data` as one chunk of an HTTP/1.1 chunked body."""
    size = len(data)
    head = _CHUNK_HEADS[size] if size < len(_CHUNK_HEADS) else b"%x\r\n" % size
    return head + data + b"\r\n"


# Bytes unsent to a client past which its stream goes through aiohttp's writer and its drain.
_CLIENT_HIGH_WATER: Final = 64 * 1024


class ClientSocket:
    """A prepared streaming answer's socket, written directly (HTTP/1.1 chunks framed here, as
    aiohttp's writer would): one `transport.write` per engine read, with no coroutine and no
    wake-up. Used only while the client keeps up; otherwise the answer's own (draining) writer
    takes over."""

    __slots__ = ("_transport",)

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    @classmethod
    def of(cls, request: web.Request, response: web.StreamResponse) -> ClientSocket | None:
        """None unless the answer goes out in chunks (HTTP/1.1, uncompressed)."""
        transport = request.transport
        chunked = response.headers.get("Transfer-Encoding") == "chunked"
        if transport is None or not chunked or "Content-Encoding" in response.headers:
            return None
        return cls(transport)

    def ready(self) -> bool:
        transport = self._transport
        return not transport.is_closing() and transport.get_write_buffer_size() < _CLIENT_HIGH_WATER

    def write(self, data: bytes) -> None:
        if data:
            self._transport.write(http_chunk(data))


class StreamRelay:
    """One client stream, across engine attempts: the first attempt sends the request as it
    came; after an engine failure mid-stream the next attempt sends the continuation (see
    gateway.resume) and splices its events in, so the client sees one unbroken stream.

    The engine is asked for usage in every chunk (gateway.usage), which is stripped from what
    the client gets unless it asked for it. The stream's end (its finish and [DONE]) is held back
    until the engine closes the stream and judged (gateway.ending): an end that is not the
    model's is a failure, resumed like a broken stream.

    `convert` reshapes complete engine events before they are written (/generate's own event
    format); without it the engine's bytes go out as they are, unparsed.
    """

    streams = True

    def __init__(
        self,
        pool: UpstreamPool,
        opener: Opener,
        path: str,
        body: dict[str, Any],
        raw: bytes,
        convert: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.pool = pool
        self.opener = opener
        self.socket: ClientSocket | None = None
        self.path = path
        self.body = body
        self.raw = with_engine_usage(raw, body)
        self.convert = convert
        self.chat = path.endswith("/chat/completions")
        self.response: web.StreamResponse | None = None  # prepared: bytes reached the client
        self.log = StreamLog()  # the current attempt's events, as the engine sent them
        self.before = Partial()  # what the attempts before it sent
        self.usage = UsageFilter(body)
        self.choices = int(body.get("n") or 1)
        self.asked = asked_tokens(path, body)

    @property
    def started(self) -> bool:
        return self.response is not None

    async def attempt(self, replica: ReplicaRoute, obs: Observation, watch: Attempt) -> Answer:
        splice: Splice | None = None
        payload = self.raw
        if self.response is not None:  # resuming
            self.before = self.before.then(Partial.of(self.log.sent))
            self.log = StreamLog()
            partial = self.before
            if partial.finished:  # nothing left but [DONE]
                return await self.finish(finish_events(partial, self.chat))
            if (why := not_resumable(self.path, self.body)) is not None:
                return await self.give_up(UpstreamError(f"the engine failed the stream; {why}"))
            follow = continuation(self.path, self.body, partial)
            if follow is None:  # every token asked for was sent
                return await self.finish(finish_events(partial, self.chat))
            follow["stream_options"] = {**(follow.get("stream_options") or {}),
                                        **ENGINE_STREAM_OPTIONS}  # fmt: skip
            payload, splice = json.dumps(follow).encode(), Splice(partial, self.chat)
        with engine_errors(replica, watch), watch.guard:
            return await self._relay(replica, obs, watch, payload, splice)

    async def _relay(
        self,
        replica: ReplicaRoute,
        obs: Observation,
        watch: Attempt,
        payload: bytes,
        splice: Splice | None,
    ) -> web.StreamResponse:
        async with engine_call(self.pool, replica, self.path, payload) as upstream:
            if upstream.status >= 400:
                check_answer(upstream.status, await upstream.read(), replica)
            if self.response is None:
                self.response, self.socket = await self.opener.open()
            held = b""  # the stream's end, held back until the engine closes it
            by_finish = self.choices == 1  # n > 1: choices finish one by one; hold [DONE] only
            log, usage = self.log, self.usage
            plain = splice is None and self.convert is None
            client = self.socket if plain else None

            def take(chunk: bytes) -> bytes:
                """Every engine read, in the engine connection's callback: the hot path writes
                its complete events to the client's socket at once (less unasked usage) and
                leaves nothing; the rest (an end, an error, a slow client, a resume's splice,
                /generate) is left to the loop below, in order."""
                watch.beat()
                out = log.complete(chunk)
                if not out:
                    return b""
                view = out.decode("latin-1")  # what every check scans (gateway.ending)
                if (client is not None and not held and not upstream.pending and client.ready()
                        and view.find('"error"') < 0
                        and not ends_stream(view, by_finish)):  # fmt: skip
                    client.write(usage.strip(out, view))
                    obs.first_token()
                    return b""
                return out

            upstream.on_hold = watch.held_back
            upstream.pipe(take)
            try:
                async for out in upstream:
                    view = out.decode("latin-1")
                    if (error := in_band_error(out, view)) is not None:
                        cut, message = error
                        log.unsend(len(out) - cut)  # `out`: the log's last bytes
                        await self._write(held + out[:cut], splice, obs)  # what came before
                        raise UpstreamError(f"engine {replica.id} failed mid-stream: {message}")
                    if held or ends_stream(view, by_finish):
                        held += out
                    else:
                        await self._write(out, splice, obs, view)
                if (cut_reason := self._judge(held, watch)) is not None:
                    self.log.drop_ending(held)  # the client never saw the fake end
                    await self._write(unfinished(held), splice, obs)
                    raise UpstreamError(f"engine {replica.id} {cut_reason}")
                last = self._outgoing(held, splice)
                await self.response.write_eof(last)  # its last events and its end: one write
                if last:
                    obs.first_token()
            except ConnectionResetError:  # the client went away (before its handler noticed)
                obs.outcome = "client_gone"
            except BaseException:  # abandoned, cancelled, failed: what `take` logged and left
                log.unsend(upstream.unread)  # to this loop never reached the client: a resume
                raise  # sends it again
            obs.tokens += stream_tokens(log.parts)
            return self.response

    def _judge(self, held: bytes, watch: Attempt) -> str | None:
        """Why the end the engine just gave is not the model's (gateway.ending); None if it
        is. Cheap: the held tail only, and a token count only when one is asked."""
        counted = completion_tokens(held)
        if counted is None and self.choices == 1 and self.asked is not None:
            counted = Partial.of(self.log.sent).tokens  # an engine that sent no usage
        ending = Ending(
            reasons=finish_reasons(held),
            tokens=None if counted is None else self.before.tokens + counted,
            asked=self.asked, choices=self.choices, replica_ready=watch.still_ready(),
        )  # fmt: skip
        return ending.cut()

    def _outgoing(self, out: bytes, splice: Splice | None, view: str | None = None) -> bytes:
        """Complete engine events as the client gets them: unasked usage stripped, spliced into
        the stream (a continuation), converted (/generate). `view`: `out` as latin-1."""
        out = self.usage.strip(out, view)
        if splice is not None and out:
            out = b"".join([e for d in events(out) if (e := splice.event(d))])
        if self.convert is not None and out:
            out = self.convert(out)
        return out

    async def _write(
        self, out: bytes, splice: Splice | None, obs: Observation, view: str | None = None
    ) -> None:
        """Complete engine events to the client (`_outgoing`), written."""
        if out := self._outgoing(out, splice, view):
            assert self.response is not None
            await self.response.write(out)
            obs.first_token()

    async def finish(self, tail: bytes) -> web.StreamResponse:
        """End the client's stream with `tail` (already in the client's format), in one write."""
        assert self.response is not None
        await self.response.write_eof(self.convert(tail) if self.convert and tail else tail)
        return self.response

    async def give_up(self, error: GatewayError) -> web.StreamResponse:
        """The stream cannot go on: end it with an error event (its status was sent long ago)."""
        return await self.finish(sse(error_body(error)) + sse("[DONE]"))
