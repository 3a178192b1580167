"""What the gateway last reported (contract.report): demand per model, load per replica.

One board per supervisor. The gateway posts a report every second (POST /gateway/report); the
board keeps the newest and wakes whoever waits on a change. A report older than `stale_after`
seconds (the gateway is down or restarting) counts as no report: decisions that need the
gateway's view (unload an idle model, finish a drain early, restart a stalled engine) then fall
back to what the supervisor sees itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from contract.report import GatewayReport, KeyUsage, ModelDemand, ReplicaLoad


class DemandBoard:
    def __init__(self, stale_after: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self._stale_after = stale_after
        self._clock = clock
        self._report: GatewayReport | None = None
        self._changed = asyncio.Event()  # replaced by a fresh one at every report
        self._listeners: list[Callable[[GatewayReport], None]] = []
        # Per API key: its use as last reported, kept when reports stop (`sem keys ls`).
        self.key_usage: dict[str, KeyUsage] = {}

    def subscribe(self, listener: Callable[[GatewayReport], None]) -> None:
        """Call `listener(report)` on every report (it must not block)."""
        self._listeners.append(listener)

    def post(self, report: GatewayReport) -> None:
        """A new report from the gateway; it replaces the previous one whole."""
        self._report = report
        self.key_usage.update(report.keys)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in self._listeners:
            listener(report)

    @property
    def report(self) -> GatewayReport | None:
        """The newest report, or None if there is none fresh enough to trust."""
        report = self._report
        if report is None or self._clock() - report.time > self._stale_after:
            return None
        return report

    def model(self, name: str) -> ModelDemand | None:
        """The gateway's view of one model; None without a fresh report."""
        report = self.report
        return None if report is None else report.models.get(name, ModelDemand())

    def replica(self, replica_id: str) -> ReplicaLoad | None:
        """The gateway's view of one replica; None without a fresh report."""
        report = self.report
        return None if report is None else report.replicas.get(replica_id, ReplicaLoad())

    async def wait_change(self, timeout: float) -> None:
        """Until the next report, or `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass
