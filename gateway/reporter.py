"""Reporting demand and load to the supervisor (contract.report), once a second and on demand.

The supervisor decides what runs; the gateway alone sees what clients want. So the gateway
posts what it sees: per model, requests queued (and the oldest one's wait) and in flight and
when one last arrived, with its bound on a request's wait (--queue-timeout); per replica,
requests in flight; per API key, its use (shown by `sem keys ls`). A request for a model with
no ready replica (not loaded, starting) sends a report at once (`nudge`), so the supervisor can
act on it without waiting for the tick.
A supervisor that is away costs nothing but a log line: the next tick tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from contract.report import GatewayReport, KeyUsage, ModelDemand, ReplicaLoad
from gateway.admission import Admission

log = logging.getLogger("sem.gateway.report")

Stalls = Callable[[], dict[str, float]]  # replica id -> seconds without a byte, work in flight
Usage = Callable[[], dict[str, KeyUsage]]  # API key id -> its use (gateway.keys)


class Reporter:
    def __init__(
        self,
        supervisor_url: str,
        session: aiohttp.ClientSession,
        admission: Admission,
        token: str | None = None,
        interval: float = 1.0,
        stalls: Stalls | None = None,
        usage: Usage | None = None,
    ) -> None:
        self._url = supervisor_url.rstrip("/") + "/gateway/report"
        self._session = session
        self._admission = admission
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._interval = interval
        self._stalls = stalls or dict
        self._usage = usage or dict
        self._nudged = asyncio.Event()
        self._reachable = True
        admission.on_unserved = self.nudge

    def nudge(self, model: str) -> None:
        """A request for `model` found no ready replica: report now."""
        self._nudged.set()

    def report(self) -> GatewayReport:
        """What the gateway sees now."""
        admission = self._admission
        stalls = self._stalls()
        models = {
            name: ModelDemand(
                queued=admission.queued(name),
                in_flight=admission.in_flight(name),
                last_request=admission.last_request.get(name, 0.0),
                oldest_wait=admission.oldest_wait(name),
            )
            for name in admission.known_models()
        }
        replicas = {
            rid: ReplicaLoad(in_flight=n, stalled_for=stalls.get(rid))
            for rid, n in admission.outstanding.items()
        }
        return GatewayReport(time=time.time(), models=models, replicas=replicas,
                             keys=self._usage(), queue_timeout=admission.queue_timeout)  # fmt: skip

    async def run(self) -> None:
        """Report until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._nudged.wait()
            self._nudged.clear()
            await self._send(self.report())

    async def _send(self, report: GatewayReport) -> None:
        try:
            async with self._session.post(
                self._url, json=report.to_json(), headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=2),
            ) as response:  # fmt: skip
                if response.status >= 400:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status,
                        message=(await response.text())[:200],
                    )  # fmt: skip
            if not self._reachable:
                log.info("reporting to the supervisor again")
            self._reachable = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            if self._reachable:
                log.warning("cannot report to the supervisor (%s); retrying every tick", exc)
            self._reachable = False
