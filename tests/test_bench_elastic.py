"""bench/elastic.py: the simulation drives sem's real policy and its figures add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.elastic as bench
from supervisor import elastic_policy


def test_the_simulation_calls_sems_policy_and_accounts_for_every_request(
    monkeypatch: pytest.MonkeyPatch,
):
    calls = []

    def spy(*args: object, **kwargs: object) -> elastic_policy.Decision:
        calls.append(args)
        return elastic_policy.decide(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bench, "decide", spy)
    requests = len(bench.trace(7, 600, len(bench.SIZES)))
    sem = bench.simulate("sem", 7, 600)
    assert calls, "sem's decide() ran"
    lru = bench.simulate("lru", 7, 600)
    for tally in (sem, lru):
        assert tally.served + tally.failed == requests
        assert tally.loads >= 1 and len(tally.latencies) == tally.served
        assert all(
            0 < latency <= bench.BOUND + bench.SERVICE + 2 * bench.TICK
            for latency in tally.latencies
        )


def test_the_table_and_json_come_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "rows.json"
    assert bench.main(["--seeds", "1", "--duration", "300", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["sem", "lru"]
    assert capsys.readouterr().out.startswith("| policy | seed | requests |")
