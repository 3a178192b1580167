"""Request bodies at the front door: the size cap, the memory budget over all bodies held, JSON
too deep or not JSON at all (NaN, Infinity), `stream` as a real boolean, and 502s that do not
show where the engines listen."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from contract.routes import RouteTable
from gateway.body import BodyBudget, parse_body, parse_object, too_deep
from gateway.errors import BadRequest, Overloaded
from gateway.limits import Limits, MiB
from gateway.retry import RetryBudget
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig, ready_model
from tests.gateway.door_rig import completion, served

ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions"]


def nested(depth: int) -> bytes:
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return b'{"model": "m", "prompt": "hi", "logit_bias": %s}' % inner.encode()


@pytest.fixture
async def client(rig: Rig) -> TestClient:
    url = await rig.engine(FakeEngine("m"))
    return await rig.gateway(RouteTable(1, {"m": ready_model("m", url)}))


def test_depth_is_counted_on_arrays_and_objects_outside_strings() -> None:
    assert not too_deep(b'{"a": [1, {"b": [2]}]}', 4)
    assert too_deep(b'{"a": [1, {"b": [2]}]}', 3)
    assert not too_deep(b'{"a": "[[[[[[[[[[\\"[[[[[["}', 2)  # brackets in strings do not count
    assert not too_deep(b"[[[[", 2)  # unbalanced: the parser refuses it
    assert too_deep(nested(65), 64) and not too_deep(nested(64), 64)


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"]
)
def test_a_body_is_read_in_any_encoding_json_allows(encoding: str) -> None:
    text = '{"model": "m", "prompt": "caf\u00e9 \u2603"}'
    assert parse_object(text.encode(encoding), 64) == {"model": "m", "prompt": "café ☃"}
    with pytest.raises(BadRequest):
        parse_object("[1]".encode(encoding), 64)


scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_values = st.recursive(
    scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
spaces = st.sampled_from(["", " ", "\n", "\t\r\n ", "x", " {}", "NaN", ", 1"])


def refuse(constant: str) -> None:
    raise ValueError(constant)


def parsed(raw: bytes) -> object:
    """What the route's `await parse_body(raw)` gives, driven by hand: a small body is parsed
    without suspending, so the coroutine returns at its first step (and a StopIteration
    escaping the parse would read as a return, not an error)."""
    step = parse_body(raw, Limits())
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("parse_body suspended on a small body")


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(st.text(max_size=3), json_values, max_size=4),
    spaces,
    spaces,
    st.integers(0, 12),
)
@example({"a": 1}, "", "}", 0)
@example({"model": "m", "prompt": 1}, "", "", 2)  # '{"model": "m", "prompt": '
def test_a_body_parses_as_json_loads_reads_it(
    value: dict[str, object], before: str, after: str, cut: int
) -> None:
    """The parse (the C scanner alone for the usual body) gives json.loads' value, or a 400
    where json.loads refuses the text (or finds NaN in it): whatever comes before and after
    the object, and cut short anywhere."""
    whole = json.dumps(value)
    text = before + whole[: len(whole) - cut] + after
    try:
        expected: object = json.loads(text, parse_constant=refuse)
    except ValueError:
        expected = BadRequest
    if isinstance(expected, dict):
        assert parse_object(text.encode(), 64) == expected
        assert parsed(text.encode()) == expected
    else:
        with pytest.raises(BadRequest):
            parse_object(text.encode(), 64)
        with pytest.raises(BadRequest):
            parsed(text.encode())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("depth", [65, 1000, 100_000])
async def test_json_too_deep_is_a_400_in_openai_shape(client, route, depth):
    response = await client.post(route, data=nested(depth))
    assert response.status == 400
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and "deeper than 64" in error["message"]


async def test_json_at_the_depth_limit_is_served(client):
    response = await client.post("/v1/completions", data=nested(64))
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_numbers_are_a_400(client, number):
    body = f'{{"model": "m", "prompt": "hi", "temperature": {number}}}'
    response = await client.post("/v1/completions", data=body)
    assert response.status == 400
    assert "not valid JSON" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", ['"false"', '"true"', "0", "1", "[]"])
async def test_stream_must_be_a_json_boolean(client, route, stream):
    body = f'{{"model": "m", "prompt": "hi", "messages": [], "stream": {stream}}}'
    response = await client.post(route, data=body)
    assert response.status == 422
    assert (await response.json())["error"]["param"] == "stream"


async def test_stream_null_is_false(client):
    body = {"model": "m", "prompt": "hi", "stream": None}
    response = await client.post("/v1/completions", json=body)
    assert response.status == 200 and response.content_type == "application/json"


async def test_a_502_does_not_show_the_engine_address(rig: Rig):
    routes = RouteTable(1, {"m": ready_model("m", "http://127.0.0.1:9")})
    gw = await rig.gateway(routes, retry=RetryBudget(max_attempts=1))
    response = await gw.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert response.status == 502
    message = (await response.json())["error"]["message"]
    assert "m-0 unreachable" in message and "127.0.0.1" not in message and ":9" not in message


async def test_a_body_over_the_cap_is_a_413_in_openai_shape(rig: Rig):
    url = await rig.engine(FakeEngine("m"))
    limits = Limits(max_body=64 * 1024)
    async with served(rig, RouteTable(1, {"m": ready_model("m", url)}), limits) as gw:
        big = completion(1, prompt="x" * 70_000)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{gw.url}/v1/completions", data=big) as declared:
                assert declared.status == 413
                error = (await declared.json())["error"]
                assert error["code"] == 413 and "--max-body" in error["message"]

            async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
                for start in range(0, len(big), 8192):
                    yield big[start : start + 8192]

            async with session.post(f"{gw.url}/v1/completions", data=chunked()) as streamed:
                assert streamed.status == 413


async def test_the_body_budget_is_first_come_first_served_and_answers_503_when_full():
    budget = BodyBudget(100)
    order: list[str] = []

    async def take(name: str, size: int, hold: asyncio.Event) -> None:
        async with budget.hold(size, timeout=2):
            order.append(name)
            await hold.wait()

    first, second = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(take("a", 80, first))
    await asyncio.sleep(0)
    b = asyncio.create_task(take("b", 50, second))  # waits for a
    c = asyncio.create_task(take("c", 10, second))  # would fit, but comes after b
    await asyncio.sleep(0.05)
    assert order == ["a"] and budget.held == 80
    with pytest.raises(Overloaded) as refused:
        async with budget.hold(30, timeout=0.05):
            pass
    assert refused.value.status == 503 and refused.value.retry_after == 1
    first.set()
    await a
    await asyncio.sleep(0.05)
    assert order == ["a", "b", "c"] and budget.held == 60
    second.set()
    await asyncio.gather(b, c)
    assert budget.held == 0


def swallowing_engine() -> web.Application:
    """An engine that reads a completion request and answers one token, without parsing: the
    test's own event loop measures /health, so it must stay free."""

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"choices": [{"text": " a", "finish_reason": "length"}],
                                  "usage": {"completion_tokens": 1}})  # fmt: skip

    app = web.Application(client_max_size=64 * MiB)
    app.router.add_post("/v1/completions", complete)
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_concurrent_near_cap_bodies_keep_memory_bounded_and_health_fast(rig: Rig):
    """8 concurrent bodies just under the 8 MiB cap, against a gateway process allowed 16 MiB of
    bodies at once: its peak RSS grows by far less than the 8 bodies' worth of copies, /health
    stays fast, and every request is served (they wait their turn for memory)."""
    url = await rig.engine(swallowing_engine())  # in this process: it must not parse 8 MiB
    port = free_port()
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--port", str(port), "--route", f"m={url}",
        "--max-body-memory", str(16 * MiB), "--body-timeout", "20",
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_listening(session, base)
            before = peak_rss_mib(gateway.pid)
            body = completion(1, prompt="word " * ((8 * MiB - 200) // 5))
            assert 7.9 * MiB < len(body) < 8 * MiB

            async def post() -> int:
                async with session.post(f"{base}/v1/completions", data=body) as answer:
                    return answer.status

            posts = [asyncio.create_task(post()) for _ in range(8)]
            slowest = 0.0
            async with asyncio.timeout(60):
                while not all(p.done() for p in posts):
                    start = time.monotonic()
                    async with session.get(f"{base}/health") as health:
                        assert health.status == 200
                    slowest = max(slowest, time.monotonic() - start)
                    await asyncio.sleep(0.05)
            assert [p.result() for p in posts] == [200] * 8
            grown = peak_rss_mib(gateway.pid) - before
        assert grown < 160, f"peak RSS grew by {grown:.0f} MiB"
        assert slowest < 1.5, f"/health took {slowest:.2f}s"
    finally:
        gateway.terminate()
        await gateway.wait()


async def wait_listening(session: aiohttp.ClientSession, base: str) -> None:
    async with asyncio.timeout(15):
        while True:
            try:
                async with session.get(f"{base}/health") as health:
                    if health.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.05)
