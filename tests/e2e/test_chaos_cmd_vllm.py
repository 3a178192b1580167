"""`sem chaos` on real vLLM, as a user runs it on their own box before trusting sem: the faults
the older chaos test does not inject (a wedged engine that still answers /health, the supervisor
killed) and a frozen engine, each under load, every answer checked for all its tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import StartSem
from tests.e2e.helpers import SLOW_RESTARTS, demo_pair_yaml

SCENARIOS = ("wedge-engine", "wedge-idle-engine", "stop-engine", "kill-supervisor")


@pytest.mark.vllm
@pytest.mark.timeout(2400)
def test_sem_chaos_reports_no_failed_request_on_real_vllm(start_sem: StartSem):
    run = start_sem(demo_pair_yaml(), engine="vllm", ready=["base", "chat"], ready_timeout=600,
                    extra_args=SLOW_RESTARTS)  # fmt: skip
    argv = [
        sys.executable, "-m", "sem", "--admin", run.supervisor, "chaos", "--gateway",
        run.gateway, "--json", "--model", "base", "--clients", "8", "--max-tokens", "24",
        "--recover-timeout", "600", "--request-timeout", "700",
        *(a for name in SCENARIOS for a in ("--scenario", name)),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=2300)
    assert done.stdout.startswith("{"), done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["baseline"]["failed"] == 0, report["baseline"]
    assert [s["scenario"] for s in report["scenarios"]] == list(SCENARIOS)
    for s in report["scenarios"]:
        assert s["applicable"] and s["load"]["requests"] > 0, s
        assert s["load"]["failed"] == 0, (s["scenario"], s["load"]["failures"][:5])
        assert s["recovered"], s
        assert s["orphans"] == [], s
    assert done.returncode == 0, done.stderr[-2000:]
