"""The gateway's API keys, as the supervisor keeps them: made, listed, revoked; sent by hash.

A key is `sem-` and 32 random bytes (urlsafe base64). It is shown once, in the answer that
creates it; sem.db keeps its sha256 (store.py `api_keys`), and the route table carries the hash,
the models the key may use and its limits to the gateway (contract.routes.KeyRoute), which
checks requests against them (gateway.keys). Usage comes back in the gateway's report.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contract.report import KeyUsage
from contract.routes import KeyRoute, key_hash
from supervisor.errors import SupervisorError
from supervisor.store import KeyRecord, Store

KEY_PREFIX = "sem-"


class KeyNotFound(SupervisorError):
    status = 404
    type = "key_not_found"


class KeySpec(BaseModel):
    """POST /keys: what a new key may do."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    models: list[str] | None = Field(default=None, min_length=1)  # None: every model
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_route(record: KeyRecord) -> KeyRoute:
    return KeyRoute(
        record.id, record.hash, record.models, record.requests_per_minute,
        record.tokens_per_minute,
    )  # fmt: skip


def key_json(record: KeyRecord, usage: KeyUsage | None) -> dict[str, Any]:
    """A key as the admin API answers it: what the gateway gets but its hash, with its name and
    use (never the key)."""
    usage = usage or KeyUsage()
    answer = key_route(record).to_json()
    del answer["hash"]
    return {
        **answer,
        "name": record.name,
        "created": record.created,
        "last_used": usage.last_used or None,
        "requests": usage.requests,
        "tokens": usage.tokens,
    }


class KeyRing:
    """The keys in sem.db; every change is published to the gateway through `publish`."""

    def __init__(self, store: Store, publish: Callable[[tuple[KeyRoute, ...]], None]) -> None:
        self._store = store
        self._publish = publish
        self._records = {r.id: r for r in store.api_keys()}

    def records(self) -> list[KeyRecord]:
        return list(self._records.values())

    def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself (shown once, kept nowhere)."""
        key = new_key()
        models = None if spec.models is None else tuple(spec.models)
        record = KeyRecord(
            "key-" + secrets.token_hex(4), spec.name, key_hash(key), models,
            spec.requests_per_minute, spec.tokens_per_minute, time.time(),
        )  # fmt: skip
        self._store.put_api_key(record)
        self._records[record.id] = record
        self._publish(self.routes())
        return record, key

    def revoke(self, key_id: str) -> KeyRecord:
        """Forget key `key_id`: the gateway refuses it from its next route table on."""
        record = self._records.pop(key_id, None)
        if record is None:
            raise KeyNotFound(f"no API key {key_id!r} (known: {', '.join(self._records) or '-'})")
        self._store.drop_api_key(key_id)
        self._publish(self.routes())
        return record

    def routes(self) -> tuple[KeyRoute, ...]:
        """The keys as the route table carries them."""
        return tuple(key_route(r) for r in self._records.values())
