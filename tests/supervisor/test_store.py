"""The SQLite store and the models.yaml diff: what survives a restart, what a reload changes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from supervisor.config import ModelSpec
from supervisor.process_start import ProcessStart
from supervisor.reconcile import diff_config
from supervisor.store import (
    SCHEMA_VERSION,
    EngineRecord,
    KeyRecord,
    Store,
    StoreError,
    spec_digest,
)


def spec(name: str, **extra: object) -> ModelSpec:
    return ModelSpec(name=name, source="path:/models/x", **extra)  # type: ignore[arg-type]


def test_desired_state_and_engine_records_survive_reopening(tmp_path: Path):
    path = tmp_path / "state" / "sem.db"
    store = Store(path)
    store.put_desired(spec("a"), "config")
    store.put_desired(spec("b", replicas=2), "api")
    store.set_applied_config([spec("a")])
    store.set_meta("instance", "abc")
    record = EngineRecord(
        "a-0", "a", 1234, ProcessStart("boot", 3600.25), 41000, spec_digest(spec("a")), ("0", "1"),
        2**30, tmp_path / "a-0.log", api_key="engine-secret",
    )  # fmt: skip
    store.put_engine(record)
    store.close()

    again = Store(path)
    assert [(d.spec, d.origin) for d in again.desired()] == [
        (spec("a"), "config"), (spec("b", replicas=2), "api"),
    ]  # fmt: skip
    assert again.applied_config() == {"a": spec("a")}
    assert again.get_meta("instance") == "abc"
    assert again.engines() == [record]
    again.drop_engine("a-0")
    again.drop_desired("b")
    assert again.engines() == []
    assert [d.spec.name for d in again.desired()] == ["a"]


def test_a_store_from_a_newer_sem_is_refused(tmp_path: Path):
    path = tmp_path / "sem.db"
    Store(path).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_a_reload_acts_on_the_files_changes_only():
    applied = {"a": spec("a"), "b": spec("b"), "c": spec("c")}
    diff = diff_config(applied, [spec("a"), spec("b", max_num_seqs=8), spec("d")])
    assert [s.name for s in diff.added] == ["d"]
    assert [s.name for s in diff.changed] == ["b"]
    assert diff.removed == ["c"]
    assert diff.unchanged == ["a"]
    assert str(diff) == "added: d; changed: b; removed: c; unchanged: a"


def test_scaling_or_reprioritising_does_not_change_the_engine_digest():
    assert spec_digest(spec("a")) == spec_digest(spec("a", replicas=3, priority=5))
    assert spec_digest(spec("a")) != spec_digest(spec("a", max_model_len=512))


def test_api_keys_are_kept_by_hash_and_dropped_by_id(tmp_path: Path):
    path = tmp_path / "sem.db"
    store = Store(path)
    everything = KeyRecord("k1", "ci", "ab" * 32, None, None, None, 1.0)
    limited = KeyRecord("k2", "team", "cd" * 32, ("a", "b"), 60, 1000, 2.0)
    store.put_api_key(everything)
    store.put_api_key(limited)
    store.close()
    again = Store(path)
    assert again.api_keys() == [everything, limited]
    assert again.drop_api_key("k1") and not again.drop_api_key("k1")
    assert again.api_keys() == [limited]


# sem.db as sem wrote it at schema 2: engines without their key, no api_keys table.
SCHEMA_2_ENGINES = """
CREATE TABLE engines (
    replica TEXT PRIMARY KEY, model TEXT NOT NULL, pid INTEGER NOT NULL,
    create_time REAL NOT NULL, port INTEGER NOT NULL, spec_digest TEXT NOT NULL,
    devices TEXT NOT NULL, reserved INTEGER NOT NULL, log_path TEXT NOT NULL,
    updated REAL NOT NULL
);
INSERT INTO engines VALUES ('a-0', 'a', 12, 1.5, 41000, 'd', '["0"]', 1024, '/l', 1.0);
PRAGMA user_version=2;
"""


def test_a_schema_2_database_gains_engine_keys_and_api_keys(tmp_path: Path):
    path = tmp_path / "sem.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_2_ENGINES)
    store = Store(path)
    (old,) = store.engines()
    assert old == EngineRecord("a-0", "a", 12, old.started, 41000, "d", ("0",), 1024, Path("/l"))
    assert old.api_key is None
    started = ProcessStart("boot", 2.5)
    keyed = EngineRecord(
        "a-1", "a", 13, started, 41001, "d", ("0",), 1024, Path("/l"), (), "s3cret"
    )
    store.put_engine(keyed)
    store.put_api_key(KeyRecord("k1", "ci", "ab" * 32, None, None, None, 1.0))
    store.close()
    again = Store(path)
    assert again.engines() == [old, keyed]
    assert [k.id for k in again.api_keys()] == ["k1"]
    assert again._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_policy_fields_leave_the_engine_digest_as_it_was():
    """Engines started before the elastic fields existed keep their digest (re-adopted after an
    upgrade), and a change of policy alone rolls no engine."""
    from supervisor.config import ModelSpec
    from supervisor.store import spec_digest

    spec = ModelSpec(name="m", source="path:/models/m")
    before_elastic = "4d2ae4b62ee5c3a4"  # spec_digest of this spec by the code before it
    policy = spec.model_copy(update={"load": "on_demand", "idle_unload": "5m", "evictable": True,
                                     "priority": 3})  # fmt: skip
    assert spec_digest(spec) == before_elastic == spec_digest(policy)
