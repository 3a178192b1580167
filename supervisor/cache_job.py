"""One download job: a source being cached, its state, and its progress in bytes.

A job moves `checking` (listing, sizes, disk space) -> `downloading` (files in parallel, bytes
counted as they arrive) -> `done` | `failed` | `cancelled`. The cache (cache.py) runs the jobs;
models wait on them (`Job.wait`) and the API shows them (`Job.to_json`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from enum import StrEnum
from pathlib import Path
from typing import Any

from supervisor.config import Source
from supervisor.errors import CacheError
from supervisor.units import human


class JobState(StrEnum):
    """Where a download job is; the value is its `state` on the wire."""

    CHECKING = "checking"  # listing the files and their sizes, checking the disk
    DOWNLOADING = "downloading"  # files in parallel, bytes counted as they arrive
    DONE = "done"  # cached: the snapshot folder is ready
    FAILED = "failed"  # the error says why (hub, disk, auth, ...)
    CANCELLED = "cancelled"  # stopped by shutdown; partial files stay to resume


class Progress:
    """Bytes done of a total, fed from worker threads; rate over the last few seconds."""

    WINDOW = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.done = 0
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])

    def start(self, total: int, done: int) -> None:
        with self._lock:
            self.total, self.done = total, done
            self._samples = deque([(time.monotonic(), done)])

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._samples[-1][0] >= 0.2:
                self._samples.append((now, self.done))
                while len(self._samples) > 2 and now - self._samples[1][0] > self.WINDOW:
                    self._samples.popleft()

    def rate(self) -> float:
        with self._lock:
            if not self._samples:
                return 0.0
            then, done_then = self._samples[0]
            elapsed = time.monotonic() - then
            return (self.done - done_then) / elapsed if elapsed > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        rate = self.rate()
        remaining = max(self.total - self.done, 0)
        return {
            "total": self.total,
            "done": self.done,
            "percent": round(100 * self.done / self.total, 1) if self.total else 0.0,
            "rate": round(rate),
            "eta": round(remaining / rate, 1) if rate > 0 and remaining else None,
        }


class Job:
    """Caching one source."""

    def __init__(self, source: Source, job_id: int) -> None:
        self.id = job_id
        self.source = source
        self.state = JobState.CHECKING
        self.progress = Progress()
        self.files = 0
        self.files_done = 0
        self.skipped: list[str] = []
        self.path: Path | None = None
        self.error: CacheError | None = None
        self.note = ""
        self.started = time.time()
        self.finished: float | None = None
        self.cancelled = threading.Event()
        self.checked = asyncio.Event()  # past `checking`: planned and disk checked, or ended
        self.ended = asyncio.Event()

    @property
    def key(self) -> str:
        return str(self.source)

    @property
    def running(self) -> bool:
        return not self.ended.is_set()

    async def wait(self) -> Path:
        """The snapshot folder once done; the job's CacheError if it failed."""
        await self.ended.wait()
        if self.error is not None:
            raise self.error
        if self.path is None:
            raise CacheError(f"{self.source}: download cancelled")
        return self.path

    def describe(self) -> str:
        """One line for a model's reason while it downloads."""
        if self.state is JobState.CHECKING:
            return f"checking {self.source} on the hub"
        p = self.progress.to_json()
        eta = f", ETA {p['eta']:.0f}s" if p["eta"] is not None else ""
        return (
            f"downloading {self.source}: {human(p['done'])} of {human(p['total'])}"
            f" ({p['percent']}%) at {human(p['rate'])}/s{eta}"
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "source": self.key,
            "state": self.state.value,
            **self.progress.to_json(),
            "files": self.files,
            "files_done": self.files_done,
            "skipped": self.skipped,
            "path": str(self.path) if self.path else None,
            "started": self.started,
            "finished": self.finished,
            "error": None,
        }
        if self.note:
            out["note"] = self.note
        if self.error is not None:
            out["error"] = {
                "type": self.error.type,
                "status": self.error.status,
                "message": self.error.message,
            }
        return out
