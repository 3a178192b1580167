"""Events: every decision and state transition, with a time and a reason.

The log keeps a bounded history for `GET /events` and fans new events out to subscribers
(the SSE stream, tests that must see every change). Writers call `emit`; it never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger("sem.events")


class EventKind(StrEnum):
    """What happened; the value is the `kind` on the wire."""

    TRANSITION = "transition"  # a replica changed state (data: model, old, new, reason)
    PLACED = "placed"  # the scheduler placed a replica (data: devices)
    PENDING = "pending"  # the scheduler's reason a replica waits changed
    MEASURED = "measured"  # an engine's real need was measured (measure.py)
    RELEASED = "released"  # a stopped or failed replica's reservation is free again
    RESTART_WAITS = "restart_waits"  # a restart waits for its GPU (start gate): the reason
    MODEL_DOWNLOADING = "model_downloading"  # a model's files are cached first
    MODEL_ADDED = "model_added"  # a model is sized up; its replicas queue for placement
    MODEL_FAILED = "model_failed"  # a model's files could not be cached or sized
    MODEL_CHANGED = "model_changed"  # a reload changed a model's spec: a rollout begins
    ROLLOUT_FAILED = "rollout_failed"  # a new spec's files could not be cached or sized
    MODEL_REMOVING = "model_removing"  # a model was removed: its replicas drain
    MODEL_REMOVED = "model_removed"  # every replica of a removed model stopped
    MODEL_INVALID = "model_invalid"  # a model of models.yaml was skipped at start
    NOT_ADOPTED = "not_adopted"  # an engine of an earlier run could not be taken over
    RETIRED = "retired"  # an engine of an earlier run with no place now was stopped
    RELOADED = "reloaded"  # models.yaml was applied
    MODEL_LOADING = "model_loading"  # an unloaded model is loaded (a request asked for it)
    MODEL_UNLOADED = "model_unloaded"  # a model was unloaded (idle, evicted, on demand)
    EVICTING = "evicting"  # a model is unloaded to make room for another (data: for, freed)
    SWAP_HELD = "swap_held"  # a recently used model is kept a while before an eviction pays
    SCALED = "scaled"  # the autoscaler added or removed a replica (data: delta)
    LOAD_MEASURED = "load_measured"  # a replica went from starting to ready (data: seconds)
    NODE_LOST = "node_lost"  # a cluster node left: its replica is replaced on another node


@dataclass(frozen=True)
class Event:
    kind: EventKind
    subject: str  # replica id or model name
    message: str
    time: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"kind": self.kind.value}


class EventLog:
    def __init__(self, history: int = 2000) -> None:
        self._history: deque[Event] = deque(maxlen=history)
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def emit(self, kind: EventKind, subject: str, message: str, **data: Any) -> Event:
        event = Event(kind=kind, subject=subject, message=message, data=data)
        self._history.append(event)
        log.info("%s %s: %s", kind, subject, message)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()  # a slow reader loses the oldest, never blocks the writer
            queue.put_nowait(event)
        return event

    def recent(
        self, subject: str | None = None, limit: int = 200, kind: EventKind | None = None
    ) -> list[Event]:
        """The last `limit` events (oldest first) whose subject starts with `subject`, of
        `kind` if given."""
        events = [
            e
            for e in self._history
            if (subject is None or e.subject.startswith(subject))
            and (kind is None or e.kind is kind)
        ]
        return events[-limit:]

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event]]:
        """A queue that gets every event from now on, in order, while the block runs.

        Subscribed at once (not at the first read, as an async generator would be), so a
        caller can subscribe, act, and then read every event its action caused."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def follow(self) -> AsyncIterator[Event]:
        with self.subscribe() as queue:
            while True:
                yield await queue.get()
