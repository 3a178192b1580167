"""Shared fixtures: a stand-in engine command, fast lifecycle timings, a manager to drive."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.engine import EngineCommand
from supervisor.events import EventLog
from supervisor.launch import EngineSettings
from supervisor.manager import Manager
from supervisor.probe import EngineProbe
from supervisor.procgroup import INSTANCE_ENV, pids_with_env
from supervisor.replica import ReplicaTiming
from supervisor.resources import Inventory, StaticInventory
from supervisor.restart import RestartPolicy
from supervisor.scheduler import SchedulerSettings
from tests.hubrepos import GATED, Hub, build_test_hub

REPO = Path(__file__).resolve().parent.parent

FAST_TIMING = ReplicaTiming(
    start_timeout=15, health_interval=0.2, health_failures=2, progress_interval=5,
    stop_grace=2, drain_poll=0.05,
)  # fmt: skip
FAST_POLICY = RestartPolicy(backoff_base=0.1, backoff_cap=0.4, max_failures=3, window=60)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped by its parent)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def fake_engine_command(**env: str) -> EngineCommand:
    """Engines run `python -m tests.fake_engine` (same flags as vLLM), knobs via env."""
    return EngineCommand(
        python=sys.executable,
        module="tests.fake_engine",
        extra_env={"PYTHONPATH": str(REPO), **env},
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder that passes as a model source for the fake engine."""
    from tests.checkpoints import tiny_llama

    return tiny_llama(tmp_path / "fake-model")


ManagerFactory = Callable[..., Manager]


@pytest.fixture
async def make_manager(tmp_path: Path) -> AsyncIterator[ManagerFactory]:
    """Build managers over the fake engine; every one is shut down (and checked) at the end."""
    made: list[tuple[Manager, EngineProbe, str]] = []

    def factory(
        command: EngineCommand | None = None,
        inventory: Inventory | None = None,
        scheduling: SchedulerSettings | None = None,
        **kwargs: object,
    ) -> Manager:
        instance = uuid.uuid4().hex
        settings = EngineSettings(
            command=command or fake_engine_command(),
            state_dir=tmp_path / "state",
            instance=instance,
            parent_env={"PATH": "/usr/bin:/bin"},
        )
        probe = EngineProbe(timeout=2)
        manager = Manager(
            settings=settings,
            inventory=inventory or StaticInventory.parse("cpu:64GiB"),
            scheduling=scheduling or SchedulerSettings(recheck_interval=0.5),
            probe=probe,
            events=EventLog(),
            policy=kwargs.pop("policy", FAST_POLICY),  # type: ignore[arg-type]
            timing=kwargs.pop("timing", FAST_TIMING),  # type: ignore[arg-type]
            store=kwargs.pop("store", None),  # type: ignore[arg-type]
            elastic=kwargs.pop("elastic", None),  # type: ignore[arg-type]
            rng=kwargs.pop("rng", None),  # type: ignore[arg-type]
            gpu_memory=kwargs.pop("gpu_memory", None),  # type: ignore[arg-type]
        )
        made.append((manager, probe, instance))
        manager.start()
        return manager

    yield factory
    for manager, probe, instance in made:
        await manager.shutdown(drain_timeout=1)
        await probe.aclose()
        assert pids_with_env(INSTANCE_ENV, instance) == [], "engine processes left behind"


async def wait_until(predicate: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """The loopback hub (tests/hub_server.py), one per session: building its repos takes a
    second."""
    root = build_test_hub(tmp_path_factory.mktemp("hub"))
    server = Hub(root, gated=[GATED]).start()
    try:
        yield server
    finally:
        server.stop()
