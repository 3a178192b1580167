"""Liveness by progress: is an engine that may still answer /health doing its work?

`/health` 200 says the API process runs, not that tokens come out: an EngineCore deadlock or a
GPU hung in NCCL keeps it green while every request hangs. Two other signals, each enough on
its own, say an engine is wedged (pure decisions here; replica.py acts on them):

- the gateway's report (contract.report): requests in flight on the replica and no byte from
  the engine for `stall_after` seconds. It also catches an engine frozen whole (SIGSTOP), whose
  /health and /metrics no longer answer at all;
- the engine's own counters, scraped from its /metrics: tokens processed (prompt and generated)
  not moving for `stall_after` seconds while it says requests run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from contract.report import ReplicaLoad


class Signal(StrEnum):
    """What caught an unhealthy engine (named in the event's reason)."""

    HEALTH = "/health"
    GATEWAY = "gateway report"
    COUNTERS = "engine counters"


@dataclass(frozen=True)
class Counters:
    """What an engine's /metrics says of its work now."""

    tokens: float  # vllm:prompt_tokens_total + vllm:generation_tokens_total
    running: int  # vllm:num_requests_running


_SAMPLE = re.compile(
    r"^vllm:(prompt_tokens_total|generation_tokens_total|num_requests_running)"
    r"(?:\{[^}]*\})?\s+([0-9.eE+-]+)$",
    re.M,
)


def parse_counters(text: str) -> Counters | None:
    """The counters of one /metrics exposition; None if it has no token counter or no running
    gauge (an engine started with disable_log_stats)."""
    sums: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        sums[name] = sums.get(name, 0.0) + float(value)
    if "num_requests_running" not in sums or "generation_tokens_total" not in sums:
        return None
    tokens = sums["generation_tokens_total"] + sums.get("prompt_tokens_total", 0.0)
    return Counters(tokens=tokens, running=int(sums["num_requests_running"]))


def gateway_stall(load: ReplicaLoad | None, stall_after: float) -> str | None:
    """Why the gateway's report says the replica is wedged; None if it does not (or there is
    no fresh report)."""
    if load is None or load.in_flight <= 0 or load.stalled_for is None:
        return None
    if load.stalled_for < stall_after:
        return None
    return (
        f"no progress for {load.stalled_for:.1f}s with {load.in_flight} request(s) in flight"
        f" ({Signal.GATEWAY})"
    )


class ProgressTracker:
    """One engine's token counter over successive scrapes: stuck while requests run?"""

    def __init__(self, stall_after: float) -> None:
        self._stall_after = stall_after
        self._tokens: float | None = None
        self._since = 0.0  # when the counter last moved, or work began

    def observe(self, counters: Counters | None, now: float) -> str | None:
        """Feed one scrape (None: no answer, which proves nothing); why the engine is wedged,
        or None."""
        if counters is None:
            return None
        if counters.running <= 0 or counters.tokens != self._tokens:
            self._tokens, self._since = counters.tokens, now
            return None
        stuck = now - self._since
        if stuck < self._stall_after:
            return None
        return (
            f"tokens processed stuck at {counters.tokens:.0f} for {stuck:.1f}s with"
            f" {counters.running} request(s) running ({Signal.COUNTERS})"
        )
