"""Measured needs: the pure rules, the store's `measured` table and its migration, `sem plan`
and `sem ps` with measured figures, and the CPU measurement of a real process group."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sem.cli import memory_column
from supervisor.config import ModelSpec
from supervisor.measure import MARGIN, RAISE, after_start_failure, cpu_need, gpu_need, group_uss
from supervisor.start_failure import FailureKind, StartFailure
from supervisor.store import Measurement, Store, StoreError, spec_digest
from tests.checkpoints import llama2_7b
from tests.conftest import REPO

GiB = 1024**3
SEM = str(Path(sys.executable).with_name("sem"))

# sem.db as sem wrote it before the `measured` table (schema 1).
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE desired (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, origin TEXT NOT NULL, updated REAL NOT NULL
);
CREATE TABLE applied_config (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE engines (
    replica TEXT PRIMARY KEY, model TEXT NOT NULL, pid INTEGER NOT NULL,
    create_time REAL NOT NULL, port INTEGER NOT NULL, spec_digest TEXT NOT NULL,
    devices TEXT NOT NULL, reserved INTEGER NOT NULL, log_path TEXT NOT NULL,
    updated REAL NOT NULL
);
PRAGMA user_version=1;
"""


def test_the_gpu_need_gives_the_intended_kv_cache_with_the_margin_on_the_rest():
    # 18 GiB budget, vLLM found 3 GiB for KV: 15 GiB are not KV; the spec meant 4 GiB of KV.
    assert gpu_need(18 * GiB, 3 * GiB, 4 * GiB) == math.ceil(15 * GiB * (1 + MARGIN)) + 4 * GiB
    # A start that found negative KV memory still says what the rest took.
    assert gpu_need(18 * GiB, -GiB, 4 * GiB) == math.ceil(19 * GiB * (1 + MARGIN)) + 4 * GiB
    assert cpu_need(10 * GiB, 8 * GiB) == math.ceil(10 * GiB * (1 + MARGIN))
    assert cpu_need(GiB, 8 * GiB) == 8 * GiB, "on the CPU untouched KV pages do not count yet"


def test_an_out_of_memory_start_raises_the_need_only_where_the_need_was_short():
    oom = FailureKind.OUT_OF_MEMORY
    kv = StartFailure(oom, "ValueError: No available memory for the cache blocks.", -GiB)
    assert after_start_failure(kv, 18 * GiB, 4 * GiB) == gpu_need(18 * GiB, -GiB, 4 * GiB)
    torch = StartFailure(oom, "torch.OutOfMemoryError: CUDA out of memory.", None)
    assert after_start_failure(torch, 16 * GiB, 4 * GiB) == math.ceil(16 * GiB * RAISE)
    free = StartFailure(oom, "ValueError: Free memory on device cuda:0 (1/24 GiB) ...", None)
    assert after_start_failure(free, 18 * GiB, 4 * GiB) is None, "the GPU was short, not the need"
    bad = StartFailure(FailureKind.BAD_CONFIG, "error: unrecognized arguments: --x", None)
    assert after_start_failure(bad, 18 * GiB, 4 * GiB) is None


def test_a_schema_1_database_gains_the_measured_table_and_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "sem.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO desired VALUES ('a', ?, 'api', 1.0)",
                   (ModelSpec(name="a", source="path:/m").model_dump_json(),))  # fmt: skip
    store = Store(path)
    assert [d.spec.name for d in store.desired()] == ["a"]
    found = Measurement("a", "d1", "gpu", 19 * GiB, 19 * GiB, 18 * GiB, 3 * GiB, "ready")
    store.put_measurement(found)
    store.close()
    again = Store(path)
    assert again.measurement("a", "d1", "gpu") == found
    assert again.measurement("a", "d1", "cpu") is None
    assert again._db.execute("PRAGMA user_version").fetchone()[0] == 2
    again.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=3")
    with pytest.raises(StoreError, match="schema version 3"):
        Store(path)


def test_sem_plan_uses_the_need_measured_in_the_state_folder(tmp_path: Path):
    folder = llama2_7b(tmp_path / "llama2-7b")
    spec = ModelSpec(name="llama", source=f"path:{folder}", max_model_len=4096)
    config = tmp_path / "box.yaml"
    config.write_text(
        f"models:\n  - {{name: llama, source: 'path:{folder}', max_model_len: 4096}}\n"
    )
    store = Store(tmp_path / "state" / "sem.db")
    found = Measurement("llama", spec_digest(spec), "gpu", int(20.5 * GiB), int(21 * GiB),
                        int(18.1 * GiB), 3 * GiB, "ready")  # fmt: skip
    store.put_measurement(found)
    store.close()

    def plan(*extra: str) -> str:
        return subprocess.run(
            [SEM, "plan", str(config), "--inventory", "24GiB", *extra],
            capture_output=True, text=True, check=True, cwd=REPO,
        ).stdout  # fmt: skip

    assert "18.1 GiB " in plan() and "*" not in plan()
    measured = plan("--state-dir", str(tmp_path / "state"))
    assert "20.5 GiB*" in measured and "measured by an earlier engine" in measured


def test_sem_plan_refuses_a_state_folder_without_a_database(tmp_path: Path):
    config = tmp_path / "box.yaml"
    config.write_text("models: []\n")
    done = subprocess.run([SEM, "plan", str(config), "--inventory", "24GiB", "--state-dir",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert done.returncode != 0 and "--state-dir: no sem.db in" in done.stderr


def test_sem_ps_memory_column_marks_the_figure_placement_uses():
    assert memory_column(None) == "-"
    assert memory_column({"estimate": 18 * GiB, "measured": None,
                          "used_for_placement": 18 * GiB}) == "18.0G*/-"  # fmt: skip
    assert memory_column({"estimate": 18 * GiB, "measured": int(19.5 * GiB),
                          "used_for_placement": int(19.5 * GiB)}) == "18.0G/19.5G*"  # fmt: skip


def test_a_process_groups_memory_is_its_uss_summed():
    code = (
        "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], process_group=0)
    try:
        deadline = time.monotonic() + 10
        while (used := group_uss(proc.pid)) < 200 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 200 * 2**20 <= used < 400 * 2**20
    finally:
        proc.kill()
        proc.wait()
