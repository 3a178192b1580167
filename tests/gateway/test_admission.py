"""Admission control without HTTP: slots per replica, the priority queue, waiting for a model."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from contract.routes import ModelRoute, ReplicaRoute, RouteTable
from gateway.admission import Admission
from gateway.errors import ModelFailed, ModelNotFound, ModelNotReady, QueueFull, QueueTimeout
from gateway.routes import RouteWatcher
from tests.conftest import wait_until


def table(version: int, state: str = "ready", replicas: int = 1, seqs: int = 1) -> RouteTable:
    routes = tuple(
        ReplicaRoute(f"m-{i}", state, f"http://127.0.0.1:{9000 + i}", seqs) for i in range(replicas)
    )
    return RouteTable(version, {"m": ModelRoute("m", state, "spawning engine", routes)})


@pytest.fixture
async def watcher():
    async with aiohttp.ClientSession() as session:
        yield RouteWatcher("http://127.0.0.1:1", session)


async def test_unknown_model_is_refused_at_once(watcher):
    watcher.update(table(1))
    with pytest.raises(ModelNotFound, match="known: m"):
        await Admission(watcher).acquire("x")


async def test_at_most_max_num_seqs_in_flight_then_queue_full(watcher):
    watcher.update(table(1, seqs=2))
    admission = Admission(watcher, max_queue=1)
    first, second = await admission.acquire("m"), await admission.acquire("m")
    assert admission.outstanding["m-0"] == 2
    waiting = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: admission.queued("m") == 1)
    with pytest.raises(QueueFull) as err:
        await admission.acquire("m")
    assert err.value.status == 429 and err.value.retry_after == 1
    admission.release(first)
    assert (await waiting).id == "m-0"
    admission.release(second)


async def test_higher_priority_is_served_first_then_arrival_order(watcher):
    watcher.update(table(1))
    admission = Admission(watcher)
    held = await admission.acquire("m")
    order: list[str] = []

    async def client(name: str, priority: int) -> None:
        replica = await admission.acquire("m", priority)
        order.append(name)
        admission.release(replica)

    tasks: list[asyncio.Future[None]] = []
    for name, priority in [("low-1", 0), ("low-2", 0), ("high", 5), ("mid", 1)]:
        tasks.append(asyncio.ensure_future(client(name, priority)))
        await asyncio.sleep(0.01)  # queued in this order
    assert admission.queued("m") == 4
    admission.release(held)
    await asyncio.gather(*tasks)
    assert order == ["high", "mid", "low-1", "low-2"]


async def test_two_replicas_share_the_load(watcher):
    watcher.update(table(1, replicas=2, seqs=4))
    admission = Admission(watcher)
    got = [await admission.acquire("m") for _ in range(6)]
    assert sorted(r.id for r in got).count("m-0") == 3
    assert admission.outstanding == {"m-0": 3, "m-1": 3}


async def test_a_request_waits_for_its_model_to_become_ready(watcher):
    watcher.update(table(1, state="starting"))
    admission = Admission(watcher, queue_timeout=10)
    waiting = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: admission.queued("m") == 1, what="the request queued")
    assert not waiting.done()
    watcher.update(table(2, state="ready"))
    assert (await waiting).id == "m-0"


async def test_not_ready_in_time_is_503_with_the_models_state(watcher):
    watcher.update(table(1, state="starting"))
    with pytest.raises(ModelNotReady, match="starting \\(spawning engine\\)") as err:
        await Admission(watcher, queue_timeout=0.2).acquire("m")
    assert err.value.status == 503 and err.value.retry_after


async def test_no_free_slot_in_time_is_503(watcher):
    watcher.update(table(1))
    admission = Admission(watcher, queue_timeout=0.2)
    await admission.acquire("m")
    with pytest.raises(QueueTimeout, match="1 in flight"):
        await admission.acquire("m")


async def test_a_waiter_that_goes_away_leaves_the_queue(watcher):
    watcher.update(table(1))
    admission = Admission(watcher)
    held = await admission.acquire("m")
    gone = asyncio.ensure_future(admission.acquire("m", priority=9))
    stays = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: admission.queued("m") == 2)
    gone.cancel()
    await wait_until(lambda: admission.queued("m") == 1)
    admission.release(held)
    assert (await stays).id == "m-0"
    assert admission.outstanding["m-0"] == 1


async def test_waiters_of_a_removed_model_get_404(watcher):
    watcher.update(table(1, state="starting"))
    admission = Admission(watcher)
    waiting = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: admission.queued("m") == 1)
    watcher.update(RouteTable(2, {}))
    with pytest.raises(ModelNotFound, match="not served here"):
        await waiting


async def test_a_draining_model_takes_nothing_new_and_its_waiters_get_404(watcher):
    watcher.update(table(1, state="starting"))
    admission = Admission(watcher)
    waiting = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: admission.queued("m") == 1)
    watcher.update(table(2, state="draining"))
    with pytest.raises(ModelNotFound, match="being removed"):
        await waiting
    with pytest.raises(ModelNotFound, match="being removed"):
        await admission.acquire("m")


async def test_before_the_first_route_table_requests_wait_instead_of_404(watcher):
    admission = Admission(watcher, queue_timeout=10)
    waiting = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: watcher.waiting == 1, what="the request waiting for a table")
    assert not waiting.done()
    watcher.update(table(1))
    assert (await waiting).id == "m-0"
    with pytest.raises(ModelNotReady, match="not reached the supervisor"):
        fresh = RouteWatcher("http://127.0.0.1:1", watcher._session)
        await Admission(fresh, queue_timeout=0.1).acquire("m")


async def test_a_failed_model_fails_fast_with_its_reason_instead_of_queueing(watcher):
    watcher.update(table(1, state="restarting"))
    admission = Admission(watcher, queue_timeout=30)
    waiting = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: admission.queued("m") == 1)
    failed = RouteTable(2, {"m": ModelRoute("m", "failed", "5 failures in 600s, giving up", ())})
    watcher.update(failed)
    with pytest.raises(ModelFailed, match="giving up"):
        await waiting
    with pytest.raises(ModelFailed, match="giving up"):
        await admission.acquire("m")


def unloaded(version: int, load_seconds: float | None) -> RouteTable:
    route = ModelRoute("m", "unloaded", "loads on demand", (), load_seconds=load_seconds)
    return RouteTable(version, {"m": route})


async def test_a_request_for_an_unloaded_model_waits_and_asks_for_it_to_be_loaded(watcher):
    watcher.update(unloaded(1, load_seconds=2))
    admission = Admission(watcher, queue_timeout=30)
    asked: list[str] = []
    admission.on_unserved = asked.append
    waiting = asyncio.ensure_future(admission.acquire("m"))
    await wait_until(lambda: admission.queued("m") == 1)
    assert asked == ["m"]
    watcher.update(table(2))  # loaded
    assert (await waiting).id == "m-0"


async def test_a_load_longer_than_the_wait_bound_is_503_at_once_with_its_retry_after(watcher):
    watcher.update(unloaded(1, load_seconds=45.2))
    admission = Admission(watcher, queue_timeout=10)
    asked: list[str] = []
    admission.on_unserved = asked.append
    with pytest.raises(ModelNotReady, match="loading it takes ~45s") as err:
        await admission.acquire("m")
    assert err.value.status == 503 and err.value.retry_after == 45.2
    assert asked == ["m"] and admission.queued("m") == 0  # loading anyway, for the retry


async def test_a_model_not_loaded_in_time_says_its_measured_load_time(watcher):
    watcher.update(unloaded(1, load_seconds=0.5))
    with pytest.raises(ModelNotReady) as err:
        await Admission(watcher, queue_timeout=0.1).acquire("m")
    assert err.value.retry_after == 0.5


async def test_replays_wait_in_the_queue_ahead_of_first_tries_for_the_restarted_engine(watcher):
    watcher.update(table(1, seqs=1000))
    admission = Admission(watcher)
    admission.suspect("http://127.0.0.1:9000", 30)  # its engine just failed their requests
    order: list[str] = []

    async def request(name: str, again: bool) -> None:
        replica = await (admission.acquire_again("m", 5) if again else admission.acquire("m"))
        order.append(f"{name} on {replica.url}")
        admission.release(replica)

    replays = [asyncio.ensure_future(request(f"replay {i}", True)) for i in range(200)]
    await asyncio.sleep(0)  # each has run to its wait
    assert admission.queued("m") == 200  # waiting in sight, not polling
    first = asyncio.ensure_future(request("first try", False))
    await asyncio.sleep(0)
    assert admission.queued("m") == 201
    restarted = RouteTable(2, {"m": ModelRoute("m", "ready", "", (
        ReplicaRoute("m-0", "ready", "http://127.0.0.1:9100", 1000),))})  # fmt: skip
    watcher.update(restarted)  # the supervisor restarted it on a new port
    await asyncio.gather(*replays, first)
    new = "on http://127.0.0.1:9100"
    assert order == [f"replay {i} {new}" for i in range(200)] + [f"first try {new}"]


async def test_a_replay_gets_its_replica_back_when_its_suspicion_ends_or_times_out(watcher):
    watcher.update(table(1))
    admission = Admission(watcher)
    admission.suspect("http://127.0.0.1:9000", 0.2)
    replica = await admission.acquire_again("m", 5)  # woken by the end of the suspicion
    assert replica.id == "m-0"
    admission.release(replica)
    admission.suspect("http://127.0.0.1:9000", 30)
    with pytest.raises(QueueTimeout):
        await admission.acquire_again("m", 0.2)


async def test_once_its_suspicion_ends_a_replica_gets_one_trial_at_a_time_until_proven(watcher):
    watcher.update(table(1, seqs=1000))
    admission = Admission(watcher)
    url = "http://127.0.0.1:9000"
    admission.suspect(url, 0.5)  # its engine failed a request; five more wait for it
    waiting = [asyncio.ensure_future(admission.acquire_again("m", 5)) for _ in range(5)]
    await wait_until(lambda: any(w.done() for w in waiting), 5, "the end of the suspicion")
    granted = lambda: [w for w in waiting if w.done()]  # noqa: E731
    assert len(granted()) == 1, "one trial, the others wait"
    admission.release(granted()[0].result())  # the trial ended unproven (its client left)
    await asyncio.sleep(0)
    assert len(granted()) == 2, "another trial may go"
    admission.proven(url)  # the engine sent the second trial its first byte
    await asyncio.sleep(0)
    assert len(granted()) == 5, "proven: everyone goes"
    assert admission.outstanding["m-0"] == 4


async def test_a_trial_that_fails_makes_its_replica_suspect_again(watcher):
    watcher.update(table(1, seqs=1000))
    admission = Admission(watcher)
    url = "http://127.0.0.1:9000"
    admission.suspect(url, 0.05)
    trial = await admission.acquire_again("m", 5)
    admission.suspect(url, 30)  # the trial failed too
    admission.release(trial)
    with pytest.raises(QueueTimeout):
        await admission.acquire_again("m", 0.2)


async def test_a_trial_holds_its_replica_no_longer_than_a_suspicion_lasts(watcher):
    watcher.update(table(1, seqs=1000))
    admission = Admission(watcher)
    admission.suspect("http://127.0.0.1:9000", 0.2)
    trial = await admission.acquire_again("m", 5)  # a long non-stream answer: no proof for now
    started = asyncio.get_running_loop().time()
    second = await admission.acquire_again("m", 5)
    held = asyncio.get_running_loop().time() - started
    assert 0.15 < held < 1.0, "the next trial goes once the first has held it 0.2 s"
    admission.release(trial)
    admission.release(second)
