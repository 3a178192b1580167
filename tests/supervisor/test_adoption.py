"""A restarted supervisor takes over the engines it recorded, whatever the wall clock did: an
engine is named by its pid and its start as the kernel keeps it (supervisor/process_start.py)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sem.chaos import procs
from supervisor import process_start
from supervisor.adoption import is_our_engine
from supervisor.config import ModelSpec
from supervisor.engine import REPLICA_ENV
from supervisor.process_start import same_process
from supervisor.store import Store
from tests.conftest import ManagerFactory, wait_until

from . import test_store


@pytest.fixture
def clock_stepped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock stepped 30 s ahead (NTP, or a VM restored from a snapshot): the boot time
    the kernel then reports moves with it, and with it every wall-clock process start."""
    booted = psutil.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: booted + 30.0)  # type: ignore[attr-defined]
    assert psutil.Process().create_time() > booted + 30.0, "the step shows in psutil"


async def test_a_restarted_supervisor_re_adopts_its_engine_after_the_clock_was_stepped(
    make_manager: ManagerFactory, model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    path = tmp_path / "sem.db"
    spec = ModelSpec(name="m", source=f"path:{model_dir}")
    first = make_manager(store=Store(path))
    await first.add(spec)
    await wait_until(lambda: first.get("m").replicas[0].state.value == "ready", what="m ready")
    pid = first.get("m").replicas[0].process.pid  # type: ignore[union-attr]

    request.getfixturevalue("clock_stepped")
    second = make_manager(store=Store(path))  # a restarted supervisor, same state
    await second.restore([spec], drain_timeout=1)
    replica = second.get("m").replicas[0]
    assert replica.process is not None and replica.process.pid == pid, "re-adopted, not restarted"
    (record,) = Store(path).engines()
    assert record.pid == pid and same_process(pid, record.started), "and watched as alive"
    engines = procs.marked_engines(procs.instance_of([pid]) or "")
    assert {e.pgid for e in engines if e.replica == "m-0"} == {pid}, "no second engine started"


@pytest.fixture
def live_engine() -> Iterator[subprocess.Popen[bytes]]:
    """A process marked as replica a-0's engine, as an older sem left it running."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, REPLICA_ENV: "a-0"},
    )
    yield child
    child.kill()
    child.wait()


def test_an_engine_an_older_sem_recorded_is_still_its_own_after_the_upgrade(
    tmp_path: Path, live_engine: subprocess.Popen[bytes]
):
    """Schema 3 kept an engine's start as wall-clock time; the upgrade converts it."""
    path = tmp_path / "sem.db"
    wall_clock = psutil.Process(live_engine.pid).create_time()
    with sqlite3.connect(path) as db:
        db.executescript(test_store.SCHEMA_2_ENGINES)
        db.execute("ALTER TABLE engines ADD COLUMN api_key TEXT")
        db.execute("UPDATE engines SET pid = ?, create_time = ?", (live_engine.pid, wall_clock))
        db.execute("PRAGMA user_version=3")
    (record,) = Store(path).engines()
    assert record.started.boot == process_start.boot_id()
    assert is_our_engine(record)
    live_engine.kill()
    live_engine.wait()
    assert not is_our_engine(record)
