"""Restart policy as data: exponential backoff, and when to give up (crash loop)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    backoff_base: float = 1.0  # seconds before the first restart
    backoff_cap: float = 30.0
    max_failures: int = 5  # this many failures ...
    window: float = 600.0  # ... within this many seconds: give up (failed)

    def next_delay(self, attempt: int) -> float:
        """Delay before restart number `attempt` (1-based): 1 s, 2 s, 4 s ... capped."""
        return float(min(self.backoff_cap, self.backoff_base * 2.0 ** max(0, attempt - 1)))

    def gives_up(self, failure_times: list[float], now: float) -> bool:
        recent = [t for t in failure_times if now - t <= self.window]
        return len(recent) >= self.max_failures
