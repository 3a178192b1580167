"""What `sem chaos` found: one record per phase (the no-fault baseline, then each scenario),
printed as a table or as JSON, and the verdict behind the exit code."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sem.chaos.load import Outcome

SAMPLES = 5  # failure messages kept per scenario


def p99(seconds: list[float]) -> float | None:
    """The 99th percentile (nearest rank); None without samples."""
    if not seconds:
        return None
    ranked = sorted(seconds)
    return ranked[max(0, math.ceil(0.99 * len(ranked)) - 1)]


@dataclass
class Phase:
    """Requests of one phase: how many, how many failed (with samples), their p99 latency."""

    requests: int = 0
    failed: int = 0
    p99_s: float | None = None
    failures: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> Phase:
        problems = [o.problem for o in outcomes if o.problem is not None]
        return cls(
            requests=len(outcomes),
            failed=len(problems),
            p99_s=p99([o.seconds for o in outcomes]),
            failures=problems[:SAMPLES],
        )


@dataclass
class ScenarioReport:
    scenario: str
    applicable: bool = True
    what: str = ""  # the fault as done, or why it could not be
    load: Phase = field(default_factory=Phase)
    added_p99_s: float | None = None  # p99 over the baseline's
    recovered: bool = False
    recovery_s: float | None = None  # fault -> model ready and a request succeeded
    orphans: list[int] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # undone by the tool, not by sem

    @property
    def clean(self) -> bool:
        """No failed request, no orphan, and recovered (when it ran at all)."""
        if not self.applicable:
            return True
        return self.load.failed == 0 and not self.orphans and self.recovered


@dataclass
class ChaosReport:
    target: str  # the model whose engine the faults hit
    models: list[str]  # the models under load
    baseline: Phase
    scenarios: list[ScenarioReport] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """A failure without a fault (the baseline) counts too: sem is broken before any test."""
        return self.baseline.failed == 0 and all(s.clean for s in self.scenarios)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"clean": self.clean}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _added(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}s"


def render(report: ChaosReport) -> str:
    """The human report: the baseline, a row per scenario, then what each scenario did."""
    base = report.baseline
    lines = [
        f"target model {report.target}; load on {', '.join(report.models)}",
        f"baseline: {base.requests} requests, {base.failed} failed, p99 {_seconds(base.p99_s)}",
        "",
        f"{'SCENARIO':16} {'REQUESTS':>8} {'FAILED':>6} {'ADDED P99':>9} {'RECOVERY':>9} "
        f"{'ORPHANS':>7}  VERDICT",
    ]
    for s in report.scenarios:
        if not s.applicable:
            lines.append(f"{s.scenario:16} {'-':>8} {'-':>6} {'-':>9} {'-':>9} {'-':>7}  n/a")
            continue
        recovery = _seconds(s.recovery_s) if s.recovered else "never"
        verdict = "ok" if s.clean else "FAILED"
        added = _added(s.added_p99_s)
        lines.append(f"{s.scenario:16} {s.load.requests:>8} {s.load.failed:>6} {added:>9} "
                     f"{recovery:>9} {len(s.orphans):>7}  {verdict}")  # fmt: skip
    lines.append("")
    for s in report.scenarios:
        lines.append(f"{s.scenario}: {s.what if s.applicable else 'not applicable: ' + s.what}")
        lines += [f"  failed: {f}" for f in s.load.failures]
        lines += [f"  orphan pid {pid} left" for pid in s.orphans]
        lines += [f"  sem did not deal with it; chaos did: {r}" for r in s.released]
    return "\n".join(lines)
