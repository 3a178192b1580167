"""The supervisor's memory across restarts: desired state and engine records, in SQLite.

Five tables in `<state-dir>/sem.db`:
- `desired`: the models sem should run (name -> spec, origin `config` or `api`): models.yaml as
  last applied plus runtime adds and removes. A whole-system stop keeps it; only removals change it.
- `applied_config`: models.yaml as last applied, so a reload (or a start after an edit) applies
  the file's *changes*: a model removed at runtime stays removed until its entry in the file
  changes or comes back.
- `engines`: one row per live engine (replica id, pid, process start time, port, spec digest,
  placement): what a restarted supervisor checks before re-adopting an engine instead of
  starting it again. Its `devices` column is JSON: a list of [device id, bytes reserved there]
  pairs, or of ids alone, each reserving `reserved` (as an older sem wrote every record).
- `measured` (schema 2): what an engine of a model and spec digest was measured to need
  (measure.py), so later placements of that spec use it instead of the estimate. A database of
  schema 1 gains the table when a newer sem opens it; nothing else changes.
- `api_keys` (schema 3): the gateway's API keys, by id: name, sha256 of the key (never the key),
  the models it may use, its limits. Schema 3 also gives `engines` an `api_key` column: the
  secret each engine demands, so a re-adopted engine can still be called. An older database
  gains both when a newer sem opens it (its engines have no key: they are called without one).

Writes are tiny and rare (a model added, an engine started or stopped) and SQLite runs in WAL
mode with synchronous=NORMAL, where a commit is a write() without fsync: microseconds, so the
calls stay synchronous on the event loop. A crash loses at most the last commits, never the
file's consistency.

The specs hold the models' `env` (tokens, keys): the state folder is 0700 and sem.db with its
-wal and -shm files 0600, readable by sem's user only (set again at each start, so a folder
from an older sem is fixed too).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from supervisor.config import ModelSpec
from supervisor.process_start import ProcessStart, from_wall_clock

Origin = Literal["config", "api"]
SCHEMA_VERSION = 4
# 0: a new file; 1: before `measured`; 2: before `api_keys`; 3: engines' start as wall-clock time
KNOWN_VERSIONS = (0, 1, 2, 3, 4)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS desired (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, origin TEXT NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS applied_config (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS engines (
    replica TEXT PRIMARY KEY, model TEXT NOT NULL, pid INTEGER NOT NULL,
    started REAL NOT NULL, port INTEGER NOT NULL, spec_digest TEXT NOT NULL,
    devices TEXT NOT NULL, reserved INTEGER NOT NULL, log_path TEXT NOT NULL,
    updated REAL NOT NULL, api_key TEXT, boot_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS measured (
    model TEXT NOT NULL, spec_digest TEXT NOT NULL, device_kind TEXT NOT NULL,
    need INTEGER NOT NULL, used INTEGER NOT NULL, budget INTEGER NOT NULL,
    kv_cache INTEGER, source TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (model, spec_digest, device_kind)
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, models TEXT,
    requests_per_minute INTEGER, tokens_per_minute INTEGER, created REAL NOT NULL
);
"""


POLICY_FIELDS = {"replicas", "priority", "load", "idle_unload", "evictable"}


def spec_digest(spec: ModelSpec) -> str:
    """What an engine was started from: equal digests mean the same engine command line.

    Policy is left out (`replicas`, `priority`, `load`, `idle_unload`, `evictable`): none of it
    changes an engine, so changing it rolls nothing, and engines started before those fields
    existed keep their digest (they are re-adopted after an upgrade).
    """
    data = spec.model_dump(mode="json", exclude=POLICY_FIELDS)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DesiredModel:
    spec: ModelSpec
    origin: Origin


