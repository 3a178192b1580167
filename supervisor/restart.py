"""Restart policy as data: exponential backoff with jitter, and when to give up (crash loop).

Jitter: engines that crash together (a GPU fault kills every engine on the GPU) must not come
back together: vLLM's memory profiling counts memory another process takes meanwhile as its own.
The random draws come from a `random.Random` the caller passes in (seeded in tests), never from
the module-level generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class Jitter(StrEnum):
    NONE = "none"  # base x 2^(n-1), capped: every replica waits the same
    FULL = "full"  # uniform(0, that): spread widest, sometimes ~0
    DECORRELATED = "decorrelated"  # uniform(base, 3 x the previous delay), capped: never < base


@dataclass(frozen=True)
class RestartPolicy:
    backoff_base: float = 1.0  # seconds before the first restart
    backoff_cap: float = 30.0
    max_failures: int = 5  # this many failures ...
    window: float = 600.0  # ... within this many seconds: give up (failed)
    jitter: Jitter = Jitter.DECORRELATED

    def exponential(self, attempt: int) -> float:
        """Restart number `attempt` (1-based) without jitter: 1 s, 2 s, 4 s ... capped."""
        return float(min(self.backoff_cap, self.backoff_base * 2.0 ** max(0, attempt - 1)))

    def next_delay(self, attempt: int, previous: float | None, rng: random.Random) -> float:
        """Delay before restart number `attempt` (1-based); `previous`: the delay before the
        restart before it (None for the first: then the base counts as the previous one)."""
        if self.jitter is Jitter.FULL:
            return rng.uniform(0.0, self.exponential(attempt))
        if self.jitter is Jitter.DECORRELATED:
            last = self.backoff_base if previous is None else max(self.backoff_base, previous)
            return min(self.backoff_cap, rng.uniform(self.backoff_base, 3.0 * last))
        return self.exponential(attempt)

    def gives_up(self, failure_times: list[float], now: float) -> bool:
        recent = [t for t in failure_times if now - t <= self.window]
        return len(recent) >= self.max_failures
