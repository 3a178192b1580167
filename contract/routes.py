"""The route table: what the supervisor publishes and the gateway routes by.

A leaf module: it imports neither wing, so both can depend on it (supervisor -> route table ->
gateway). The wire form is plain JSON; `RouteTable.from_json(t.to_json()) == t`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


def key_hash(key: str) -> str:
    """What sem keeps of an API key: its sha256 (hex). Keys are 32 random bytes, so a plain
    hash cannot be reversed by guessing; the hashes are not secret, the keys are."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ReplicaRoute:
    """One engine replica as the gateway sees it."""

    id: str
    state: str
    url: str | None  # base URL of the engine's OpenAI server, None until it has a port
    max_num_seqs: int
    api_key: str | None = None  # the engine demands it as a bearer token (every engine sem starts)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.url is not None


@dataclass(frozen=True)
class ModelRoute:
    """A model: its aggregate state, why it is in it, and its replicas."""

    name: str
    state: str
    reason: str
    replicas: tuple[ReplicaRoute, ...] = ()
    # Measured seconds from an engine's start to ready (None: not measured yet): what a request
    # for an unloaded model would wait, so the gateway can say so at once (Retry-After).
    load_seconds: float | None = None

    @cached_property
    def ready_replicas(self) -> tuple[ReplicaRoute, ...]:
        """Computed once per table (a table is never changed, only replaced): the gateway asks
        on every request."""
        return tuple(r for r in self.replicas if r.ready)


@dataclass(frozen=True)
class KeyRoute:
    """An API key as the gateway checks it: its hash, never the key itself."""

    id: str
    hash: str  # key_hash of the key
    models: tuple[str, ...] | None = None  # the models it may use; None: all
    requests_per_minute: int | None = None  # None: no limit
    tokens_per_minute: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hash": self.hash,
            "models": None if self.models is None else list(self.models),
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRoute:
        models = data.get("models")
        return cls(
            id=str(data["id"]),
            hash=str(data["hash"]),
            models=None if models is None else tuple(str(m) for m in models),
            requests_per_minute=_optional_int(data.get("requests_per_minute")),
            tokens_per_minute=_optional_int(data.get("tokens_per_minute")),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class RouteTable:
    """A versioned snapshot: a higher version is always newer.

    `keys`: the gateway's API keys (empty: keys are off unless the gateway requires them). With
    them and the engines' own keys the table is a secret (see docs/security.md)."""

    version: int = 0
    models: dict[str, ModelRoute] = field(default_factory=dict)
    keys: tuple[KeyRoute, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "models": {
                name: {
                    "state": m.state,
                    "reason": m.reason,
                    "load_seconds": m.load_seconds,
                    "replicas": [_replica_json(r) for r in m.replicas],
                }
                for name, m in self.models.items()
            },
            "keys": [k.to_json() for k in self.keys],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouteTable:
        models = {
            name: ModelRoute(
                name=name,
                state=str(m["state"]),
                reason=str(m.get("reason", "")),
                replicas=tuple(
                    ReplicaRoute(
                        id=str(r["id"]),
                        state=str(r["state"]),
                        url=r.get("url"),
                        max_num_seqs=int(r.get("max_num_seqs", 1)),
                        api_key=r.get("api_key"),
                    )
                    for r in m.get("replicas", [])
                ),
                load_seconds=None if m.get("load_seconds") is None else float(m["load_seconds"]),
            )
            for name, m in data.get("models", {}).items()
        }
        keys = tuple(KeyRoute.from_json(k) for k in data.get("keys", []))
        return cls(version=int(data["version"]), models=models, keys=keys)


def _replica_json(r: ReplicaRoute) -> dict[str, Any]:
    """A replica's wire form; `api_key` only when it has one (the field is optional)."""
    out: dict[str, Any] = {
        "id": r.id,
        "state": r.state,
        "url": r.url,
        "max_num_seqs": r.max_num_seqs,
    }
    if r.api_key is not None:
        out["api_key"] = r.api_key
    return out
