"""One `sem chaos` run: a no-fault baseline, then each scenario under load, measured.

A scenario: wait until every model is ready; start the load; after `warmup` (requests in flight,
streams half-way) inject the fault (a scenario in `BEFORE_LOAD`: the fault, then the load at
once); poll until it is recovered (the condition its `Recovery` names
holds, then a probe request through the gateway succeeds) or `recover_timeout` passes; let the
load run `settle` more seconds on the recovered sem; undo whatever sem left stopped or wedged
(reported); stop the load, letting requests in flight finish; look for orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from sem.chaos import procs
from sem.chaos.check import KINDS, Route
from sem.chaos.faults import (
    BEFORE_LOAD,
    Injection,
    Ledger,
    NotApplicable,
    Recovery,
    Scenario,
    Victim,
    inject,
)
from sem.chaos.load import Load, Outcome, send
from sem.chaos.report import ChaosReport, Phase, ScenarioReport
from supervisor.states import ReplicaState

POLL = 0.2  # s between recovery checks
PROBE_TOKENS = 4  # the probe request's max_tokens


class ChaosError(Exception):
    """The run cannot start: sem unreachable, or no ready model to aim at."""


@dataclass(frozen=True)
class ChaosOptions:
    admin: str
    gateway: str
    scenarios: tuple[Scenario, ...] = tuple(Scenario)
    token: str | None = None
    model: str | None = None  # the target; default: the first ready model
    clients: int = 8
    max_tokens: int = 32
    baseline: float = 5.0  # s of load without a fault
    warmup: float = 2.0  # s of load before the fault
    settle: float = 2.0  # s of load after recovery
    recover_timeout: float = 90.0
    slow_seconds: float = 3.0  # the slow engine: how long it stays stopped
    request_timeout: float = 300.0
    orphan_grace: float = 10.0  # s a replaced engine's group gets to go away


@dataclass(frozen=True)
class Replica:
    id: str
    state: str
    pid: int | None


def recovered(
    injection: Injection, replicas: list[Replica], listener: int | None, victim_alive: bool
) -> bool:
    """Does the target model look recovered from this fault (the probe request comes next)?"""
    if not replicas or any(r.state != ReplicaState.READY for r in replicas):
        return False
    listed = {r.pid for r in replicas}
    match injection.recovery:
        case Recovery.ENGINE_REPLACED:
            return injection.victim_pid not in listed
        case Recovery.ENGINE_SERVING:
            return victim_alive or injection.victim_pid not in listed
        case Recovery.DAEMON_BACK:
            return listener is not None and listener != injection.victim_pid


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Sem:
    """The running sem, over its two HTTP APIs."""

    def __init__(self, admin: httpx.AsyncClient, gateway: httpx.AsyncClient) -> None:
        self.admin = admin
        self.gateway = gateway
        self.no_chat: frozenset[str] = frozenset()  # models without a chat template

    async def find_no_chat(self, models: list[str]) -> None:
        """The models that refuse chat requests (a base model has no chat template: vLLM
        answers 400), so the load sends them completions only: a 400 there is no fault's."""
        refused = set()
        for model in models:
            body = {
                "model": model,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}],
            }
            response = await self.gateway.post(Route.CHAT.value, json=body)
            if response.status_code == 400 and "chat template" in response.text:
                refused.add(model)
        self.no_chat = frozenset(refused)

    async def models(self) -> list[dict[str, Any]]:
        response = await self.admin.get("/models")
        response.raise_for_status()
        return list(response.json()["models"])

    async def replicas(self, model: str) -> list[Replica]:
        found = [m for m in await self.models() if m["name"] == model]
        return [Replica(r["id"], r["state"], r["pid"]) for m in found for r in m["replicas"]]

    async def ready(self, models: list[str]) -> bool:
        try:
            states = {m["name"]: m["state"] for m in await self.models()}
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return all(states.get(name) == ReplicaState.READY for name in models)

    async def listed_pids(self) -> set[int]:
        return {r["pid"] for m in await self.models() for r in m["replicas"] if r["pid"]}


