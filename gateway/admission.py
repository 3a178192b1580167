"""Admission control: which request goes to which replica, and when.

Per model: at most `max_num_seqs` requests in flight on each ready replica (vLLM's own batch
size, so nothing piles up invisibly inside the engine); the rest wait in a bounded queue ordered
by priority (higher first) then arrival. A request for a model that is known but not ready yet
(pending, starting, restarting), or not loaded at all (`unloaded`: the supervisor loads it on
demand), waits in the same queue; one whose measured load time is longer than `queue_timeout`
gets 503 at once, with that time as Retry-After. Among replicas with a free slot, the one
with the fewest outstanding requests wins. A request whose engine failed it waits again in the
same queue, ahead of every first try, for a replica that is not a suspect (`acquire_again`).

A replica whose engine failed a request is suspect: it gets nothing for `suspect_for` seconds,
then one request at a time (its trial) until it proves itself (`proven`: a stream's first byte,
or an answer) or the route table replaces it (the supervisor restarted it). Without trials every
request waiting for a wedged model's only replica would go back to it at once when the time is
up, each spending one of its attempts there before the supervisor restarts the engine. A trial
holds its replica for `suspect_for` seconds at most: a non-stream answer proves nothing until it
is whole, and a long one must not keep a model's only replica from everyone meanwhile.

Answers: unknown model, or one being removed (draining), 404; a model that failed (every
replica gave up: crash loop) 503 at once, with the reason, instead of queueing for nothing; queue
full 429 with Retry-After; no slot within `queue_timeout` 503 with Retry-After. A waiter whose
client goes away (its task is cancelled) leaves the queue, and a slot handed to it at that very
moment is given back.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from contract import defaults
from contract.routes import ReplicaRoute
from gateway.errors import ModelFailed, ModelNotFound, ModelNotReady, QueueFull, QueueTimeout
from gateway.routes import RouteWatcher


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int]  # (-priority, arrival): heapq pops the smallest
    model: str = field(compare=False)
    future: asyncio.Future[ReplicaRoute] = field(compare=False)
    since: float = field(compare=False, default_factory=time.monotonic)


class Admission:
    def __init__(
        self,
        watcher: RouteWatcher,
        max_queue: int = defaults.MAX_QUEUE,
        queue_timeout: float = defaults.QUEUE_TIMEOUT,
    ) -> None:
        self._watcher = watcher
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.outstanding: dict[str, int] = {}  # replica id -> requests in flight
        self._queues: dict[str, list[_Waiter]] = {}
        self._suspects: dict[str, float] = {}  # engine url -> until (time.monotonic)
        # Engine url on trial -> until when its trial request holds it (0: none is out).
        self._trials: dict[str, float] = {}
        self._trial_hold = 0.0  # s: a trial holds its replica as long as a suspicion lasts
        self._arrivals = itertools.count()
        self.last_request: dict[str, float] = {}  # model -> unix time a request last arrived
        # Called with a model's name when a request for it finds no ready replica (reporter).
        self.on_unserved: Callable[[str], None] | None = None
        watcher.subscribe(self._table_changed)

    # -- queries -----------------------------------------------------------------------------

    def queued(self, model: str) -> int:
        return sum(1 for w in self._queues.get(model, ()) if not w.future.done())

    def _waiting(self, model: str) -> bool:
        """Some request for `model` waits (`queued` > 0, without counting them all)."""
        queue = self._queues.get(model)
        return queue is not None and any(not w.future.done() for w in queue)

    def oldest_wait(self, model: str) -> float:
        """Seconds the longest-queued request for `model` has waited (0: none queued): what the
        supervisor weighs a swap against (elastic_policy)."""
        now = time.monotonic()
        return max((now - w.since for w in self._queues.get(model, ()) if not w.future.done()),
                   default=0.0)  # fmt: skip

    def known_models(self) -> list[str]:
        """Models in the route table, and any a request asked for since (demand for a model the
        supervisor may load on request)."""
        return sorted(set(self._watcher.table.models) | set(self.last_request))

    def in_flight(self, model: str) -> int:
        route = self._watcher.table.models.get(model)
        replicas = route.replicas if route else ()
        return sum(self.outstanding.get(r.id, 0) for r in replicas)

    # -- slots -------------------------------------------------------------------------------

    async def acquire(self, model: str, priority: int = 0) -> ReplicaRoute:
        if self._watcher.table.version < 0:
            await self._first_table()
        if (gone := self._gone(model)) is not None:
            raise gone
        self.last_request[model] = time.time()
        if not self._waiting(model) and (replica := self._free_replica(model)) is not None:
            self._take(replica)
            return replica
        if self.on_unserved is not None and not self._has_ready(model):
            self.on_unserved(model)  # the supervisor loads it now, even if we answer 503
        if (too_long := self._load_too_long(model)) is not None:
            raise too_long
        if self.queued(model) >= self.max_queue:
            raise QueueFull(
                f"model {model!r}: {self.queued(model)} requests already queued (the limit);"
                " retry shortly",
                retry_after=1,
            )
        return await self._queue_for(model, -priority, self.queue_timeout)

    async def acquire_again(self, model: str, timeout: float) -> ReplicaRoute:
        """A slot for a request whose engine failed (its replica is now suspect), waiting up to
        `timeout` s for a ready replica (an engine restart): ahead of every first try, since it
        has waited once already. Queued, not polling: a restart may leave a thousand of them
        waiting for a minute."""
        if (gone := self._gone(model)) is not None:
            raise gone
        if (replica := self._free_replica(model)) is not None:
            self._take(replica)
            return replica
        return await self._queue_for(model, _AGAIN, timeout)

    async def _queue_for(self, model: str, rank: int, timeout: float) -> ReplicaRoute:
        """Wait in `model`'s queue (lower `rank` first, then arrival) for a slot `dispatch` hands
        over: when one is released, a suspect's time is up or the route table changes."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter((rank, next(self._arrivals)), model, loop.create_future())
        heapq.heappush(self._queues.setdefault(model, []), waiter)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except TimeoutError:
            if _granted(waiter.future):  # the slot came as the clock ran out: take it
                return waiter.future.result()
            raise self._timeout_error(model, time.monotonic() - started) from None
        except asyncio.CancelledError:
            if _granted(waiter.future):  # the client left just as a slot was handed over
                self.release(waiter.future.result())
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()  # leave the queue

    def suspect(self, url: str, seconds: float) -> None:
        """An engine failed a request: send it nothing for `seconds`, then one trial request
        at a time until it is `proven`, or until the route table replaces it (the supervisor saw
        it die and restarts it on a new port)."""
        self._trials.pop(url, None)
        self._suspects[url] = time.monotonic() + seconds
        self._trial_hold = seconds
        # Its waiters are woken when its time is up (a timer may fire a hair early: a margin).
        asyncio.get_running_loop().call_later(seconds + 0.005, self.dispatch)

    def proven(self, url: str) -> None:
        """The engine at `url` sent a stream's first byte or an answer: if it was on trial,
        it gets every request again."""
        if self._trials and self._trials.pop(url, None) is not None:
            self.dispatch()

    def release(self, replica: ReplicaRoute) -> None:
        self.outstanding[replica.id] = max(0, self.outstanding.get(replica.id, 0) - 1)
        if self._trials and self._trials.get(replica.url or ""):
            self._trials[replica.url or ""] = 0.0  # the trial ended unproven: another may go
        if self._queues:  # a request may be waiting for this slot
            self.dispatch()

    def _table_changed(self) -> None:
        if self._suspects or self._trials:
            self._forget_replaced()
        self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to waiters, best first; fail the waiters of models that are gone. A
        model's queue is dropped once empty, so that a release with no one waiting costs
        nothing."""
        for model, queue in list(self._queues.items()):
            if (gone := self._gone(model)) is not None:
                for waiter in queue:
                    if not waiter.future.done():
                        waiter.future.set_exception(gone)
                del self._queues[model]
                continue
            while queue:
                if queue[0].future.done():
                    heapq.heappop(queue)
                    continue
                replica = self._free_replica(model)
                if replica is None:
                    break
                waiter = heapq.heappop(queue)
                self._take(replica)
                waiter.future.set_result(replica)
            if not queue:
                del self._queues[model]

    # -- internals ---------------------------------------------------------------------------

    async def _first_table(self) -> None:
        """Before the first route table (the gateway just started), wait for one: nothing
        can be called unknown yet."""
        deadline = time.monotonic() + self.queue_timeout
        while self._watcher.table.version < 0 and (left := deadline - time.monotonic()) > 0:
            await self._watcher.wait_change(left)
        if self._watcher.table.version < 0:
            raise ModelNotReady(
                "the gateway has not reached the supervisor yet; retry shortly", retry_after=5
            )

    def _gone(self, model: str) -> ModelNotFound | ModelFailed | None:
        """The error for a model that is not (or soon no longer) served; None if it is."""
        route = self._watcher.table.models.get(model)
        if route is None:
            known = ", ".join(sorted(self._watcher.table.models)) or "none"
            return ModelNotFound(
                f"model {model!r} is not served here (known: {known})", param="model"
            )
        if route.state == "draining":  # being removed: it will not serve new requests again
            return ModelNotFound(f"model {model!r} is being removed", param="model")
        if route.state == "failed":  # no replica will come back without the operator
            return ModelFailed(f"model {model!r} failed: {route.reason}")
        return None

    def _load_too_long(self, model: str) -> ModelNotReady | None:
        """A model that is not loaded and whose measured load time is past `queue_timeout`:
        waiting would end in a 503 anyway, so say so now, with the honest Retry-After."""
        route = self._watcher.table.models.get(model)
        if route is None or route.ready_replicas or route.load_seconds is None:
            return None
        if route.state not in _NOT_LOADED or route.load_seconds <= self.queue_timeout:
            return None
        return ModelNotReady(
            f"model {model!r} is {route.state}: loading it takes ~{route.load_seconds:.0f}s,"
            f" longer than a request may wait here ({self.queue_timeout:.0f}s); it is loading"
            " now, retry after that",
            retry_after=route.load_seconds,
        )

    def _has_ready(self, model: str) -> bool:
        route = self._watcher.table.models.get(model)
        return route is not None and bool(route.ready_replicas)

    def _free_replica(self, model: str) -> ReplicaRoute | None:
        route = self._watcher.table.models.get(model)
        if route is None:
            return None
        best, least = None, 0  # the least loaded, the first of equals: one pass, no lists
        outstanding, suspects, trials = self.outstanding, self._suspects, self._trials
        for replica in route.ready_replicas:
            load = outstanding.get(replica.id, 0)
            if load >= replica.max_num_seqs or (best is not None and load >= least):
                continue
            if suspects and self._is_suspect(replica.url):
                continue
            if trials and trials.get(replica.url or "", 0.0) > time.monotonic():
                continue  # on trial, and its trial request is out
            best, least = replica, load
        return best

    def _is_suspect(self, url: str | None) -> bool:
        """Is the engine at `url` suspect? Once its time is up it is on trial."""
        until = self._suspects.get(url or "")
        if until is not None and until <= time.monotonic():
            del self._suspects[url or ""]
            self._trials[url or ""] = 0.0
            return False
        return until is not None

    def _forget_replaced(self) -> None:
        """Suspects the route table no longer lists as ready were replaced: forget them."""
        ready = {r.url for m in self._watcher.table.models.values() for r in m.ready_replicas}
        self._suspects = {u: t for u, t in self._suspects.items() if u in ready}
        self._trials = {u: t for u, t in self._trials.items() if u in ready}

    def _take(self, replica: ReplicaRoute) -> None:
        self.outstanding[replica.id] = self.outstanding.get(replica.id, 0) + 1
        if self._trials and (replica.url or "") in self._trials:  # its trial request
            self._trials[replica.url or ""] = time.monotonic() + self._trial_hold
            asyncio.get_running_loop().call_later(self._trial_hold + 0.005, self.dispatch)

    def _timeout_error(self, model: str, waited: float) -> ModelNotReady | QueueTimeout:
        route = self._watcher.table.models.get(model)
        if route is None or not route.ready_replicas:
            state = f"{route.state} ({route.reason})" if route else "gone"
            return ModelNotReady(
                f"model {model!r} is not ready after {waited:.0f}s: {state}; retry later",
                retry_after=route.load_seconds if route and route.load_seconds else 5,
            )
        return QueueTimeout(
            f"model {model!r}: no free slot within {waited:.0f}s ({self.queued(model)} queued,"
            f" {self.in_flight(model)} in flight); retry later",
            retry_after=2,
        )


# A replay's rank in its model's queue: ahead of every first try (whose rank is -priority).
_AGAIN = -(2**62)

# Route states of a model with no engine up or coming up soon: a request waits a whole load.
_NOT_LOADED = frozenset({"unloaded", "pending"})


def _granted(future: asyncio.Future[ReplicaRoute]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
