"""The engines' own metrics: scraped from each ready replica's vLLM `/metrics` at scrape time.

Every `vllm:` family is re-exported under its own name with `model` and `replica` labels added,
so one scrape of the supervisor sees every engine (the engines listen on loopback only). The
engines' `process_*` and `python_*` families are left out: they would clash with nothing useful.

The scrapes run concurrently with a short timeout; a dead or slow engine is skipped (and
counted by the caller). The request and token counters also feed `Throughput`, the per-model
rates the status page shows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

PREFIX = "vllm:"
REQUESTS = "vllm:request_success_total"  # finished requests, by finished_reason
TOKENS = "vllm:generation_tokens_total"


@dataclass(frozen=True)
class Target:
    """One ready replica to scrape."""

    model: str
    replica: str
    url: str  # the engine's base URL


@dataclass
class Scrape:
    """What one round of scrapes found: the families per replica, and the replicas that failed."""

    families: dict[Target, list[Metric]] = field(default_factory=dict)
    failed: dict[Target, str] = field(default_factory=dict)  # target -> why


def parse(text: str) -> list[Metric]:
    """The `vllm:` families of one engine's exposition text (ValueError if it is malformed)."""
    return [f for f in text_string_to_metric_families(text) if f.name.startswith(PREFIX)]


class EngineScraper:
    """Owns one HTTP client for every engine scrape (closed by `aclose`)."""

    def __init__(self, timeout: float = 2.0) -> None:
        self._client = httpx.AsyncClient(timeout=timeout, trust_env=False)

    async def scrape(self, targets: Iterable[Target]) -> Scrape:
        result = Scrape()
        found = await asyncio.gather(*(self._one(t) for t in targets))
        for target, families in found:
            if isinstance(families, str):
                result.failed[target] = families
            else:
                result.families[target] = families
        return result

    async def _one(self, target: Target) -> tuple[Target, list[Metric] | str]:
        try:
            response = await self._client.get(f"{target.url}/metrics")
        except httpx.HTTPError as exc:
            return target, f"{type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return target, f"HTTP {response.status_code}"
        try:
            # Parsing a big exposition (vLLM's histograms) is CPU work: off the event loop.
            return target, await asyncio.to_thread(parse, response.text)
        except ValueError as exc:
            return target, f"unparsable metrics: {exc}"

    async def aclose(self) -> None:
        await self._client.aclose()


class Relabelled(Collector):
    """The scraped families merged by name, each sample with `model` and `replica` added."""

    def __init__(self, scrape: Scrape) -> None:
        self._scrape = scrape

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for target, families in self._scrape.families.items():
            extra = {"model": target.model, "replica": target.replica}
            for family in families:
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                elif out.type != family.type:
                    continue  # two engine versions disagree on a type: keep the first
                for sample in family.samples:
                    out.add_sample(
                        sample.name, {**sample.labels, **extra}, sample.value, sample.timestamp
                    )
        yield from merged.values()


def counter_sum(families: list[Metric], sample_name: str) -> float | None:
    """The sum of one counter's samples over all its labels; None if the engine has none."""
    values = [s.value for f in families for s in f.samples if s.name == sample_name]
    return sum(values) if values else None


@dataclass(frozen=True)
class Rate:
    requests: float  # finished requests per second
    tokens: float  # generated tokens per second

    def to_json(self) -> dict[str, float]:
        return {"requests_per_s": round(self.requests, 3), "tokens_per_s": round(self.tokens, 3)}


class Throughput:
    """Per-model request and token rates from successive scrapes of the engines' counters.

    Each replica keeps its samples of the last `window` seconds; its rate is the increase
    over them. A counter that went down (the engine restarted) starts the replica afresh.
    """

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._samples: dict[Target, deque[tuple[float, float, float]]] = {}

    def observe(self, scrape: Scrape, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for target, families in scrape.families.items():
            requests, tokens = counter_sum(families, REQUESTS), counter_sum(families, TOKENS)
            if requests is None or tokens is None:
                continue
            samples = self._samples.setdefault(target, deque())
            if samples and (requests < samples[-1][1] or tokens < samples[-1][2]):
                samples.clear()  # a counter reset: the engine behind this replica is new
            samples.append((now, requests, tokens))
            while len(samples) > 2 and now - samples[1][0] >= self.window:
                samples.popleft()
        gone = set(self._samples) - set(scrape.families) - set(scrape.failed)
        for target in gone:
            del self._samples[target]

    def rates(self) -> dict[str, Rate]:
        """Model -> the sum of its replicas' rates (0 until a replica has two samples)."""
        totals: dict[str, Rate] = {}
        for target, samples in self._samples.items():
            rate = Rate(0.0, 0.0)
            (t0, r0, k0), (t1, r1, k1) = samples[0], samples[-1]
            if t1 > t0:
                rate = Rate((r1 - r0) / (t1 - t0), (k1 - k0) / (t1 - t0))
            old = totals.get(target.model, Rate(0.0, 0.0))
            totals[target.model] = Rate(old.requests + rate.requests, old.tokens + rate.tokens)
        return totals
