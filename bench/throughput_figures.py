"""The figures of bench/throughput.py, from what the client saw: each streamed answer's events
and their arrival times, pooled per path and level into tokens/s, requests/s, TTFT and
inter-token latency percentiles, ratios sem/direct, and the Markdown table. No I/O.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def gaps(arrivals: Sequence[float]) -> list[float]:
    """Inter-token latencies: the time between consecutive token events' arrival (events that
    came in one read arrive together: a gap of 0, as the client saw it)."""
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


@dataclass
class Stream:
    """One streamed completion as the client saw it: `feed` takes each read's bytes and the time
    they arrived; token events, the usage chunk, [DONE] and vLLM's in-band error are told apart."""

    started: float
    arrivals: list[float] = field(default_factory=list)  # one per event with a choice
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None
    _rest: bytes = b""

    def feed(self, data: bytes, at: float) -> None:
        events = (self._rest + data).replace(b"\r\n", b"\n").split(b"\n\n")
        self._rest = events.pop()
        for event in events:
            self._event(event.strip(), at)

    def _event(self, event: bytes, at: float) -> None:
        if not event.startswith(b"data:"):
            return
        payload = event[len(b"data:") :].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            self.error = "an event that is not JSON"
            return
        if "error" in chunk:
            self.error = f"in-band error: {str(chunk['error'])[:60]}"
        if chunk.get("choices"):
            self.arrivals.append(at)
        if chunk.get("usage"):
            self.usage_tokens = int(chunk["usage"].get("completion_tokens", 0))

    @property
    def tokens(self) -> int:
        return len(self.arrivals) if self.usage_tokens is None else self.usage_tokens

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.started if self.arrivals else None

    def problem(self, max_tokens: int) -> str | None:
        """What is wrong with the answer (ignore_eos: every token asked for must come), or None."""
        if self.error:
            return self.error
        if not self.done:
            return "stream ended without [DONE]"
        if self.tokens != max_tokens:
            return f"{self.tokens} of {max_tokens} tokens"
        return None


@dataclass
class Run:
    """One closed-loop run of one path at one concurrency: requests start until `deadline`;
    those then in flight finish by `ended` (times on the streams' clock)."""

    path: str
    concurrency: int
    started: float
    deadline: float
    ended: float
    streams: list[Stream]
    max_tokens: int
    others_cpu: float  # seconds of CPU other processes used during the run

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def window(self) -> float:
        """While all `concurrency` requests were in flight (the tail after it drains)."""
        return self.deadline - self.started

    def window_tokens(self) -> int:
        """Token events of whole answers that arrived within the window."""
        return sum(1 for s in self.ok() for at in s.arrivals if at <= self.deadline)

    def ok(self) -> list[Stream]:
        return [s for s in self.streams if s.problem(self.max_tokens) is None]

    def errors(self) -> Counter[str]:
        return Counter(p for s in self.streams if (p := s.problem(self.max_tokens)) is not None)


@dataclass(frozen=True)
class Figures:
    """One path's figures at one level, pooled over its runs (latencies in seconds)."""

    tokens_per_s: float
    requests_per_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    requests: int
    errors: int
    others_cores: float  # other processes' CPU during the runs, in cores


def figures(runs: Sequence[Run]) -> Figures:
    """Output tokens/s over the runs' windows (concurrency held, the tail left out); requests/s
    over the whole runs (a request outlasting the window still counts once)."""
    elapsed = sum(r.elapsed for r in runs) or 1e-9
    ok = [s for r in runs for s in r.ok()]
    ttfts = [t for s in ok if (t := s.ttft) is not None]
    itls = [g for s in ok for g in gaps(s.arrivals)]
    return Figures(
        tokens_per_s=sum(r.window_tokens() for r in runs) / (sum(r.window for r in runs) or 1e-9),
        requests_per_s=len(ok) / elapsed,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(itls, 50),
        itl_p99=percentile(itls, 99),
        requests=sum(len(r.streams) for r in runs),
        errors=sum(r.errors().total() for r in runs),
        others_cores=sum(r.others_cpu for r in runs) / elapsed,
    )


RATIOED = ("tokens_per_s", "requests_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")


def ratios(sem: Figures, direct: Figures) -> dict[str, float | None]:
    """sem / direct for each figure (above 1: more throughput, or more latency, through sem)."""
    out: dict[str, float | None] = {}
    for name in RATIOED:
        a, b = getattr(sem, name), getattr(direct, name)
        out[name] = a / b if a is not None and b else None
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(levels: Sequence[tuple[int, Figures, Figures]]) -> str:
    """Per level (concurrency, direct, sem): a row per path and a row of ratios sem/direct."""
    lines = [
        "| concurrency | path | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | errors | others' CPU (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency, direct, sem in levels:
        for path, f in (("direct", direct), ("sem", sem)):
            lines.append(
                f"| {concurrency} | {path} | {f.tokens_per_s:.1f} | {f.requests_per_s:.2f} "
                f"| {_ms(f.ttft_p50)} | {_ms(f.ttft_p99)} | {_ms(f.itl_p50)} | {_ms(f.itl_p99)} "
                f"| {f.errors} of {f.requests} | {f.others_cores:.2f} |"
            )
        first, *rest = (ratio_text(x) for x in ratios(sem, direct).values())
        lines.append(f"| {concurrency} | **sem/direct** | **{first}** | {' | '.join(rest)} | | |")
    return "\n".join(lines)
