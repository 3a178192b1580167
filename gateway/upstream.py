"""The gateway's HTTP/1.1 client for the engines: keep-alive connections pooled per engine, on
plain asyncio protocols, responses parsed by httptools (llhttp, in C).

It does only what the hot path needs: POST a JSON body, then the status, then the body, whole or
piece by piece as it arrives. Measured against aiohttp's ClientSession it costs a fraction of the
CPU per request (see docs/benchmarks.md). Deliberately left out, because the engines are local
vLLM servers that need none of it:

- plain `http://host:port[/prefix]` only: no TLS (an `https` URL is refused), no proxies (the
  environment's HTTP_PROXY is not read), no authentication, no cookies;
- HTTP/1.1 only (no HTTP/2), one exchange at a time per connection (no pipelining);
- POST only, with a `Content-Length` body sent in one write (no chunked request bodies, no
  `Expect: 100-continue`) and fixed headers (Host, Content-Type: application/json,
  Accept-Encoding: identity, so no compressed answers and no decompression);
- the answer's status and body only: its headers are not exposed, redirects are not followed
  (a 3xx is returned like any status), and a body may be sized, chunked or end with the socket.

Ownership: the pool owns its idle connections (and closes them in `close()`); an `Exchange` owns
its connection while it runs and gives it back to the pool only when the engine's answer was read
to the end on a connection that stays open. Anything else (an error, a timeout, a caller that
leaves early, e.g. a client that disconnected) closes it, which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

from gateway.loop import OnLoop

# Above this many bytes read ahead of the caller, stop reading from the engine until it catches up.
_HIGH_WATER: Final = 256 * 1024


class EngineDisconnected(Exception):
    """The engine closed the connection (or it failed) before its answer was complete. (Not an
    OSError: mypyc compiles no subclass of those, and nothing here catches it as one.)"""


class _Connection(asyncio.Protocol):
    """One TCP connection to an engine; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.reading_paused = False
        self._until_eof = False  # a body without length or chunking: it ends when the socket does

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if exchange is not None:
                exchange.flush()  # what came before the malformed part, in order
            self.fail(EngineDisconnected(f"malformed HTTP answer: {exc}"))
            return
        if exchange is not None:
            exchange.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self._until_eof and exchange.status:
            exchange.finish()
        else:
            exchange.fail(EngineDisconnected(f"engine closed the connection ({exc or 'EOF'})"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._until_eof = False

    def on_message_begin(self) -> None:
        self._until_eof = True

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.headers_received(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.feed(body)

    def on_message_complete(self) -> None:
        self._until_eof = False
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.finish()
        self.resume()
        if self._parser.should_keep_alive():
            self._pool.put_idle(self)
        else:
            self.close()

    # -- used by the exchange and the pool ---------------------------------------------------

    def send(self, exchange: Exchange, request: bytes) -> None:
        assert self.transport is not None
        self.exchange = exchange
        self._until_eof = False
        self.transport.write(request)

    def fail(self, exc: BaseException) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.fail(exc)
        self.close()

    def pause(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
            if self.exchange is not None and self.exchange.on_hold is not None:
                self.exchange.on_hold(True)

    def resume(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
            if self.exchange is not None and self.exchange.on_hold is not None:
                self.exchange.on_hold(False)

    def close(self) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.transport is not None:
            self.transport.close()


Sink = Callable[[bytes], bytes]


class Exchange:
    """One request and its answer. `async with pool.post(...) as exchange`: on entry the status
    is known; then `await exchange.read()` or `async for chunk in exchange`.

    A streaming caller may also `pipe` the body to a sink: a function called in the connection's
    own callback with all the body one socket read brought (one call per read, in order), which
    returns what it leaves to the caller's `async for` (b"": nothing). A stream relayed that way
    costs no task wake-up per read (see gateway.proxy)."""

    def __init__(
        self, pool: UpstreamPool, base_url: str, path: str, body: bytes, api_key: str | None
    ) -> None:
        self._pool = pool
        self._base_url = base_url
        self._api_key = api_key
        self._path = path
        self._body = body
        self.status = 0
        self._conn: _Connection | None = None
        self._chunks: list[bytes] = []
        self._gathered: list[bytes] = []  # body pieces of the current socket read, for the sink
        self._sink: Sink | None = None
        # Told True when reading from the engine stops because the caller is behind, False when
        # it goes on: the engine's silence meanwhile is the gateway's doing (gateway.progress).
        self.on_hold: Callable[[bool], None] | None = None
        self._buffered = 0
        self._high_water = float(_HIGH_WATER)
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.received = False  # any byte of the answer came

    async def __aenter__(self) -> Exchange:
        self._timer = self._pool.loop.call_later(self._pool.timeout, self._time_out)
        try:
            await self._start()
        except BaseException:
            self._end()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end()

    async def _start(self) -> None:
        """Send the request and wait for the status. A reused connection that the engine closed
        before answering a single byte (its keep-alive ran out) is retried once on a new one."""
        target = self._pool.target(self._base_url, self._api_key)
        request = b"%sContent-Length: %d\r\n\r\n%s" % (
            target.head(self._path),
            len(self._body),
            self._body,
        )
        conn, reused = self._pool.idle(target.key), True
        if conn is None:
            conn, reused = await self._pool.connect(target), False
        while True:
            self._conn = conn
            conn.send(self, request)
            try:
                await self._wait()
                return
            except EngineDisconnected:
                if not reused or self.received:
                    raise
            self._error = None
            conn, reused = await self._pool.connect(target), False

    def _end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, self._conn = self._conn, None
        if conn is not None and conn.exchange is self:  # left before the answer was complete
            conn.exchange = None
            conn.close()

    # -- reading the answer ------------------------------------------------------------------

    async def read(self) -> bytes:
        """The whole body."""
        self._high_water = float("inf")  # the caller wants it all: no reason to hold the engine
        if self._conn is not None:
            self._conn.resume()
        while not self._done:
            await self._wait()
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    def pipe(self, sink: Sink) -> None:
        """From now on, body pieces go through `sink` first (see the class); what came with the
        status, before this call, goes through it now."""
        self._sink = sink
        if self._chunks:
            self._gathered, self._chunks, self._buffered = self._chunks, [], 0
            if self._conn is not None:
                self._conn.resume()
            self.flush()

    @property
    def pending(self) -> bool:
        """Body is waiting for the caller's `async for` (the sink left it, or there is none)."""
        return bool(self._chunks)

    @property
    def unread(self) -> int:
        """Bytes of body waiting for the caller (what it leaves behind if it stops now)."""
        return sum(len(chunk) for chunk in self._chunks)

    def __aiter__(self) -> Exchange:
        return self

    async def __anext__(self) -> bytes:
        """What arrived since the last call (at least one byte), as one piece."""
        while not self._chunks:
            if self._done:
                raise StopAsyncIteration
            await self._wait()
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if self._conn is not None:
            self._conn.resume()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _wait(self) -> None:
        self._raise_failure()
        self._waiter = self._pool.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        """A method, not the same test inline before and after the wait: mypy would take
        `_error` for None after the wait (it narrows attributes across an await), and code
        compiled by mypyc trusts mypy's types."""
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- called by the connection ------------------------------------------------------------

    def headers_received(self, status: int) -> None:
        self.status = status
        self._wake()

    def feed(self, body: bytes) -> None:
        if self._sink is not None:
            self._gathered.append(body)  # `flush` at the end of the read hands it over
            return
        self._queue(body)

    def flush(self) -> None:
        """The socket read is over: what it brought goes to the sink, as one piece."""
        gathered = self._gathered
        if not gathered or self._sink is None:
            return
        piece = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        gathered.clear()  # the list is kept: one less object per read
        try:
            left = self._sink(piece)
        except Exception as exc:  # a sink's bug fails this exchange, not the connection's loop
            self.fail(exc)
            return
        if left:
            self._queue(left)

    def _queue(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > self._high_water and self._conn is not None:
            self._conn.pause()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wake()

    def _time_out(self) -> None:
        self._timer = None
        if self._conn is not None and self._conn.exchange is self:
            self._conn.fail(TimeoutError("engine did not answer in time"))
        else:
            self.fail(TimeoutError("engine did not answer in time"))


class _Target:
    """An engine's address, and the fixed part of every request to it."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"engine URL {base_url!r}: only http://host:port is supported")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.key = f"{self.host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._heads: dict[str, bytes] = {}

    def head(self, path: str) -> bytes:
        head = self._heads.get(path)
        if head is None:
            head = self._heads[path] = (
                f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.key}\r\n"
                f"Content-Type: application/json\r\nAccept-Encoding: identity\r\n{self.auth}"
            ).encode()
        return head


class UpstreamPool(OnLoop):
    """Keep-alive connections per engine. `timeout` bounds a whole exchange (status and body)."""

    def __init__(
        self, timeout: float = 600.0, connect_timeout: float = 5.0, max_idle: int = 1024
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle  # per engine
        self._idle: dict[str, deque[_Connection]] = {}
        self._targets: dict[tuple[str | None, str], _Target] = {}
        self._open: set[_Connection] = set()  # every connection not closed yet, idle or busy
        self._closed = False

    def post(self, base_url: str, path: str, body: bytes, api_key: str | None = None) -> Exchange:
        """`api_key`: the engine's bearer token (cluster engines demand one)."""
        return Exchange(self, base_url, path, body, api_key)

    def target(self, base_url: str, api_key: str | None = None) -> _Target:
        target = self._targets.get((api_key, base_url))
        if target is None:
            target = self._targets[api_key, base_url] = _Target(base_url, api_key)
        return target

    def idle(self, key: str) -> _Connection | None:
        """The most recently used idle connection that is still open (LIFO: the least likely to
        have been closed by the engine's keep-alive timeout)."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self, target: _Target) -> _Connection:
        if self._closed:
            raise EngineDisconnected("the upstream pool is closed (the gateway is stopping)")
        loop = self.loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(self, target.key), target.host, target.port
                )
        except OSError as exc:
            raise EngineDisconnected(f"cannot connect to {target.key}: {exc}") from None
        except TimeoutError:
            raise EngineDisconnected(f"cannot connect to {target.key}: timed out") from None
        conn.transport = transport  # uvloop may call connection_made only after returning
        self._open.add(conn)
        return conn

    def put_idle(self, conn: _Connection) -> None:
        if self._closed:  # an exchange that finished while the pool was being closed
            conn.close()
            return
        idle = self._idle.setdefault(conn.key, deque())
        if len(idle) >= self.max_idle:  # drop the ones the engine closed meanwhile, if any
            idle = self._idle[conn.key] = deque([c for c in idle if not c.closed])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)

    def idle_count(self, base_url: str) -> int:
        idle = self._idle.get(self.target(base_url).key, ())
        return sum(1 for c in idle if not c.closed)

    async def close(self) -> None:
        """Close every connection still open, idle or busy."""
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks
