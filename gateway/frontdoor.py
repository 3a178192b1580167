"""The front door: every client connection watched from accept to close, so that no client can
hold a slot, a file descriptor or memory by being slow (see gateway.limits for the limits).

Each connection is a thin `Connection`: the hot routes' plain requests are served by the front
door's own server (gateway.fastpath) until one is not plain, and from then on aiohttp's protocol
gets everything. Either way the connection watches three things aiohttp does not:

- the cap on open connections (`max_connections`): one over it is closed at accept, with a log
  line (one per 10 s at most, with the count). Not a 503: answering needs the request's headers
  read first, which is exactly what a flood of stalled connections never finishes; closing at
  once keeps the descriptors in use at the cap, and HTTP clients (the OpenAI SDK among them)
  retry a connection that was closed before any answer;
- the first request's headers must be complete within `header_timeout` of the accept (later
  requests on a kept-alive connection are bounded by aiohttp's keep-alive timer, which runs from
  the end of the previous answer and is not reset by partial headers);
- a client that leaves what it was sent unread for `client_write_timeout` (its socket buffers
  full, the transport paused) loses its connection: its handler is cancelled, which closes its
  engine exchange (vLLM then aborts the generation) and frees its slot. This is nginx's
  `send_timeout`, and it costs the relay nothing: the timer runs only while writing is paused.

Request bodies (size, pace, memory) are gateway.body's; the middleware here applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.body import BodyBudget, declared_size
from gateway.errors import GatewayError, InvalidRequest, error_response
from gateway.fastpath import RawAnswer, Route
from gateway.limits import Limits

log = logging.getLogger("sem.gateway")
REFUSAL_LOG_EVERY = 10.0  # s between two log lines about refused connections

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Closed(enum.Enum):
    """Why the front door closed a connection (the `reason` metrics label)."""

    OVER_CAP = "max_connections"
    HEADERS = "header_timeout"
    NOT_READING = "client_write_timeout"


class FrontDoor:
    """The client connections of one gateway: counted, capped and timed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.cap = limits.connections
        self.bodies = BodyBudget(limits.max_body_memory)
        self.open = 0
        self.closed = dict.fromkeys(Closed, 0)
        self._connections: dict[RequestHandler, Connection] = {}
        # The hot routes the front door serves itself (gateway.fastpath), by path; set by the
        # app. Empty: every request goes to aiohttp's server.
        self.fast_routes: dict[bytes, Route] = {}
        self.serving: set[asyncio.Task[None]] = set()  # fast-path requests in flight
        self.shutdown_timeout = 10.0  # s the fast path's requests get to finish when stopping
        self.stopping = False
        self._draining: asyncio.Task[None] | None = None  # see `stop`
        self._emptied: asyncio.Future[None] | None = None  # stopping: the last connection went
        self._refused_since_log = 0
        self._last_refusal_log = 0.0

    def protocols(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for `loop.create_server`: aiohttp's, behind the watch."""
        return lambda: Connection(self, server())

    async def listen(
        self, runner: web.AppRunner, host: str, port: int, sock: socket.socket | None = None
    ) -> asyncio.Server:
        """Accept connections for `runner`'s app (set up) on host:port, or on `sock` (a
        listening socket inherited from `sem run`, which keeps it open across gateway
        restarts); the caller closes the server before cleaning the runner up."""
        assert runner.server is not None, "runner.setup() first"
        loop = asyncio.get_running_loop()
        if sock is not None:
            return await loop.create_server(self.protocols(runner.server), sock=sock, backlog=4096)
        return await loop.create_server(
            self.protocols(runner.server), host, port, backlog=4096, reuse_address=True
        )

    def stop(self) -> None:
        """The gateway stops (aiohttp's on_shutdown): the fast path drains (`drain`, within
        `shutdown_timeout`) while aiohttp's server drains its own requests within the same time,
        not one after the other; `drained` waits for it (aiohttp's on_cleanup)."""
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(
                self.drain(self.shutdown_timeout), name="fast-path-drain"
            )

    async def drained(self) -> None:
        if self._draining is not None:
            await self._draining

    async def drain(self, timeout: float) -> None:
        """Stopping: close the fast path's idle connections and let its requests in flight
        finish within `timeout` s, as aiohttp's server meanwhile does for its own; then cancel
        what is left of both. (aiohttp's server alone, past `timeout`, cancels its requests and
        waits `timeout` again for them to end, which a stream does only when its connection
        closes: so the connections still open at the deadline are closed here.)"""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for conn in list(self._connections.values()):
            if conn.fast is not None:
                conn.fast.close_if_idle()
        if self.serving:
            _, late = await asyncio.wait(set(self.serving), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._connections and (left := deadline - loop.time()) > 0:
            self._emptied = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied, left)
        for conn in list(self._connections.values()):
            conn.abort()  # aiohttp's handler is cancelled with it (handler_cancellation)

    def admit(self, conn: Connection) -> bool:
        if self.open >= self.cap:
            self._refused(conn)
            return False
        self.open += 1
        self._connections[conn.handler] = conn
        return True

    def gone(self, conn: Connection) -> None:
        self.open -= 1
        self._connections.pop(conn.handler, None)
        if not self._connections and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    def request_started(self, handler: RequestHandler) -> None:
        conn = self._connections.get(handler)
        if conn is not None:
            conn.headers_complete()

    def _refused(self, conn: Connection) -> None:
        self.closed[Closed.OVER_CAP] += 1
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_EVERY:
            log.warning("%d connection(s) closed at accept: %d open, the cap (--max-connections)",
                        self._refused_since_log, self.open)  # fmt: skip
            self._last_refusal_log, self._refused_since_log = now, 0

    def collector(self) -> Collector:
        return _DoorCollector(self)


class Connection(asyncio.Protocol):
    """One client connection, and two timers: served by the front door's fast path
    (gateway.fastpath) while its requests are plain, then by aiohttp's handler, forwarded
    every event."""

    __slots__ = (
        "_door", "_header_timer", "_transport", "_write_timer", "admitted", "fast", "handler",
    )  # fmt: skip

    def __init__(self, door: FrontDoor, handler: RequestHandler) -> None:
        self._door = door
        self.handler = handler
        self.fast: RawAnswer | None = None  # None: aiohttp's handler has the connection
        self.admitted = False
        self._transport: asyncio.Transport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self._door.admit(self):
            transport.abort()
            return
        self.admitted = True
        self._transport = transport
        loop = asyncio.get_running_loop()
        timeout = self._door.limits.header_timeout
        self._header_timer = loop.call_later(timeout, self._close, Closed.HEADERS)
        if self._door.fast_routes:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # as aiohttp's handler does: answers go out at once
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fast = RawAnswer(self, self._door, transport, loop)
        else:
            self.handler.connection_made(transport)

    def hand_over(self, data: bytes) -> None:
        """aiohttp's handler takes the connection from here, `data` (what was read since the
        current request began) first."""
        assert self._transport is not None
        self.fast = None
        self.handler.connection_made(self._transport)
        if data:
            self.handler.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.fast is not None:
            self.fast.feed(data)
        else:
            self.handler.data_received(data)

    def eof_received(self) -> None:
        if self.fast is None:
            self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self._cancel_timers()
        self._door.gone(self)
        if self.fast is not None:
            self.fast.lost()
        else:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.fast is not None:
            self.fast.pause()
        else:
            self.handler.pause_writing()
        timeout = self._door.limits.client_write_timeout
        loop = asyncio.get_running_loop()
        self._write_timer = loop.call_later(timeout, self._close, Closed.NOT_READING)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self.fast is not None:
            self.fast.resume()
        else:
            self.handler.resume_writing()

    def headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._write_timer = None

    def _close(self, why: Closed) -> None:
        """Abort the connection (not a graceful close: its buffers would never drain)."""
        self._door.closed[why] += 1
        transport = self._transport
        if transport is None:
            return
        peer, limits = transport.get_extra_info("peername"), self._door.limits
        if why is Closed.NOT_READING:
            log.warning("client %s read nothing for %gs: connection closed"
                        " (--client-write-timeout)", peer, limits.client_write_timeout)  # fmt: skip
        else:
            log.info("client %s: no complete request headers within %gs: connection closed"
                     " (--header-timeout)", peer, limits.header_timeout)  # fmt: skip
        transport.abort()


class _DoorCollector(Collector):
    def __init__(self, door: FrontDoor) -> None:
        self._door = door

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        door = self._door
        yield GaugeMetricFamily("sem_gateway_connections", "Client connections open",
                                value=door.open)  # fmt: skip
        yield GaugeMetricFamily("sem_gateway_body_bytes_held", "Request body bytes held",
                                value=door.bodies.held)  # fmt: skip
        closed = CounterMetricFamily(
            "sem_gateway_connections_closed", "Client connections the front door closed",
            labels=["reason"],
        )  # fmt: skip
        for why, count in door.closed.items():
            closed.add_metric([why.value], count)
        yield closed


def middleware_for(door: FrontDoor) -> Middleware:
    """The app's one middleware: it ends a connection's header timer, holds each request
    body's share of the memory budget for the whole request, and answers every error in the
    gateway's one shape (gateway.errors). One layer, not one per job: each costs a coroutine
    per request."""

    @web.middleware
    async def front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            door.request_started(request.protocol)
            size = declared_size(request, door.limits) if request.body_exists else 0
            if not size:
                return await handler(request)
            async with door.bodies.hold(size, door.limits.body_timeout):
                return await handler(request)
        except GatewayError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(InvalidRequest(exc.reason, status=exc.status))

    return front_door
