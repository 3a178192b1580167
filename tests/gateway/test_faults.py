"""Faults that do not kill an engine: a frozen or wedged engine (no bytes, /health still 200),
an engine that ends streams as if they had finished (vLLM stopped in mode=abort), multi-token
chunks. Stand-in engines in-process; the gateway's clocks shortened so each test takes seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from contract.routes import RouteTable
from gateway.ending import ends_stream
from gateway.progress import FirstByteClock, Guard
from gateway.retry import RetryBudget
from gateway.state import JOURNEYS, UPSTREAM
from gateway.usage import ENGINE_STREAM_OPTIONS, UsageFilter, with_engine_usage
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig
from tests.gateway.test_failover import FAST, read_stream, stream_text, table

STALL_AFTER = 0.5


async def over(rig: Rig, *engines: FakeEngine | web.Application) -> TestClient:
    urls = [await rig.engine(e) for e in engines]
    budget = RetryBudget(**vars(FAST) | {"stall_after": STALL_AFTER, "suspect_for": 30.0})
    return await rig.gateway(table(1, urls), retry=budget)


async def until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def counting(max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": "m", "prompt": "count 0", "max_tokens": max_tokens, "stream": True} | extra


def numbers(upto: int) -> str:
    return "".join(f" {i}" for i in range(1, upto + 1))


async def test_a_frozen_replica_gets_no_new_request_and_its_streams_resume_in_seconds(rig):
    frozen, healthy = FakeEngine("m", token_delay=0.02), FakeEngine("m", token_delay=0.02)
    client = await over(rig, frozen, healthy)
    progress = client.app[JOURNEYS].progress
    first = asyncio.create_task(client.post("/v1/completions", json=counting(60)))
    await until(lambda: frozen.tokens_sent >= 5)
    frozen.wedge()  # alive, /health 200, no byte any more
    wedged = time.monotonic()
    await until(lambda: progress.stalled("m-0"))
    detected = time.monotonic() - wedged
    assert detected < STALL_AFTER + 1.0, f"stall seen {detected:.2f}s after the freeze"
    assert progress.stalls()["m-0"] >= STALL_AFTER, "the reporter's figure for the supervisor"
    events = await read_stream(await first)
    assert stream_text(events) == numbers(60), "resumed on the healthy replica, nothing lost"
    assert time.monotonic() - wedged < 5.0
    for _ in range(3):  # new requests avoid the frozen replica
        response = await client.post("/v1/completions", json=counting(3) | {"stream": False})
        assert response.status == 200
    assert len(frozen.requests) == 1 and len(healthy.requests) == 4


async def test_a_stream_that_gets_no_first_byte_is_replayed_on_another_replica(rig):
    frozen, healthy = FakeEngine("m"), FakeEngine("m")
    frozen.wedge()
    client = await over(rig, frozen, healthy)
    client.app[JOURNEYS].progress.clock.floor = 0.5
    started = time.monotonic()
    events = await read_stream(await client.post("/v1/completions", json=counting(5)))
    assert stream_text(events) == numbers(5)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert len(frozen.requests) == 1 and len(healthy.requests) == 1


class OneAtATime(FakeEngine):
    """Streams one answer at a time, the others waiting for it: vLLM's waiting queue when its
    batch (or its KV cache) is full."""

    def __init__(self) -> None:
        super().__init__("m", token_delay=0.03)
        self._batch = asyncio.Lock()

    async def _stream(self, request: web.Request, *args: Any) -> web.StreamResponse:
        async with self._batch:
            return await super()._stream(request, *args)


async def test_a_stream_waiting_its_turn_on_a_busy_replica_is_not_abandoned(rig):
    engine = OneAtATime()
    client = await over(rig, engine)  # its only replica: abandoning would make it suspect
    # Deadlines at 0.6 and 1.2 s: the first stream produces at the first, the second has its
    # first byte (at ~0.93 s) well before the second.
    client.app[JOURNEYS].progress.clock.floor = 0.6
    started = time.monotonic()
    answers = await asyncio.gather(
        *(client.post("/v1/completions", json=counting(30)) for _ in range(2))
    )
    assert [stream_text(await read_stream(a)) for a in answers] == [numbers(30)] * 2
    assert len(engine.requests) == 2, "neither was abandoned and sent again"
    # The second waited ~0.9 s for the first, past its 0.6 s deadline, then streamed its own.
    assert time.monotonic() - started >= 1.6


async def test_a_timeout_before_any_byte_is_replayed(rig):
    frozen, healthy = FakeEngine("m"), FakeEngine("m")
    frozen.wedge()
    client = await over(rig, frozen, healthy)
    client.app[UPSTREAM].timeout = 0.5
    response = await client.post("/v1/completions", json=counting(4) | {"stream": False})
    assert response.status == 200, await response.text()
    assert (await response.json())["choices"][0]["text"] == numbers(4)


async def test_an_engine_ending_streams_short_as_if_finished_is_resumed(rig):
    stopping, healthy = FakeEngine("m", token_delay=0.02), FakeEngine("m")
    client = await over(rig, stopping, healthy)
    request = counting(30, stream_options={"include_usage": True})
    task = asyncio.create_task(client.post("/v1/completions", json=request))
    await until(lambda: stopping.tokens_sent >= 10)
    stopping.abort()  # vLLM's mode=abort: finish_reason "length" and [DONE], 10 of 30 tokens
    events = await read_stream(await task)
    assert stream_text(events) == numbers(30)
    chunks = [e for e in events if isinstance(e, dict)]
    finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"] and events.count("[DONE]") == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 30
    assert healthy.requests[0]["max_tokens"] == 30 - stopping.tokens_sent


async def test_a_short_end_that_cannot_be_resumed_ends_with_an_error_not_a_finish(rig):
    stopping = FakeEngine("m", token_delay=0.02)
    client = await over(rig, stopping, FakeEngine("m"))
    task = asyncio.create_task(client.post("/v1/completions", json=counting(30, n=2)))
    await until(lambda: stopping.tokens_sent >= 5)
    stopping.abort()
    events = await read_stream(await task)
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert isinstance(error, dict) and error["error"]["type"] == "upstream_error", error
    assert "n > 1" in error["error"]["message"]


async def test_a_non_stream_answer_cut_short_is_replayed(rig):
    stopping, healthy = FakeEngine("m", token_delay=0.02), FakeEngine("m")
    client = await over(rig, stopping, healthy)
    body = counting(30) | {"stream": False}
    task = asyncio.create_task(client.post("/v1/completions", json=body))
    await until(lambda: stopping.tokens_sent >= 5)
    stopping.abort()
    response = await task
    assert (await response.json())["choices"][0]["text"] == numbers(30)
    assert len(healthy.requests) == 1


async def test_resume_counts_the_engines_tokens_with_multi_token_and_empty_chunks(rig):
    dying = FakeEngine("m", token_delay=0.01, die_after=7, tokens_per_chunk=3, empty_every=1)
    healthy = FakeEngine("m", tokens_per_chunk=3, empty_every=1)
    client = await over(rig, dying, healthy)
    events = await read_stream(await client.post("/v1/completions", json=counting(20)))
    assert stream_text(events) == numbers(20)
    sent = dying.requests[0]
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert healthy.requests[0]["max_tokens"] == 20 - 6, "6 tokens (2 chunks of 3) had been sent"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all("usage" not in c for c in chunks), "usage the client did not ask for is stripped"


async def test_usage_the_client_asked_for_is_kept(rig):
    client = await over(rig, FakeEngine("m"))
    request = counting(3, stream_options={"include_usage": True})
    events = await read_stream(await client.post("/v1/completions", json=request))
    chunks = [e for e in events if isinstance(e, dict)]
    assert [("usage" in c) for c in chunks] == [False, False, False, True]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert json.dumps(chunks[-1]["choices"]) == "[]"


async def test_a_stream_ended_by_a_replica_being_stopped_is_resumed_on_another(rig):
    stopping, healthy = FakeEngine("m", token_delay=0.02), FakeEngine("m")
    urls = [await rig.engine(stopping), await rig.engine(healthy)]
    budget = RetryBudget(**vars(FAST) | {"stall_after": STALL_AFTER})
    client = await rig.gateway(table(1, urls), retry=budget)
    chat = {"model": "m", "messages": [{"role": "user", "content": "count 0"}], "stream": True}
    task = asyncio.create_task(client.post("/v1/chat/completions", json=chat))
    await until(lambda: stopping.tokens_sent >= 5)
    draining = table(2, urls).models["m"]
    replicas = (replace(draining.replicas[0], state="draining"), draining.replicas[1])
    rig.watcher.update(RouteTable(2, {"m": replace(draining, replicas=replicas)}))
    stopping.abort()  # no limit was asked: only the replica's state tells this end is a cut
    events = await read_stream(await task)
    chunks = [e for e in events if isinstance(e, dict)]
    finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"] and events.count("[DONE]") == 1
    assert len(healthy.requests) == 1 and healthy.requests[0]["continue_final_message"] is True
    assert stream_text(events).startswith(numbers(5))


async def wedged_alone(rig: Rig, engine: FakeEngine, streams: int) -> tuple[TestClient, list[Any]]:
    """A gateway over `engine`, the model's only replica, wedged between two batches (no stream
    producing), and `streams` streams sent to it; once it is reported stalled."""
    engine.wedge()
    budget = RetryBudget(**vars(FAST) | {"stall_after": STALL_AFTER, "suspect_for": 0.8})
    client = await rig.gateway(table(1, [await rig.engine(engine)]), retry=budget)
    progress = client.app[JOURNEYS].progress
    progress.clock.floor = 0.3  # first-byte deadlines 0.3, 0.6, 1.2 s
    sent = [asyncio.create_task(client.post("/v1/completions", json=counting(20)))
            for _ in range(streams)]  # fmt: skip
    await until(lambda: progress.stalled("m-0"))
    return client, sent


async def test_an_only_replica_that_sends_no_byte_to_anyone_is_reported_and_its_requests_wait(
    rig,
):
    """The chaos run's lost request (2026-12-07): vLLM's EngineCore stopped between batches, its
    counters frozen at no request running, so only the gateway can tell the supervisor."""
    wedged = FakeEngine("m", token_delay=0.01)
    client, sent = await wedged_alone(rig, wedged, streams=4)
    progress = client.app[JOURNEYS].progress
    silent = progress.stalls()["m-0"]
    assert 0.3 <= silent < 0.6, "reported, with the time its requests waited for nothing"
    await asyncio.sleep(0.5)  # suspect: nothing is sent to it, and that time is no silence
    assert progress.stalls()["m-0"] == silent
    peak = 0

    def three_trials() -> bool:
        nonlocal peak
        if len(wedged.requests) > 4:
            peak = max(peak, wedged.running)
        return len(wedged.requests) >= 7

    await until(three_trials)  # without trials, all four went back and gave up by now
    assert peak == 1, "one trial at a time"
    restarted = FakeEngine("m", token_delay=0.01)
    rig.watcher.update(table(2, [await rig.engine(restarted)]))  # the supervisor restarted it
    texts = [stream_text(await read_stream(await s)) for s in sent]
    assert texts == [numbers(20)] * 4, "every client got its whole answer"
    assert len(restarted.requests) == 4


async def test_a_wedged_replica_that_comes_back_by_itself_passes_its_trial_and_gets_all(rig):
    wedged = FakeEngine("m", token_delay=0.01)
    client, sent = await wedged_alone(rig, wedged, streams=3)
    await until(lambda: len(wedged.requests) == 3 + 1)  # its trial request is on it
    await asyncio.sleep(0.2)  # the wedge lasts 0.2 s into the trial (whose deadline is 0.6 s)
    wedged.unwedge()  # a hiccup, not a deadlock: no restart comes
    texts = [stream_text(await read_stream(await s)) for s in sent]
    assert texts == [numbers(20)] * 3
    progress = client.app[JOURNEYS].progress
    assert not progress.stalled("m-0")
    assert len(wedged.requests) == 3 + 3, "each sent again once: a trial, then the others"
    assert progress.clock.deadline("m") == 0.3, "the wait for the wedge is no time to first byte"


def test_the_first_byte_deadline_is_learned_floored_capped_and_doubles_per_attempt():
    clock = FirstByteClock(floor=5.0, cap=60.0, factor=3.0)
    assert clock.deadline("m") == 5.0, "nothing seen yet: the floor"
    for _ in range(99):
        clock.seen("m", 0.1)
    clock.seen("m", 4.0)  # one slow prefill in a hundred: the p99
    assert clock.deadline("m") == 12.0
    assert clock.deadline("m", attempt=2) == 24.0
    for _ in range(10):
        clock.seen("m", 100.0)
    assert clock.deadline("m") == 60.0, "capped"
    assert clock.deadline("other") == 5.0, "per model"
    for _ in range(200):  # full windows of fast answers, two models taking turns
        clock.seen("w", 0.1)
        clock.seen("v", 0.1)
    assert clock.deadline("w") == clock.deadline("v") == 5.0
    for _ in range(10):  # within 10 samples each deadline follows (not sorted per request)
        clock.seen("w", 100.0)
        clock.seen("v", 100.0)
    assert clock.deadline("w") == clock.deadline("v") == 60.0


def test_usage_is_asked_of_the_engine_and_stripped_byte_level_in_vllms_form():
    raw = b'{"model": "m", "stream": true}\n'
    asked = json.loads(with_engine_usage(raw, json.loads(raw)))
    assert asked["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    mine = {"model": "m", "stream_options": {"include_usage": True}}
    assert json.loads(with_engine_usage(json.dumps(mine).encode(), mine))["stream_options"] == (
        ENGINE_STREAM_OPTIONS
    )
    chunk = b'data: {"id":"c","choices":[{"index":0,"text":"x"}]}\n\n'
    counted = (
        chunk[:-3] + b',"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}}\n\n'
    )
    final = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    assert UsageFilter({}).strip(counted + counted + final) == chunk + chunk
    with_final = UsageFilter({"stream_options": {"include_usage": True}})
    assert with_final.strip(counted + final) == chunk + final
    everything = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert UsageFilter(everything).strip(counted + final) == counted + final
    assert UsageFilter({}).strip(counted) == chunk  # the usual piece: one event, cut by hand
    assert UsageFilter({}).strip(final) == b""  # the usage-only event alone
    assert UsageFilter({}).strip(chunk + counted) == chunk + chunk  # an event without usage first
    spaced = b'data: {"id": "c", "choices": [{"index": 0, "text": "x"}]}\n\n'
    spaced_counted = spaced[:-3] + b', "usage": {"completion_tokens": 2}}\n\n'
    spaced_final = b'data: {"id": "c", "choices": [], "usage": {"completion_tokens": 2}}\n\n'
    assert UsageFilter({}).strip(spaced_counted + spaced_final) == spaced  # other JSON: the regexes
    assert with_final.strip(spaced_counted + spaced_final) == spaced + spaced_final


def test_usage_is_cut_at_the_right_bytes_of_text_that_is_not_ascii() -> None:
    """The scans run on a latin-1 view of the bytes, whose indexes are the bytes': generated
    UTF-8 text (two, three and four bytes a character) before the usage must come out whole."""
    text = "h\u00e9llo \u4e16\u754c \U0001f600"
    event = {"id": "c", "choices": [{"index": 0, "text": text}]}
    chunk = f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
    counted = chunk[:-3] + b',"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    stripped = UsageFilter({}).strip(counted + counted)
    assert stripped == chunk + chunk
    assert json.loads(stripped.split(b"\n\n")[0][len(b"data: ") :])["choices"][0]["text"] == text
    assert not ends_stream(counted.decode("latin-1"))


@pytest.mark.parametrize(
    ("events", "ends"),
    [
        (b'data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n', False),
        (b'data: {"choices":[{"index":0,"text":"x","finish_reason":"stop"}]}\n\n', True),
        (b'data: {"choices": [{"text": "x", "finish_reason": null}]}\n\n', False),
        (b'data: {"choices": [{"text": "x", "finish_reason": "length"}]}\n\n', True),
        (b'data: {"choices":[{"text":"finish_reason","finish_reason":null}]}\n\n', False),
        (b'data: {"choices":[{"index":0,"finish_reason":null},'
         b'{"index":1,"finish_reason":"stop"}]}\n\n', True),
        (b"data: [DONE]\n\n", True),
        (b'data: {"choices":[{"text":"x"}]}\n\n' b"data:[DONE]\n\n", True),
        (b'data: {"choices":[{"text":"x"}]}\n\n', False),
        (b'data: {"choices":[{"text":"[DONE]","finish_reason":null}]}\n\n', False),  # the model's
    ],
)  # fmt: skip
def test_a_stream_end_is_told_by_a_finish_reason_or_the_done_event_in_any_spacing(
    events: bytes, ends: bool
) -> None:
    assert ends_stream(events.decode("latin-1")) is ends


def test_with_several_choices_a_stream_ends_at_its_done_event_only() -> None:
    finished = b'data: {"choices":[{"index":1,"text":"x","finish_reason":"stop"}]}\n\n'
    assert not ends_stream(finished.decode("latin-1"), by_finish=False)  # choice 0 goes on
    assert ends_stream((finished + b"data: [DONE]\n\n").decode("latin-1"), by_finish=False)


async def test_an_abandoned_attempt_is_a_timeout_and_a_client_that_left_stays_a_cancellation():
    async def work(guard: Guard, started: asyncio.Event) -> None:
        with guard:
            started.set()
            await asyncio.sleep(10)

    async def run(also_cancel: bool) -> BaseException | None:
        guard, started = Guard(asyncio.get_running_loop()), asyncio.Event()
        task = asyncio.create_task(work(guard, started))
        await started.wait()
        guard.fire()  # what a stall or a first-byte deadline does, from a callback
        if also_cancel:
            task.cancel()  # the client left meanwhile
        with contextlib.suppress(BaseException):
            await task
        return task.exception() if not task.cancelled() else asyncio.CancelledError()

    assert isinstance(await run(also_cancel=False), TimeoutError)
    assert isinstance(await run(also_cancel=True), asyncio.CancelledError)
    Guard(asyncio.get_running_loop()).fire()  # never entered (or already left): nothing to cancel


def big_engine(sent: list[int], forever: bool) -> web.Application:
    """Completions of 8 KB events `|NNNNN xxx...`, numbered on from the prompt's count of `|`
    (a resume's prompt carries the text so far); `forever`: the stream never ends."""

    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        start = str(body["prompt"]).count("|")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(start, start + int(body["max_tokens"])):
            chunk = {"id": "big", "created": 1, "choices": [{"index": 0, "text": f"|{i:05d}"
                     + "x" * 8000, "finish_reason": None}]}  # fmt: skip
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            sent[0] += 1
        if forever:
            await asyncio.Event().wait()
        last = {"id": "big", "created": 1, "choices": [{"index": 0, "text": "",
                "finish_reason": "length"}]}  # fmt: skip
        await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        return response

    engine = web.Application(client_max_size=256 * 2**20)  # a resume's prompt: the text so far
    engine.router.add_post("/v1/completions", stream)
    return engine


async def test_a_client_behind_is_no_stall_and_an_abandoned_attempt_resumes_every_event_once(rig):
    """A client far behind: the gateway stops reading its stream, and the engine's silence then
    is the gateway's doing: no stall (no suspect, no abandoned attempts, no report). The relay has
    logged events it could not write yet (the client's socket is full); when the attempt is
    abandoned anyway, the resume sends those again: every event once, in order. (32 MB: the
    socket buffers on the way hold megabytes.)"""
    total, sent_a, sent_b = 4000, [0], [0]
    client = await over(rig, big_engine(sent_a, forever=True), big_engine(sent_b, forever=False))
    progress = client.app[JOURNEYS].progress
    body = {"model": "m", "prompt": "go", "max_tokens": total, "stream": True}
    response = await client.post("/v1/completions", json=body)
    received = await response.content.readexactly(1000)
    await held_back(sent_a)  # every socket buffer on the way is full
    assert sent_a[0] < total, "engine A must be held back mid-stream"
    await asyncio.sleep(3 * STALL_AFTER)
    assert not progress.stalled("m-0") and "m-0" not in progress.stalls()
    for attempt in list(progress._replicas["m-0"].attempts):
        attempt.abandon("abandoned by the test")
    received += await response.content.read()
    events = json_events(received)
    assert all("choices" in e for e in events), [e for e in events if "choices" not in e]
    texts = [e["choices"][0]["text"] for e in events]
    assert [t[:6] for t in texts if t] == [f"|{i:05d}" for i in range(total)]
    assert sent_b[0] > 0, "the rest came from engine B"


def json_events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in raw.decode().split("\n\n")
            if e.startswith("data: {")]  # fmt: skip


