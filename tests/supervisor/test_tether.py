"""A tethered engine (a cluster node agent's) dies with the process that started it; an engine
on one box is not tethered, so it outlives a supervisor crash to be re-adopted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, running

# A stand-in for the node agent: spawns a fake engine, prints its pid, then waits to be killed.
STARTER = """
import asyncio, json, sys
from pathlib import Path
from supervisor.engine import LaunchPlan, free_port, spawn_engine
from tests.conftest import fake_engine_command

async def main():
    model, logs, tether = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    plan = LaunchPlan(replica_id="m-0", served_name="m", model=model, port=free_port(),
                      log_path=logs / "m-0.log", max_num_seqs=2)
    engine = await spawn_engine(fake_engine_command(), plan, "tether-test", {}, tether=tether)
    print(json.dumps({"pid": engine.pid}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def start_engine(
    model_dir: Path, tmp_path: Path, tether: bool
) -> tuple[subprocess.Popen[str], int]:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(model_dir), str(tmp_path), "1" if tether else "0"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert starter.stdout is not None
    return starter, int(json.loads(starter.stdout.readline())["pid"])


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("tether", [True, False])
def test_an_engine_dies_with_its_starter_only_when_tethered(
    model_dir: Path, tmp_path: Path, tether: bool
):
    starter, pid = start_engine(model_dir, tmp_path, tether)
    try:
        engine = psutil.Process(pid)
        assert "tests.fake_engine" in " ".join(engine.cmdline())  # the shim became the engine
        starter.kill()  # kill -9: no cleanup of its own
        starter.wait()
        # Tethered: gone in about a second (SIGTERM, then its own shutdown); else still there
        # well after that.
        assert gone_within(pid, 15 if tether else 3) is tether
    finally:
        starter.kill()
        starter.wait()
        if not gone_within(pid, 0):
            os.killpg(pid, signal.SIGKILL)
