"""The front door's own HTTP/1.1 server for the hot routes (the completions and /generate), in
front of aiohttp's: what a request costs in aiohttp's server (its request and response objects,
routing, a task per request started a loop turn later) was as much as the whole Rust router's
cost per request (docs/benchmarks.md). Here a request's head is parsed by httptools (llhttp, in
C) into a dict, its body sliced from the bytes read, and its answer written to the socket in one
call the moment the relay has it (the request's bookkeeping comes after, off the client's
wait); the route's answer (gateway.app) is the same code aiohttp's handlers call.

Only the plain case takes this path: a `POST` to a hot route over HTTP/1.1, kept alive, with a
`Content-Length` within `--max-body`, whose whole body came with its head, and no
`Expect`/`Transfer-Encoding`/`Upgrade`. Anything else (another route, a chunked or trickled
body, a malformed head) hands the connection to aiohttp's server for the rest of its life,
with every byte read since the request began: it answers exactly as it always has, its limits
and timeouts included. A kept-alive connection goes on here request after request.

What the front door's middleware does for aiohttp (gateway.frontdoor) is done here too: the
body's share of the memory budget for the whole request, errors in the gateway's one shape; a
client that disconnects cancels its request (its engine exchange closes, vLLM aborts); a
stopping gateway lets requests in flight finish (`FrontDoor.drain`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from typing import TYPE_CHECKING, ClassVar

import httptools
from aiohttp import web

from gateway.errors import GatewayError, error_response
from gateway.proxy import Answer, ClientSocket, Opener, Whole, http_chunk

if TYPE_CHECKING:
    from gateway.frontdoor import Connection, FrontDoor

log = logging.getLogger("sem.gateway")

# A hot route's answer, on either server: (headers by lower-case name, body, how to open a
# stream's answer) -> the answer.
Route = Callable[[Mapping[str, str], bytes, Opener], Awaitable[Answer]]

MAX_HEAD = 16 * 1024  # bytes without a complete head: aiohttp's server takes it (and refuses it)
PIPELINED = 64 * 1024  # bytes read ahead while a request is served: then reading pauses
_NOT_PLAIN = ("transfer-encoding", "expect", "upgrade")
_LENGTH = "content-length"
_SKIPPED = frozenset({"content-length", "transfer-encoding", "connection", "date"})
_JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n\r\n"
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nDate: %s\r\n\r\n"
)


class _Date:
    """The Date header, formatted once a second."""

    second: ClassVar[int] = -1
    value: ClassVar[bytes] = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


class _Head:
    """httptools' callbacks for one request head."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")


def plain_request(head: bytes, max_body: int) -> tuple[bytes, dict[str, str], int] | None:
    """A complete request head (up to its blank line) as (path, headers, body length) when it
    may take the fast path; None when aiohttp's server must have it."""
    parsed = _Head()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(head)
    except httptools.HttpParserError:
        return None
    headers = parsed.headers
    if (
        parser.get_method() != b"POST"
        or parser.get_http_version() != "1.1"
        or not parser.should_keep_alive()
        or any(name in headers for name in _NOT_PLAIN)
    ):
        return None
    length = headers.get(_LENGTH, "")
    if not length.isdigit() or int(length) > max_body:
        return None
    return parsed.url, headers, int(length)


def whole_answer(response: web.StreamResponse) -> bytes:
    """aiohttp's whole (non-stream) response (an error's) as the bytes of an HTTP/1.1 one."""
    assert isinstance(response, web.Response)
    body = response.body
    assert isinstance(body, bytes), "the gateway's whole answers are bytes"
    lines = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason.encode("latin-1"))]
    lines.extend(
        f"{name}: {value}\r\n".encode("latin-1")
        for name, value in response.headers.items()
        if name.lower() not in _SKIPPED
    )
    lines.append(b"Content-Length: %d\r\nDate: %s\r\n\r\n" % (len(body), _Date.now()))
    lines.append(body)
    return b"".join(lines)


class RawStream(web.StreamResponse):
    """A stream's answer on the fast path: aiohttp's type (what the relay and the journey pass
    around), written by the front door's own server."""

    def __init__(self, answer: RawAnswer) -> None:
        super().__init__()
        self._answer = answer

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._answer.send(bytes(data))

    async def write_eof(self, data: bytes = b"") -> None:
        await self._answer.send(bytes(data), last=True)