def port_of(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


async def run_chaos(opts: ChaosOptions, ledger: Ledger) -> ChaosReport:
    """The whole run. Everything the tool stops or wedges goes through `ledger` (the caller
    releases it once more on the way out)."""
    headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
    timeout = httpx.Timeout(opts.request_timeout, connect=5)
    limits = httpx.Limits(max_connections=opts.clients + 4)
    async with (
        httpx.AsyncClient(base_url=opts.admin, headers=headers, timeout=10,
                          trust_env=False) as admin,
        httpx.AsyncClient(base_url=opts.gateway, headers=headers, timeout=timeout,
                          limits=limits, trust_env=False) as gateway,
    ):  # fmt: skip
        sem = Sem(admin, gateway)
        try:
            models = [m["name"] for m in await sem.models() if m["state"] == ReplicaState.READY]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise ChaosError(f"cannot read models from {opts.admin}: {exc}") from None
        target = opts.model or (models[0] if models else "")
        if target not in models:
            raise ChaosError(f"no ready model {target!r} to aim at (ready: {models or 'none'})")
        await sem.find_no_chat(models)
        baseline = Phase.of(await timed_load(sem, models, opts, opts.baseline))
        report = ChaosReport(target=target, models=models, baseline=baseline)
        for scenario in opts.scenarios:
            run = ScenarioRun(scenario, opts, sem, ledger, models, target)
            report.scenarios.append(await run.measure(baseline.p99_s))
        return report


async def timed_load(
    sem: Sem, models: list[str], opts: ChaosOptions, seconds: float
) -> list[Outcome]:
    load = Load(sem.gateway, models, opts.clients, opts.max_tokens, sem.no_chat).start()
    try:
        await asyncio.sleep(seconds)
    except BaseException:
        await load.abort()
        raise
    return await load.stop()


@dataclass
class ScenarioRun:
    """One scenario, from "every model ready" to its report (see the module docstring)."""

    scenario: Scenario
    opts: ChaosOptions
    sem: Sem
    ledger: Ledger
    models: list[str]
    target: str

    async def measure(self, baseline_p99: float | None) -> ScenarioReport:
        report = ScenarioReport(self.scenario.value)
        if not await self.wait_ready():
            report.what = (
                f"not run: not every model was ready within {self.opts.recover_timeout:g}s"
            )
            return report
        victim = await self.victim()
        load = Load(
            self.sem.gateway, self.models, self.opts.clients, self.opts.max_tokens, self.sem.no_chat
        )
        try:
            injection = await self.fault(victim, report, load)
        except BaseException:
            self.ledger.release_all()
            await load.abort()
            raise
        outcomes = await load.stop()
        if injection is None:  # not applicable: its load measured nothing
            return report
        report.load = Phase.of(outcomes)
        if report.load.p99_s is not None and baseline_p99 is not None:
            report.added_p99_s = report.load.p99_s - baseline_p99
        report.orphans = await self.orphans(injection)
        return report

    async def fault(self, victim: Victim, report: ScenarioReport, load: Load) -> Injection | None:
        """Start `load` and inject (in the scenario's order), wait for recovery, settle, undo
        what is left; None if not applicable."""
        before = self.scenario in BEFORE_LOAD
        if not before:
            load.start()
            await asyncio.sleep(self.opts.warmup)
        try:
            injection = await asyncio.to_thread(
                inject, self.scenario, victim, self.ledger, self.opts.slow_seconds
            )
        except NotApplicable as exc:
            report.applicable, report.what = False, str(exc)
            return None
        if before:
            load.start()
        started = time.monotonic()
        report.what = injection.what
        release = asyncio.create_task(self.release_after(injection.release_after))
        try:
            report.recovery_s = await self.recovery(injection, started)
        finally:
            release.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await release
        report.recovered = report.recovery_s is not None
        if report.recovered:
            await asyncio.sleep(self.opts.settle)
        report.released = await asyncio.to_thread(self.ledger.release_all)
        return injection

    async def release_after(self, seconds: float | None) -> None:
        """The slow engine: continued by the tool after `seconds` (expected, so not reported)."""
        if seconds is not None:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self.ledger.release_all)

    async def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.opts.recover_timeout
        while not await self.sem.ready(self.models):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL)
        return True

    async def victim(self) -> Victim:
        replica = next((r for r in await self.sem.replicas(self.target) if r.pid), None)
        if replica is None or replica.pid is None:
            raise ChaosError(f"model {self.target} has no engine process listed")
        return Victim(replica.id, replica.pid, port_of(self.opts.admin), port_of(self.opts.gateway))

    async def recovery(self, injection: Injection, started: float) -> float | None:
        """Seconds from the fault until recovered and a probe request succeeded; None if not
        within `recover_timeout`."""
        deadline = started + self.opts.recover_timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    if await self.looks_recovered(injection) and await self.probe():
                        return time.monotonic() - started
            await asyncio.sleep(POLL)
        return None

    async def looks_recovered(self, injection: Injection) -> bool:
        try:
            replicas = await self.sem.replicas(self.target)
        except (httpx.HTTPError, ValueError, KeyError):
            return False  # say, the supervisor restarting
        listener = None
        if injection.port is not None:
            listener = await asyncio.to_thread(procs.listening_pid, injection.port)
        victim_alive = await asyncio.to_thread(alive, injection.victim_pid)
        return recovered(injection, replicas, listener, victim_alive)

    async def probe(self) -> bool:
        outcome = await send(self.sem.gateway, KINDS[0], self.target, PROBE_TOKENS, n=0)
        return outcome.ok

    async def orphans(self, injection: Injection) -> list[int]:
        """Orphans left once `orphan_grace` has passed (none: returns as soon as there are none)."""
        dead = set() if injection.recovery is Recovery.DAEMON_BACK else {injection.victim_pid}
        deadline = time.monotonic() + self.opts.orphan_grace
        found: list[int] = []
        while time.monotonic() < deadline:
            try:
                listed = await self.sem.listed_pids()
            except (httpx.HTTPError, ValueError, KeyError):
                await asyncio.sleep(POLL)  # without the listing, every engine looks orphaned
                continue
            instance = await asyncio.to_thread(procs.instance_of, listed)
            found = await asyncio.to_thread(procs.orphans, instance, listed, dead)
            if not found:
                break
            await asyncio.sleep(POLL)
        return found
