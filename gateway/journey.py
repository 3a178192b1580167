"""A request's journey through the gateway, from the handler's hand-over to its answer.

In order: the request is observed (gateway.metrics); a request quarantined by the retry budget
is refused; admission gives it a slot on a replica of its model (queueing for one if need be);
the relay (gateway.proxy) makes an attempt on that replica. An engine that fails the attempt
(dies, answers 5xx, breaks a stream) costs the client nothing: the replica is suspected, and the
request is sent again on another ready replica or on the restarted one, from the start while
nothing has reached the client (`replay`) or from where its stream broke (`resume`). After
`max_attempts` failures it is given up and quarantined (gateway.retry). A suspect replica gets
one request at a time once its suspicion is up, until one succeeds (gateway.admission), so that
the requests of a model whose only engine wedged do not all spend an attempt on it again.

Each attempt is watched for progress (gateway.progress): an attempt on a replica that stalled,
or a stream that got no first byte within its deadline, is abandoned and retried like any
engine failure, and the stalled replica gets nothing new. A timeout (`--upstream-timeout`) is
retried while nothing reached the client; a stream that had started is ended with the error.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable

from contract.routes import ReplicaRoute
from gateway.admission import Admission
from gateway.errors import GatewayError, RequestQuarantined, UpstreamError, UpstreamTimeout
from gateway.metrics import GatewayMetrics, Observation
from gateway.progress import Progress
from gateway.proxy import Answer, Relay
from gateway.retry import RetryBudget
from gateway.routes import RouteWatcher

log = logging.getLogger("sem.gateway")
UNKNOWN_MODEL = "(unknown)"  # the one metrics label of all unknown model names


class Retry(enum.Enum):
    """How a request is sent again after an engine failed it (the `kind` metrics label)."""

    REPLAY = "replay"  # nothing reached the client: the request again, as it came
    RESUME = "resume"  # a stream had started: a continuation from where it broke


def retry_kind(started: bool) -> Retry:
    return Retry.RESUME if started else Retry.REPLAY


class Journeys:
    """Takes every request from its handler to its answer (one `run` per request)."""

    def __init__(
        self,
        watcher: RouteWatcher,
        admission: Admission,
        budget: RetryBudget,
        metrics: GatewayMetrics,
    ) -> None:
        self._watcher = watcher
        self._admission = admission
        self._budget = budget
        self._metrics = metrics
        self.progress = Progress(self._ready, budget.stall_after)
        self.progress.on_stall = self._stalled
        self.progress.on_produce = admission.proven  # a replica on trial passes it
        watcher.subscribe(self._table_changed)

    async def run(
        self,
        relay: Relay,
        model: str,
        route: str,
        body: bytes,
        priority: int,
        request_id: str | None,
        charge: Callable[[int], None] | None = None,
    ) -> Answer:
        """`relay`'s answer to a request for `model` on `route` (`body`: the bytes it came with,
        which identify it for the quarantine). `request_id` names it in the logs (one is made up
        if it has none and the logs need one). `charge(tokens)` is called at the end with the
        completion tokens it cost (its API key pays them: gateway.keys)."""
        label = model if model in self._watcher.table.models else UNKNOWN_MODEL
        obs = Observation(self._metrics.model(label), route)
        admission, budget = self._admission, self._budget
        error: BaseException | None = None
        try:
            if budget.quarantined:
                self._refuse_if_quarantined(model, route, body)
            replica = await admission.acquire(model, priority)
            obs.admitted()
            failures = 0
            while True:
                try:
                    with self.progress.watch(replica, model, relay.streams) as watch:
                        if relay.streams:
                            clock = self.progress.clock
                            watch.first_byte_within(clock.deadline(model, failures + 1))
                        answer = await relay.attempt(replica, obs, watch)
                    admission.proven(replica.url or "")
                    return answer
                except (UpstreamError, UpstreamTimeout) as exc:
                    if isinstance(exc, UpstreamTimeout) and relay.started:
                        raise  # the client has part of the answer: a timeout ends it
                    failures += 1
                    request_id = request_id or uuid.uuid4().hex[:12]
                    admission.suspect(replica.url or "", budget.suspect_for)
                    if failures >= budget.max_attempts:
                        raise self._give_up(request_id, model, route, body, failures, exc) from None
                    self._retrying(request_id, model, obs, retry_kind(relay.started), failures, exc)
                finally:
                    admission.release(replica)
                replica = await admission.acquire_again(model, budget.replay_timeout)
        except BaseException as exc:
            error = exc
            if isinstance(exc, GatewayError) and relay.started:
                return await relay.give_up(exc)  # the client has a stream: end it with the error
            raise
        finally:
            obs.finished(error)
            if charge is not None:
                charge(obs.tokens)

    def _ready(self, replica: ReplicaRoute) -> bool:
        """`replica` is still ready in the route table, on the same engine."""
        return any(
            r.id == replica.id and r.url == replica.url
            for m in self._watcher.table.models.values()
            for r in m.ready_replicas
        )

    def _stalled(self, url: str) -> None:
        self._admission.suspect(url, self._budget.suspect_for)

    def _table_changed(self) -> None:
        models = self._watcher.table.models.values()
        self.progress.forget({(r.id, r.url) for m in models for r in m.ready_replicas})

    def _refuse_if_quarantined(self, model: str, route: str, body: bytes) -> None:
        budget = self._budget
        until = budget.quarantined_until(budget.digest(model, route, body))
        if until is not None:
            raise RequestQuarantined(
                f"this exact request failed on engines {budget.max_attempts} times; it is"
                f" refused until {time.strftime('%H:%M:%S', time.localtime(until))}"
                " (it may be what makes them fail)"
            )

    def _retrying(
        self,
        request_id: str,
        model: str,
        obs: Observation,
        kind: Retry,
        failures: int,
        exc: UpstreamError | UpstreamTimeout,
    ) -> None:
        obs.metrics.retried(kind.value)
        log.warning(
            "request %s (%s): %s; %s (attempt %d of %d)", request_id, model,
            exc.message, kind.value, failures + 1, self._budget.max_attempts,
        )  # fmt: skip

    def _give_up(
        self,
        request_id: str,
        model: str,
        route: str,
        body: bytes,
        failures: int,
        last: UpstreamError | UpstreamTimeout,
    ) -> UpstreamError | UpstreamTimeout:
        """The error for a request that met `failures` engine failures; it is quarantined."""
        budget = self._budget
        budget.exhausted(budget.digest(model, route, body))
        log.error("request %s (%s): failed on engines %d times; giving up and refusing it for"
                  " %.0fs", request_id, model, failures, budget.quarantine)  # fmt: skip
        return type(last)(
            f"{last.message}; the request failed on engines {failures} times and is not retried"
            f" (it may be what makes them fail: refused for {budget.quarantine:.0f}s)"
        )