@dataclass(frozen=True)
class EngineRecord:
    replica: str
    model: str
    pid: int
    started: ProcessStart  # a reused pid has another start
    port: int
    spec_digest: str
    devices: tuple[str, ...]
    reserved: int  # bytes per device: the model's need
    log_path: Path
    # Bytes reserved on each device, in `devices`' order (more than `reserved` on the larger GPUs
    # of a tensor-parallel engine over unequal GPUs); empty: `reserved` on each.
    reservations: tuple[int, ...] = ()
    api_key: str | None = None  # the secret the engine demands (None: one of an older sem)


@dataclass(frozen=True)
class KeyRecord:
    """An API key of the gateway as kept: its hash, never the key."""

    id: str
    name: str
    hash: str
    models: tuple[str, ...] | None  # None: every model
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created: float  # unix time


def _devices(column: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The `devices` column: (device ids, bytes reserved on each; empty in an older record)."""
    items = json.loads(column)
    if all(isinstance(item, str) for item in items):  # an older sem: ids only
        return tuple(items), ()
    return tuple(str(i) for i, _ in items), tuple(int(b) for _, b in items)


def _devices_column(record: EngineRecord) -> str:
    """The `devices` column of a record: [id, bytes] pairs, or the ids alone (as an older sem
    wrote them) when every device reserves `reserved`."""
    if not record.reservations:
        return json.dumps(list(record.devices))
    return json.dumps([list(p) for p in zip(record.devices, record.reservations, strict=True)])


@dataclass(frozen=True)
class Measurement:
    """What one engine of a spec was measured to need, per device (measure.py says how)."""

    model: str
    spec_digest: str
    device_kind: str  # "gpu" or "cpu": a figure holds for the kind it was measured on
    need: int  # bytes per device later placements reserve (margin included)
    used: int  # bytes per device the engine's processes held (NVML, or USS on CPU)
    budget: int  # bytes per device it was given (its reservation)
    kv_cache: int | None  # bytes per device vLLM found for its KV cache, if its log said
    source: str  # "ready", "settled", or the start failure it was read from


class StoreError(Exception):
    pass


def private_folder(path: Path) -> Path:
    """`path`, made if missing, mode 0700: only sem's user may list or read what is in it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def _private_file(path: Path) -> None:
    """Create `path` if missing; mode 0600 either way (SQLite gives -wal and -shm the mode of
    the database file it creates them beside)."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    path.chmod(0o600)


class Store:
    def __init__(self, path: Path | None) -> None:
        """The store in file `path`; None keeps it in memory (tests, `sem plan`)."""
        self.path = path
        try:
            if path is not None:
                private_folder(path.parent)
                _private_file(path)
            # isolation_level=None: autocommit, with explicit transactions where needed.
            self._db = sqlite3.connect(path or ":memory:", isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in KNOWN_VERSIONS:
                raise StoreError(
                    f"{path}: schema version {version}, this sem knows {SCHEMA_VERSION}"
                )
            with self._transaction():
                self._upgrade_engines()
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            for suffix in ("-wal", "-shm"):  # made by an older sem, perhaps world-readable
                if path is not None and (side := Path(f"{path}{suffix}")).exists():
                    side.chmod(0o600)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror}") from None

    def close(self) -> None:
        self._db.close()

    def _upgrade_engines(self) -> None:
        """`engines` of an older file: schema 3 gains the `api_key` column; schema 4 keeps an
        engine's start as its boot and the seconds after it (`process_start.py` says why), where
        an older sem kept wall-clock time in `create_time`."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(engines)")}
        if "api_key" not in columns:
            self._db.execute("ALTER TABLE engines ADD COLUMN api_key TEXT")
        if "create_time" in columns:
            self._db.execute("ALTER TABLE engines RENAME COLUMN create_time TO started")
            self._db.execute("ALTER TABLE engines ADD COLUMN boot_id TEXT NOT NULL DEFAULT ''")
            rows = self._db.execute("SELECT replica, started FROM engines").fetchall()
            for replica, create_time in rows:
                start = from_wall_clock(create_time)
                self._db.execute(
                    "UPDATE engines SET started = ?, boot_id = ? WHERE replica = ?",
                    (start.seconds, start.boot, replica),
                )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- meta --------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- desired state -----------------------------------------------------------------------

    def desired(self) -> list[DesiredModel]:
        rows = self._db.execute("SELECT spec, origin FROM desired ORDER BY updated, name")
        return [DesiredModel(ModelSpec.model_validate_json(s), o) for s, o in rows]

    def put_desired(self, spec: ModelSpec, origin: Origin) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO desired (name, spec, origin, updated) VALUES (?, ?, ?, ?)",
            (spec.name, spec.model_dump_json(), origin, time.time()),
        )

    def drop_desired(self, name: str) -> None:
        self._db.execute("DELETE FROM desired WHERE name = ?", (name,))

    def applied_config(self) -> dict[str, ModelSpec]:
        rows = self._db.execute("SELECT name, spec FROM applied_config")
        return {name: ModelSpec.model_validate_json(spec) for name, spec in rows}

    def set_applied_config(self, specs: list[ModelSpec]) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM applied_config")
            db.executemany(
                "INSERT INTO applied_config (name, spec) VALUES (?, ?)",
                [(s.name, s.model_dump_json()) for s in specs],
            )

    # -- engines -----------------------------------------------------------------------------

    def engines(self) -> list[EngineRecord]:
        rows = self._db.execute(
            "SELECT replica, model, pid, boot_id, started, port, spec_digest, devices, reserved,"
            " log_path, api_key FROM engines"
        )
        records = []
        for r, m, pid, boot, started, port, d, dev, res, log, key in rows:
            ids, amounts = _devices(dev)
            start = ProcessStart(boot, started)
            records.append(
                EngineRecord(r, m, pid, start, port, d, ids, res, Path(log), amounts, api_key=key)
            )
        return records

    def put_engine(self, record: EngineRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO engines (replica, model, pid, boot_id, started, port,"
            " spec_digest, devices, reserved, log_path, updated, api_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.replica, record.model, record.pid, record.started.boot,
                record.started.seconds, record.port, record.spec_digest, _devices_column(record),
                record.reserved, str(record.log_path), time.time(), record.api_key,
            ),
        )  # fmt: skip

    def drop_engine(self, replica: str) -> None:
        self._db.execute("DELETE FROM engines WHERE replica = ?", (replica,))

    # -- measured needs ----------------------------------------------------------------------

    def measurement(self, model: str, digest: str, device_kind: str) -> Measurement | None:
        row = self._db.execute(
            "SELECT need, used, budget, kv_cache, source FROM measured"
            " WHERE model = ? AND spec_digest = ? AND device_kind = ?",
            (model, digest, device_kind),
        ).fetchone()
        return None if row is None else Measurement(model, digest, device_kind, *row)

    def put_measurement(self, m: Measurement) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO measured (model, spec_digest, device_kind, need, used,"
            " budget, kv_cache, source, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.model, m.spec_digest, m.device_kind, m.need, m.used, m.budget, m.kv_cache,
             m.source, time.time()),
        )  # fmt: skip

    # -- API keys ----------------------------------------------------------------------------

    def api_keys(self) -> list[KeyRecord]:
        rows = self._db.execute(
            "SELECT id, name, hash, models, requests_per_minute, tokens_per_minute, created"
            " FROM api_keys ORDER BY created, id"
        )
        return [
            KeyRecord(kid, name, h, None if m is None else tuple(json.loads(m)), rpm, tpm, c)
            for kid, name, h, m, rpm, tpm, c in rows
        ]

    def put_api_key(self, key: KeyRecord) -> None:
        models = None if key.models is None else json.dumps(list(key.models))
        self._db.execute(
            "INSERT INTO api_keys (id, name, hash, models, requests_per_minute,"
            " tokens_per_minute, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key.id, key.name, key.hash, models, key.requests_per_minute,
             key.tokens_per_minute, key.created),
        )  # fmt: skip

    def drop_api_key(self, key_id: str) -> bool:
        """Forget key `key_id`; False if there was none."""
        return self._db.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)).rowcount > 0