class RawAnswer:
    """The fast path of one client connection: it takes requests one after another while
    they are plain (see the module) and hands the connection to aiohttp's server otherwise."""

    __slots__ = (
        "_answered", "_buffer", "_conn", "_door", "_drained", "_idle", "_loop", "_paused",
        "_reading_paused", "_task", "_transport",
    )  # fmt: skip

    def __init__(
        self,
        conn: Connection,
        door: FrontDoor,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._conn = conn
        self._loop = loop  # the connection's (each get_running_loop is a system call on 3.11)
        self._door = door
        self._transport = transport
        self._buffer = b""  # read, not yet taken: the next request's bytes
        self._task: asyncio.Task[None] | None = None  # the request being served
        self._idle: asyncio.TimerHandle | None = None
        self._paused = False  # the client's socket buffers are full
        self._reading_paused = False  # the client sent more than PIPELINED ahead
        self._drained: asyncio.Future[None] | None = None
        self._answered = False  # the request being served has had its whole answer

    # -- reading -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        if self._task is None:
            self._next()
        elif len(self._buffer) > PIPELINED and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def _next(self) -> None:
        """Take the next request from the bytes read, if it is whole; else wait or hand over."""
        data = self._buffer
        end = data.find(b"\r\n\r\n") + 4
        if end == 3:  # no complete head yet; the keep-alive timer goes on meanwhile, as
            if len(data) > MAX_HEAD:  # aiohttp's: a trickled head does not hold a connection
                self._hand_over(data)
            return
        plain = plain_request(data[:end], self._door.limits.max_body)
        route = None if plain is None else self._door.fast_routes.get(plain[0])
        if plain is None or route is None or len(data) < end + plain[2]:
            self._hand_over(data)  # not plain, or its body is still coming
            return
        self._stop_idle()
        _, headers, length = plain
        body, self._buffer = data[end : end + length], data[end + length :]
        self._conn.headers_complete()
        serve = self._serve(plain[0], route, headers, body)
        task = self._loop.create_task(serve)
        self._task = task
        self._door.serving.add(task)
        task.add_done_callback(self._door.serving.discard)

    def _hand_over(self, data: bytes) -> None:
        self._stop_idle()
        self._conn.hand_over(data)

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    async def _serve(
        self, path: bytes, route: Route, headers: Mapping[str, str], body: bytes
    ) -> None:
        door, transport = self._door, self._transport
        response: Answer | None = None
        try:
            try:
                async with door.bodies.hold(len(body), door.limits.body_timeout):
                    response = await route(headers, body, self)
            except GatewayError as exc:
                if self._answered:  # the answer went out: what failed after it is a bug
                    raise
                response = error_response(exc)
            if isinstance(response, Whole):
                if not self._answered:  # not written yet by the relay (`whole`)
                    self.whole(response.body)
            elif not isinstance(response, RawStream):
                transport.write(whole_answer(response))
        except asyncio.CancelledError:
            transport.abort()  # the client left, or the gateway is stopping: nothing to finish
            raise
        except ConnectionResetError:  # the client left as its answer was written
            transport.abort()
            return
        except Exception:
            log.exception("request to %s failed", path.decode("latin-1"))
            transport.abort()  # a status may have gone out already: the connection ends here
            return
        finally:
            self._task = None
            self._answered = False
        if transport.is_closing():
            return
        if door.stopping:  # no next request: as aiohttp's server does, close after the answer
            transport.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._buffer:
            self._next()
        else:
            timeout = door.limits.keepalive_timeout
            self._idle = self._loop.call_later(timeout, transport.close)

    # -- writing a stream (RawStream, and gateway.proxy through the Opener protocol) -----------

    def whole(self, body: bytes) -> Whole:
        self._transport.write(_JSON_HEAD % (len(body), _Date.now()) + body)
        self._answered = True
        return Whole(body)

    async def open(self) -> tuple[web.StreamResponse, ClientSocket | None]:
        self._transport.write(_SSE_HEAD % _Date.now())
        return RawStream(self), ClientSocket(self._transport)

    async def send(self, data: bytes, last: bool = False) -> None:
        transport = self._transport
        if transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        out = http_chunk(data) if data else b""
        if last:
            out += b"0\r\n\r\n"
        if out:
            transport.write(out)
        if self._paused:
            self._drained = self._loop.create_future()
            await self._drained

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- the end -------------------------------------------------------------------------------

    def lost(self) -> None:
        """The connection is gone: its request, if any, is cancelled."""
        self._stop_idle()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("the client went away"))
        if self._task is not None:
            self._task.cancel()

    def close_if_idle(self) -> None:
        if self._task is None:
            self._transport.close()