async def held_back(sent: list[int]) -> None:
    """Until an engine's count of events sent stops moving (its client is behind)."""
    steady, last = 0, -1
    while steady < 5:
        await asyncio.sleep(0.1)
        steady, last = (steady + 1, last) if sent[0] == last else (0, sent[0])


async def test_a_model_writing_done_in_its_text_streams_on_without_being_held_back(rig):
    """ "[DONE]" in the generated text is not the stream's end: what follows it reaches the
    client while the engine is still generating (before, it was held back until the engine
    closed the stream), and the whole answer arrives once."""
    go_on = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text in ("[DONE]", " and after"):
            chunk = {"id": "d", "choices": [{"index": 0, "text": text, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await go_on.wait()  # the engine still generating
        last = {"id": "d", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
        await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        return response

    engine = web.Application()
    engine.router.add_post("/v1/completions", stream)
    client = await over(rig, engine)
    body = {"model": "m", "prompt": "say it", "max_tokens": 8, "stream": True}
    response = await client.post("/v1/completions", json=body)
    received = b""

    async def until_after() -> None:
        nonlocal received
        while b" and after" not in received and (piece := await response.content.readany()):
            received += piece

    try:
        await asyncio.wait_for(until_after(), 10)  # while the engine still generates
    finally:
        go_on.set()  # the engine ends its stream, whatever came
    assert b" and after" in received, received  # it came before the engine's end
    received += await response.content.read()
    events = json_events(received)
    assert "".join(e["choices"][0]["text"] for e in events) == "[DONE] and after"
    assert received.endswith(b"data: [DONE]\n\n")
