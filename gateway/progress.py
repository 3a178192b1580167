"""Liveness by progress: which engines still produce bytes, and which attempts to give up.

`/health` answers 200 from an engine whose core is deadlocked or whose API process is frozen
(SIGSTOP): only the bytes tell. Each attempt on an engine is `watch`ed; every piece of answer it
receives is a `beat` (a clock read and two stores: the hot path). Two rules follow:

- **Stall**: a replica with streams in flight that have already produced (so the engine is in
  its decode loop) and no byte for any of them for `stall_after` seconds is stalled. A decode
  step takes tens of milliseconds, and vLLM V1 chunks long prefills into steps that decode runs
  between, so a long prompt arriving does not pause the others' streams: 3 s is well over any
  healthy gap. A stalled replica is suspect (admission sends it nothing new, then one trial
  request at a time), every attempt on it is abandoned (replayed or resumed elsewhere), and it
  is reported as stalled (`stalls`) so the supervisor can restart it, until a byte comes from it
  again or the route table replaces it.
- **First byte**: a stream attempt that got no byte within its deadline is abandoned, unless its
  replica is producing for other streams at that moment: then the engine is alive and this request
  waits its turn (a full batch in vLLM's waiting queue, a burst of new connections not accepted
  yet), and abandoning it would only send it to the back of the queue and make the replica suspect
  (admission then sends the model nothing for `suspect_for` seconds when it has one replica). It
  waits on, deadline after deadline, up to `cap` in all. The deadline is learned per model
  (`FirstByteClock`): `factor` x the p99 of recent times to the first byte (those of attempts that
  waited out a stall left out: one outage would otherwise slow the detection of the next for as
  long as it stays in the window), never under `floor` nor over `cap`; it doubles with each attempt
  of the same request, so a genuinely long prefill gets its time on the next try instead of being
  given up. Non-stream answers come whole at the end: they have no first-byte deadline (a stall
  still abandons them). A replica that sent no byte to anyone since the attempt went to it is
  stalled, as above: an engine wedged between two batches has no stream producing, and vLLM's own
  counters stay frozen where the last batch left them (no request running), so without the
  gateway's report the supervisor would never restart it.

The silence reported to the supervisor is silence while the replica had work: the time it
spent with no attempt on it (suspect, or idle) does not count, so an engine is judged by how
long requests waited on it, and one that produces for its trial request is never restarted for
the seconds the gateway sent it nothing.

An abandoned attempt is cancelled through its `guard` (`Guard`, asyncio.timeout's contract): the
engine connection is closed, which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from contract import defaults
from contract.routes import ReplicaRoute
from gateway.loop import OnLoop

log = logging.getLogger("sem.gateway")

FIRST_BYTE_FLOOR = 5.0  # s: the first-byte deadline is never shorter
FIRST_BYTE_CAP = 60.0  # s: ... nor longer (a first attempt; it doubles per retry)
FIRST_BYTE_FACTOR = 3.0  # x the p99 of recent times to first byte
FIRST_BYTE_SAMPLES = 200  # recent times to first byte kept per model

# The clock, bound once: compiled code calls it without looking it up in `time` (a beat is on
# every streamed piece).
_clock: Final = time.monotonic


@dataclass
class FirstByteClock:
    """Recent times to the first byte, per model, and the deadline they give."""

    floor: float = FIRST_BYTE_FLOOR
    cap: float = FIRST_BYTE_CAP
    factor: float = FIRST_BYTE_FACTOR
    _seen: dict[str, deque[float]] = field(default_factory=dict)
    _base: dict[str, float] = field(default_factory=dict)  # the first attempt's, while fresh
    _added: dict[str, int] = field(default_factory=dict)  # samples seen, per model

    def seen(self, model: str, seconds: float) -> None:
        samples = self._seen.setdefault(model, deque(maxlen=FIRST_BYTE_SAMPLES))
        samples.append(seconds)
        added = self._added[model] = self._added.get(model, 0) + 1
        # A p99 of 200 moves little with one sample: sorted again every 10th of the model's
        # once the window is full (a sort per request was a few % of a stream's CPU).
        if len(samples) < FIRST_BYTE_SAMPLES or added % 10 == 0:
            self._base.pop(model, None)

    def deadline(self, model: str, attempt: int = 1) -> float:
        """Seconds the `attempt`-th try of a request gets for its first byte."""
        base = self._base.get(model)
        if base is None:
            recent = sorted(self._seen.get(model, ()))
            p99 = recent[min(len(recent) - 1, len(recent) * 99 // 100)] if recent else 0.0
            base = self._base[model] = min(self.cap, max(self.floor, self.factor * p99))
        return float(base * 2.0 ** (attempt - 1))


class Abandoned(Exception):
    """Why an attempt was given up (kept on the attempt; the relay raises UpstreamError)."""


class Guard:
    """`with guard:` around an attempt's work (in a task), which `fire` cancels, the
    cancellation coming out as TimeoutError: asyncio.timeout's contract (a cancellation from
    elsewhere, such as a client that left, stays a cancellation), without its timer handle and
    state machine, which cost a few % of a request's CPU for a deadline an attempt never sets;
    and a plain context manager, since entering and leaving it never waits."""

    __slots__ = ("_cancelling", "_fired", "_loop", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._fired = False

    def __enter__(self) -> None:
        task = asyncio.current_task(self._loop)
        assert task is not None, "a guard is entered in a task"
        self._task, self._cancelling = task, task.cancelling()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:  # fmt: skip
        task, self._task = self._task, None
        fired = self._fired and task is not None and task.uncancel() <= self._cancelling
        if fired and exc_type is asyncio.CancelledError:  # ours, not a client that left
            raise TimeoutError from exc

    def fire(self) -> None:
        """Cancel the work under way (from a callback, not from inside it); nothing if the
        guard is not entered."""
        if self._task is not None and not self._fired:
            self._fired = True
            self._task.cancel()


class _Replica:
    """One replica's progress: its live attempts and when a byte last came."""

    __slots__ = ("attempts", "idle_since", "last", "producing", "stall_ended", "stalled_since",
                 "timer", "url")  # fmt: skip

    def __init__(self, url: str) -> None:
        self.url = url
        self.attempts: set[Attempt] = set()
        self.producing = 0  # stream attempts that got their first byte and did not end
        # When a byte last came, moved on by the time it then had no attempt on it: `now -
        # last` is its silence while it had work.
        self.last = _clock()
        self.idle_since: float | None = None  # when its last attempt ended (None: it has some)
        self.stalled_since: float | None = None
        # When it last produced again after a stall: an attempt started before waited out the
        # stall, and its time to first byte says nothing of the model's.
        self.stall_ended = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, attempt: Attempt) -> None:
        if self.idle_since is not None:
            self.last += attempt.started - self.idle_since  # its idle time is no silence
            self.idle_since = None
        self.attempts.add(attempt)

    def discard(self, attempt: Attempt) -> None:
        self.attempts.discard(attempt)
        if not self.attempts:
            self.idle_since = _clock()

    def silence(self, now: float) -> float:
        """Seconds without a byte while it had work (its idle time left out)."""
        return (now if self.idle_since is None else self.idle_since) - self.last


