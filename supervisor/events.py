"""Events: every decision and state transition, with a time and a reason.

The log keeps a bounded history for `GET /events` and fans new events out to subscribers
(the SSE stream). Writers call `emit`; it never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("sem.events")


@dataclass(frozen=True)
class Event:
    kind: str  # "transition", "placed", "pending", "released", "model_added", ...
    subject: str  # replica id or model name
    message: str
    time: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    def __init__(self, history: int = 2000) -> None:
        self._history: deque[Event] = deque(maxlen=history)
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def emit(self, kind: str, subject: str, message: str, **data: Any) -> Event:
        event = Event(kind=kind, subject=subject, message=message, data=data)
        self._history.append(event)
        log.info("%s %s: %s", kind, subject, message)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()  # a slow reader loses the oldest, never blocks the writer
            queue.put_nowait(event)
        return event

    def recent(self, subject: str | None = None, limit: int = 200) -> list[Event]:
        events = [e for e in self._history if subject is None or e.subject.startswith(subject)]
        return events[-limit:]

    async def follow(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
