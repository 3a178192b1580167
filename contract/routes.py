"""The route table: what the supervisor publishes and the gateway routes by.

A leaf module: it imports neither wing, so both can depend on it (supervisor -> route table ->
gateway). The wire form is plain JSON; `RouteTable.from_json(t.to_json()) == t`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplicaRoute:
    """One engine replica as the gateway sees it."""

    id: str
    state: str
    url: str | None  # base URL of the engine's OpenAI server, None until it has a port
    max_num_seqs: int
    api_key: str | None = None  # the engine demands it as a bearer token (cluster engines)

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

    @property
    def ready_replicas(self) -> tuple[ReplicaRoute, ...]:
        return tuple(r for r in self.replicas if r.ready)


@dataclass(frozen=True)
class RouteTable:
    """A versioned snapshot: a higher version is always newer."""

    version: int = 0
    models: dict[str, ModelRoute] = field(default_factory=dict)

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
        return cls(version=int(data["version"]), models=models)


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
