"""The SQLite store and the models.yaml diff: what survives a restart, what a reload changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ModelSpec
from supervisor.reconcile import diff_config
from supervisor.store import EngineRecord, Store, StoreError, spec_digest


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
        "a-0", "a", 1234, 1700000000.25, 41000, spec_digest(spec("a")), ("0", "1"),
        2**30, tmp_path / "a-0.log",
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
