"""bench/throughput.py: its figures (percentiles, inter-token latency from arrival times, the
table), and whole runs against stand-in engines: figures come out, Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.throughput_figures import (
    Figures,
    Run,
    Stream,
    figures,
    gaps,
    markdown_table,
    percentile,
    ratios,
)
from supervisor.procgroup import INSTANCE_ENV, pids_with_env
from tests.conftest import REPO
from tests.e2e.helpers import poll


def event(chunk: dict[str, object]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


TOKEN = event({"choices": [{"index": 0, "text": " x", "finish_reason": None}]})
USAGE = event({"choices": [], "usage": {"completion_tokens": 3}})
DONE = b"data: [DONE]\n\n"


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_gaps_are_the_times_between_arrivals() -> None:
    assert gaps([1.0, 1.5, 1.5, 2.25]) == [0.5, 0.0, 0.75]
    assert gaps([1.0]) == []
    assert gaps([]) == []


def test_stream_stamps_each_token_event_with_the_read_that_completed_it() -> None:
    stream = Stream(started=10.0)
    stream.feed(TOKEN, 10.2)
    stream.feed(TOKEN[:9], 10.3)  # half an event: it arrives with the read that ends it
    stream.feed(TOKEN[9:] + TOKEN, 10.5)  # two events in one read: a gap of 0
    stream.feed(USAGE + DONE, 10.6)
    assert stream.arrivals == [10.2, 10.5, 10.5]
    assert stream.ttft == pytest.approx(0.2)
    assert gaps(stream.arrivals) == pytest.approx([0.3, 0.0])
    assert (stream.tokens, stream.done, stream.problem(3)) == (3, True, None)


def test_stream_problems_name_what_is_wrong() -> None:
    short = Stream(started=0.0)
    short.feed(TOKEN + USAGE.replace(b"3", b"1") + DONE, 1.0)
    assert short.problem(3) == "1 of 3 tokens"
    cut = Stream(started=0.0)
    cut.feed(TOKEN + TOKEN + TOKEN, 1.0)
    assert cut.problem(3) == "stream ended without [DONE]"
    failed = Stream(started=0.0)
    failed.feed(TOKEN + event({"error": {"message": "EngineCore died"}}) + DONE, 1.0)
    assert "EngineCore died" in str(failed.problem(1))
    no_usage = Stream(started=0.0)  # a server that ignores stream_options: tokens are events
    no_usage.feed(TOKEN + TOKEN + DONE, 1.0)
    assert no_usage.problem(2) is None


def answered(started: float, arrivals: list[float], tokens: int) -> Stream:
    return Stream(started=started, arrivals=arrivals, usage_tokens=tokens, done=True)


def test_figures_pool_runs_and_leave_failed_requests_out_of_the_rates() -> None:
    failed = Stream(started=0.0, error="HTTP 503: busy")
    one = Run("sem", 2, 0.0, 1.0, 2.0, [answered(0.0, [0.1, 0.2, 0.4], 3), failed], 3, 0.5)
    two = Run("sem", 2, 1.0, 1.45, 3.0, [answered(1.0, [1.3, 1.4, 1.5], 3)], 3, 1.5)
    f = figures([one, two])
    assert f.tokens_per_s == pytest.approx(5 / 1.45)  # in the windows: 3 + 2 tokens in 1.45 s
    assert f.requests_per_s == 0.5  # 2 answers in 4 s, tails included
    assert (f.requests, f.errors, f.others_cores) == (3, 1, 0.5)
    assert f.ttft_p50 == pytest.approx(0.2)  # of 0.1 and 0.3
    assert f.itl_p50 == pytest.approx(0.1)  # of 0.1, 0.2, 0.1, 0.1
    assert f.itl_p99 == pytest.approx(0.197)
    assert one.errors() == {"HTTP 503: busy": 1}


def fig(tokens_per_s: float, ttft: float | None) -> Figures:
    return Figures(tokens_per_s, tokens_per_s / 64, ttft, ttft, 0.01, 0.02, 10, 0, 0.25)


def test_ratios_are_sem_over_direct_and_none_without_a_figure() -> None:
    r = ratios(fig(90.0, 0.2), fig(100.0, None))
    assert r["tokens_per_s"] == pytest.approx(0.9)
    assert r["itl_p99"] == pytest.approx(1.0)
    assert r["ttft_p50"] is None


def test_markdown_table_has_a_row_per_path_and_a_ratio_row_per_level() -> None:
    table = markdown_table([(4, fig(100.0, 0.05), fig(90.0, 0.0625))])
    lines = table.splitlines()
    assert lines[0].startswith("| concurrency | path | output tok/s | req/s | TTFT p50 ms |")
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert lines[2] == "| 4 | direct | 100.0 | 1.56 | 50.0 | 50.0 | 10.0 | 20.0 | 0 of 10 | 0.25 |"
    assert lines[3].startswith("| 4 | sem | 90.0 | 1.41 | 62.5 |")
    assert lines[4] == "| 4 | **sem/direct** | **0.90** | 0.90 | 1.25 | 1.25 | 1.00 | 1.00 | | |"
    assert "| - |" in markdown_table([(1, fig(1.0, None), fig(1.0, None))])


# -- whole runs against stand-in engines ----------------------------------------------------------

STAND_IN = """models:
  - name: tiny
    source: path:{repo}/models/tiny-llama-base
    env: {{FAKE_TOKEN_DELAY: "0.002"}}
"""


def bench(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    config = tmp_path / "models.yaml"
    config.write_text(STAND_IN.format(repo=REPO))
    argv = [sys.executable, str(REPO / "bench" / "throughput.py"), "--config", str(config),
            "--model", "tiny", "--engine-module", "tests.fake_engine", "--max-tokens", "8",
            "--ready-timeout", "60", *args]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def marker(output: str) -> str:
    """The instance id the script marked its `sem run` with (printed as it starts it)."""
    found = re.search(rf"{INSTANCE_ENV}=([0-9a-f]+)", output)
    assert found, output
    return found.group(1)


def test_a_sweep_against_stand_in_engines_prints_the_table_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "figures.json"
    proc = bench(
        tmp_path, "--levels", "1,3", "--duration", "0.5", "--reps", "2", "--json", str(out)
    )
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, output
    assert "| 3 | **sem/direct** |" in output
    assert "sem stopped" in output
    result = json.loads(out.read_text())
    assert [level["concurrency"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        for path in ("direct", "sem"):
            assert level[path]["errors"] == 0 and level[path]["tokens_per_s"] > 0, level
            assert level[path]["itl_p50"] is not None and level[path]["itl_p50"] > 0
        assert level["ratio"]["tokens_per_s"] > 0
    assert result["state"]["before"]["cores"] == os.cpu_count()
    assert pids_with_env(INSTANCE_ENV, marker(output)) == []


def test_ctrl_c_mid_sweep_stops_sem_and_its_engines(tmp_path: Path) -> None:
    proc = bench(tmp_path, "--levels", "2", "--duration", "30", "--reps", "1")
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if "rep 1/1 direct" in line:  # the first run has begun
            break
    instance = marker(seen)
    assert len(pids_with_env(INSTANCE_ENV, instance)) >= 4, seen  # sem run, its two, an engine
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + output
    assert "sem stopped" in output
    poll(lambda: pids_with_env(INSTANCE_ENV, instance) == [], 5, "no process of the run left")
