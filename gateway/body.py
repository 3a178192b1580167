"""Request bodies: read within the front door's limits (gateway.limits), held within a memory
budget, and parsed as the JSON object the routes expect.

Reading: the declared `Content-Length` over `max_body` is a 413 before a byte is read; each read
must come within `body_timeout` (a trickled body is a 408); a chunked body is counted as it comes.
Memory: every body is held for its whole request (the relay forwards it, and a stream keeps it to
resume), so a byte budget (`BodyBudget`) is taken before a body is read and given back when its
request ends; a request that cannot get its share within `body_timeout` is a 503 with
Retry-After, and its bytes stay in the kernel's socket buffers meanwhile.
Parsing: nesting deeper than `max_json_depth` is a 400, found before parsing by a scan of the
raw bytes that skips strings (in C: a regex, a translate, then one `replace` per level), not by
catching RecursionError, which only fires near 1000 levels, well past what engines should get;
NaN and infinities, which JSON does not have, are a 400 too (they would reach the engine as
invalid JSON). Bodies over `THREAD_PARSE` bytes are parsed in a thread, so that the event loop
keeps serving other clients (/health, streams) while it runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.errors import BadRequest, BodyTimeout, BodyTooLarge, Overloaded
from gateway.limits import Limits

THREAD_PARSE = 256 * 1024  # bytes above which a body is parsed off the event loop

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes([b for b in range(256) if b not in b"[]{}"])
_SQUARE = bytes.maketrans(b"{}", b"[]")


class BodyBudget:
    """A semaphore over bytes: the request bodies held in memory at once. First come, first
    served: a large body waiting is not overtaken by small ones."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def hold(self, size: int, timeout: float) -> _Held:
        """`size` bytes (at most the whole budget) for the time of an `async with` block."""
        return _Held(self, min(size, self.capacity), timeout)

    def _give_back(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _take_now(self, size: int) -> bool:
        """Take `size` bytes if they are free and no one waits before: the usual case."""
        if not self._waiters and self.held + size <= self.capacity:
            self.held += size
            return True
        return False

    async def _take(self, size: int, timeout: float) -> None:
        """Wait up to `timeout` s for `size` bytes, in line (after `_take_now` failed)."""
        waiter = asyncio.get_running_loop().create_future()
        entry = (size, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            if self._withdraw(entry):
                raise Overloaded(
                    f"the gateway holds {self.held} bytes of request bodies, its limit"
                    " (--max-body-memory); try again shortly",
                    retry_after=1,
                ) from None
        except BaseException:  # cancelled: the client went away
            if not self._withdraw(entry):
                self.held -= size
                self._grant()
            raise

    def _withdraw(self, entry: tuple[int, asyncio.Future[None]]) -> bool:
        """Take a waiter out of the line; False if it had been granted its bytes already."""
        if entry[1].done() and not entry[1].cancelled():
            return False
        if entry in self._waiters:
            self._waiters.remove(entry)
        self._grant()  # those behind it may fit now
        return True

    def _grant(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.capacity:
            size, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.held += size
            waiter.set_result(None)


class _Held:
    """BodyBudget.hold's block: a class, not @asynccontextmanager, whose generator and wrapper
    cost more than the hold itself (it is on every request with a body)."""

    __slots__ = ("_budget", "_size", "_timeout")

    def __init__(self, budget: BodyBudget, size: int, timeout: float) -> None:
        self._budget, self._size, self._timeout = budget, size, timeout

    async def __aenter__(self) -> None:
        if not self._budget._take_now(self._size):  # no second coroutine in the usual case
            await self._budget._take(self._size, self._timeout)

    async def __aexit__(self, *exc: object) -> None:
        self._budget._give_back(self._size)


def declared_size(request: web.Request, limits: Limits) -> int:
    """The bytes a request says its body has (a chunked body: the cap); over the cap, a 413."""
    declared = request.content_length
    if declared is not None and declared > limits.max_body:
        raise too_large(limits)
    return limits.max_body if declared is None and request.body_exists else declared or 0


def too_large(limits: Limits) -> BodyTooLarge:
    return BodyTooLarge(f"request body over {limits.max_body} bytes (--max-body)", param="body")


async def read_body(request: web.Request, limits: Limits) -> bytes:
    """The whole body, each read within `body_timeout`, at most `max_body` bytes."""
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        if content.is_eof():  # all of it came (the usual case): what readany gives, no timer
            chunk = content.read_nowait()
        else:
            try:
                async with asyncio.timeout(limits.body_timeout):
                    chunk = await content.readany()
            except TimeoutError:
                raise BodyTimeout(
                    f"no byte of the request body came for {limits.body_timeout:g}s"
                    " (--body-timeout)",
                    param="body",
                ) from None
        if not chunk:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        size += len(chunk)
        if size > limits.max_body:
            raise too_large(limits)
        chunks.append(chunk)


def too_deep(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in `raw` nest deeper than `limit` (strings skipped). Malformed
    JSON may pass: the parser refuses it next."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # no deeper than its openers, strings included: the usual case, in C
    brackets = _STRING.sub(b"", raw).translate(_SQUARE, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b"")  # one level of innermost pairs
        if len(shorter) == len(brackets):
            return False  # unbalanced: not JSON
        brackets = shorter
    return bool(brackets)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


# One decoder (json.loads with hooks builds a new one per call), and its C scanner.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"


def _decode(text: str) -> Any:
    """`text` as JSON: an object with no space before it (the usual body) by the decoder's C
    scanner alone, without the two regex matches of `decode` around it (a tenth of a request's
    parse); anything else, or more after it, by `decode`, whose errors are the answer."""
    if text[:1] == "{":
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:  # a value missing somewhere (`decode` says where); never let
            pass  # it out: in a coroutine, a StopIteration reads as its return
        else:
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return value
    return _DECODER.decode(text)


def _encoding(raw: bytes) -> str:
    """JSON's encoding (RFC 8259 allows UTF-16 and UTF-32 too): an object that opens with a
    byte of its own is UTF-8 without a BOM, the usual case, told without json's detection."""
    return "utf-8" if raw[:1] == b"{" and raw[1:2] != b"\x00" else json.detect_encoding(raw)


def parse_object(raw: bytes, max_depth: int) -> dict[str, Any]:
    """`raw` as a JSON object; anything else is a 400 saying why."""
    if too_deep(raw, max_depth):
        raise BadRequest(f"body: JSON nested deeper than {max_depth} levels")
    try:
        body = _decode(raw.decode(_encoding(raw)))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    return body


async def parse_body(raw: bytes, limits: Limits) -> dict[str, Any]:
    """`raw` parsed (to route and validate it); a large body in a thread (see above)."""
    if len(raw) > THREAD_PARSE:
        return await asyncio.to_thread(parse_object, raw, limits.max_json_depth)
    return parse_object(raw, limits.max_json_depth)