class Attempt:
    """One attempt on one replica, watched: `beat` on every piece received, `close` at the end
    (`with progress.watch(...) as attempt`), and `guard` (a `Guard`) around the work
    so that `abandon` can cancel it."""

    __slots__ = ("_board", "_counted", "_deadline", "_first", "_guard", "_held", "_replica",
                 "_route", "_timer", "model", "reason", "started", "stream")  # fmt: skip

    def __init__(
        self, board: Progress, route: ReplicaRoute, replica: _Replica, model: str, stream: bool
    ) -> None:
        self._board = board
        self._route = route
        self._replica = replica
        self.model = model
        self.stream = stream
        self.started = _clock()
        self._first = False
        self._held = False  # the gateway stopped reading its answer: its client is behind
        self._counted = False  # counted in its replica's `producing`
        self.reason: str | None = None  # set when abandoned
        self._guard = Guard(board.loop)
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # s: the first-byte deadline, once set

    @property
    def guard(self) -> Guard:
        return self._guard

    def first_byte_within(self, seconds: float) -> None:
        """Abandon this attempt if it gets no byte within `seconds` while its replica produces
        for no other stream (see the module)."""
        self._deadline = seconds
        self._timer = self._board.loop.call_later(seconds, self._first_byte_due)

    def _first_byte_due(self) -> None:
        self._timer = None
        waited = _clock() - self.started
        limit = max(self._board.clock.cap, self._deadline)
        replica = self._replica
        if replica.producing and replica.stalled_since is None and waited < limit:
            wait = min(self._deadline, limit - waited)  # busy: its turn comes
            self._timer = self._board.loop.call_later(wait, self._first_byte_due)
            return
        self.abandon(f"sent nothing within {waited:.1f}s (first-byte deadline)")
        if replica.last <= self.started and replica.stalled_since is None:
            self._board.stall(replica, f"sent no byte to anyone for {waited:.1f}s")

    def beat(self) -> None:
        replica = self._replica
        replica.last = _clock()
        if not self._first:
            self._got_first(replica)

    def _got_first(self, replica: _Replica) -> None:
        self._first = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if replica.stalled_since is not None:
            log.info("engine at %s produces again", replica.url)
            replica.stalled_since = None
            replica.stall_ended = replica.last
        if self.stream:
            board = self._board
            if self.started > replica.stall_ended:  # else an outage would lengthen deadlines
                board.clock.seen(self.model, replica.last - self.started)
            self._count(not self._held)
            board.arm(replica)
            if board.on_produce is not None:
                board.on_produce(replica.url)

    def held_back(self, held: bool) -> None:
        """The gateway stopped (True) or went on (False) reading this attempt's answer because
        its client is behind: meanwhile the engine's silence is not a stall, and a replica whose
        every producing stream is held is not judged at all."""
        self._held = held
        if not (self._first and self.stream):
            return
        self._count(not held)
        if not held:
            replica = self._replica
            replica.last = _clock()  # the silence while held was the gateway's
            self._board.arm(replica)

    def _count(self, producing: bool) -> None:
        if producing != self._counted:
            self._counted = producing
            self._replica.producing += 1 if producing else -1

    def abandon(self, reason: str) -> None:
        """Give this attempt up: its work is cancelled (raising TimeoutError from `guard`; an
        attempt not under its guard yet sees `reason` when it enters)."""
        if self.reason is None:
            self.reason = reason
            self._guard.fire()  # not entered yet, or already left: nothing

    def still_ready(self) -> bool:
        """The replica is still ready in the route table (not being stopped, not replaced)."""
        return self._board.ready(self._route)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._replica.discard(self)
        self._count(False)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Progress(OnLoop):
    """Every replica's progress; `on_stall(url)` is told of a replica that stalled, and
    `on_produce(url)` of each stream's first byte; `ready` says whether a replica is still ready
    in the route table."""

    def __init__(
        self,
        ready: Callable[[ReplicaRoute], bool],
        stall_after: float = defaults.STALL_AFTER,
        clock: FirstByteClock | None = None,
    ) -> None:
        self.ready = ready
        self.stall_after = stall_after
        self.clock = clock or FirstByteClock()
        self.on_stall: Callable[[str], None] | None = None
        self.on_produce: Callable[[str], None] | None = None
        self._replicas: dict[str, _Replica] = {}

    def watch(self, replica: ReplicaRoute, model: str, stream: bool) -> Attempt:
        state = self._replicas.get(replica.id)
        if state is None or state.url != replica.url:  # new, or restarted on another port
            state = self._replicas[replica.id] = _Replica(replica.url or "")
        attempt = Attempt(self, replica, state, model, stream)
        state.add(attempt)
        return attempt

    def stalled(self, replica_id: str) -> bool:
        state = self._replicas.get(replica_id)
        return state is not None and state.stalled_since is not None

    def stalls(self) -> dict[str, float]:
        """Replica id -> seconds without a byte while it had work, for replicas that are
        producing (or stalled)."""
        now = _clock()
        return {
            rid: state.silence(now)
            for rid, state in self._replicas.items()
            if state.producing or state.stalled_since is not None
        }

    def forget(self, ready: set[tuple[str, str | None]]) -> None:
        """Drop replicas no longer ready as (id, url) (replaced by a restart, or gone)."""
        for rid in [r for r, s in self._replicas.items() if (r, s.url) not in ready]:
            state = self._replicas.pop(rid)
            if state.timer is not None:
                state.timer.cancel()

    def arm(self, state: _Replica) -> None:
        """Check `state` for a stall when it would be one (one timer per replica)."""
        if state.timer is None:
            delay = max(0.0, state.last + self.stall_after - _clock())
            state.timer = self.loop.call_later(delay, self._check, state)

    def _check(self, state: _Replica) -> None:
        state.timer = None
        if not state.producing or state.stalled_since is not None:
            return
        silent = _clock() - state.last
        if silent < self.stall_after:
            self.arm(state)
            return
        self.stall(state, f"sent nothing for {silent:.1f}s with {state.producing} streams"
                          " producing")  # fmt: skip

    def stall(self, state: _Replica, why: str) -> None:
        """`state`'s engine stalled (`why`): it is suspect, reported, and every attempt on it
        is abandoned."""
        state.stalled_since = _clock()
        log.warning("engine at %s %s: stalled; abandoning its %d requests", state.url, why,
                    len(state.attempts))  # fmt: skip
        if self.on_stall is not None:
            self.on_stall(state.url)
        for attempt in list(state.attempts):
            attempt.abandon(f"stalled ({why})")
