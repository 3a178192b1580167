"""The one way e2e tests start `sem run`: `start_sem(models_yaml, ...)`.

Each run gets its own folder (models.yaml, state, log) and engines of the kind asked for: the
stand-in engine (fast) or real vLLM (the engine environment must exist). At the end of the test,
a run that had exited must have left no process behind; whatever is still running is killed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest

from tests.e2e.helpers import ENGINE_PYTHON, SemRun

Engine = Literal["fake", "vllm"]


class StartSem(Protocol):
    def __call__(
        self,
        models_yaml: str | Path,
        *,
        engine: Engine = "fake",
        ready: Sequence[str] = (),
        ready_timeout: float = 60,
        **options: Any,
    ) -> SemRun: ...


@pytest.fixture
def start_sem(tmp_path: Path) -> Iterator[StartSem]:
    """Start `sem run` over `models_yaml` (its text, or a file used as it is); with `ready`, wait
    until those models serve. `options` go to `SemRun` (ports, extra_args, ...)."""
    runs: list[SemRun] = []

    def start(
        models_yaml: str | Path,
        *,
        engine: Engine = "fake",
        ready: Sequence[str] = (),
        ready_timeout: float = 60,
        **options: Any,
    ) -> SemRun:
        folder = tmp_path / f"run-{len(runs)}"
        folder.mkdir()
        if isinstance(models_yaml, str):
            config = folder / "models.yaml"
            config.write_text(models_yaml)
        else:
            config = models_yaml
        if engine == "fake":
            options = {"engine_python": sys.executable, "engine_module": "tests.fake_engine",
                       **options}  # fmt: skip
        elif not Path(ENGINE_PYTHON).exists():
            pytest.fail(f"no engine environment at {ENGINE_PYTHON}: run `make install`")
        run = SemRun(config=config, state_dir=folder / "state", **options)
        runs.append(run.start())
        if ready:
            run.wait_ready(list(ready), timeout=ready_timeout)
        return run

    yield start
    orphans = {}
    for run in runs:
        if run.proc is not None and run.proc.poll() is not None:
            orphans[run.instance] = run.leftovers()  # it exited: nothing of it may remain
        run.kill_all()
    assert not any(orphans.values()), f"processes left behind by an exited sem run: {orphans}"
