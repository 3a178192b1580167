"""The load `sem chaos` runs through the gateway: closed-loop clients, every answer checked.

Each client sends one request after another, cycling through the request kinds (completions and
chat, streamed and not) and the models under load, and records an `Outcome` per request: when it
started, how long it took, and what was wrong with it (`check.check_answer`), if anything.
`stop()` lets the requests in flight finish (each has its own timeout): a fault's cost shows in
the requests it hit, so none is abandoned.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from sem.chaos.check import KINDS, RequestKind, Route, check_answer, request_body

FAILURE_PAUSE = 0.1  # s a client waits after a failed request


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    seconds: float
    problem: str | None  # None: complete

    @property
    def ok(self) -> bool:
        return self.problem is None


async def send(
    client: httpx.AsyncClient, kind: RequestKind, model: str, max_tokens: int, n: int
) -> Outcome:
    """One request, read to its end and checked."""
    started = time.monotonic()
    body = request_body(kind, model, max_tokens, n)
    try:
        response = await client.post(kind.route.value, json=body)
        problem = check_answer(kind, response.status_code, response.content, max_tokens)
    except httpx.HTTPError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        problem = f"{model} {kind.label}: {problem}"
    return Outcome(started, time.monotonic() - started, problem)


@dataclass
class Load:
    """`clients` concurrent closed-loop clients over `client` (whose base URL is the gateway)."""

    client: httpx.AsyncClient
    models: list[str]
    clients: int = 8
    max_tokens: int = 32
    no_chat: frozenset[str] = frozenset()  # models sent completions only (no chat template)
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        assert not self._tasks, "started twice"
        self._tasks = [
            asyncio.create_task(self._work(i), name=f"chaos-client-{i}")
            for i in range(self.clients)
        ]
        return self

    async def stop(self) -> list[Outcome]:
        """No new requests; wait for those in flight. The outcomes of the whole run."""
        self._stop.set()
        try:
            await asyncio.gather(*self._tasks)
        finally:  # cancelled (Ctrl-C): the clients go too
            await self.abort()
        return self.outcomes

    async def abort(self) -> None:
        """Cancel the clients, requests in flight included (Ctrl-C, a failed run)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            kind = KINDS[(worker + n) % len(KINDS)]
            model = self.models[worker % len(self.models)]
            if model in self.no_chat and kind.route is Route.CHAT:
                kind = RequestKind(Route.COMPLETIONS, kind.stream)
            outcome = await send(self.client, kind, model, self.max_tokens, worker * 100_000 + n)
            self.outcomes.append(outcome)
            n += 1
            if not outcome.ok:  # say, connection refused while the gateway restarts: no spinning
                await asyncio.sleep(FAILURE_PAUSE)
