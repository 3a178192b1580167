"""The gateway's report to the supervisor: demand per model and load per replica.

The route table flows supervisor -> gateway; this report flows back, so that decisions only the
supervisor may take (restart a wedged engine, load a model on demand, unload an idle one, scale
replicas, finish a drain) use what only the gateway sees: requests queued and in flight, and
when bytes last came from each engine. Sent every second, and at once when a request arrives for
a model with no ready replica. Wire form: plain JSON; `GatewayReport.from_json(r.to_json()) == r`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelDemand:
    """What clients want of one model right now."""

    queued: int = 0  # requests waiting for a slot (the model may not be loaded at all)
    in_flight: int = 0  # requests holding a slot on one of its replicas
    last_request: float = 0.0  # unix time a request for it last arrived (0: never)
    oldest_wait: float = 0.0  # seconds the longest-queued request has waited (0: none queued)


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the gateway sees it."""

    in_flight: int = 0
    # Seconds since the engine last sent a byte for any request in flight; None when nothing is
    # in flight (an idle replica is not stalled).
    stalled_for: float | None = None


@dataclass(frozen=True)
class KeyUsage:
    """One API key's use since the gateway started (gateway.keys)."""

    requests: int = 0
    tokens: int = 0  # completion tokens charged
    last_used: float = 0.0  # unix time (0: not since the gateway started)


@dataclass(frozen=True)
class GatewayReport:
    time: float = 0.0  # unix time the gateway made it
    models: dict[str, ModelDemand] = field(default_factory=dict)
    replicas: dict[str, ReplicaLoad] = field(default_factory=dict)  # by replica id
    keys: dict[str, KeyUsage] = field(default_factory=dict)  # by API key id
    queue_timeout: float | None = None  # the gateway's bound on a request's wait (None: unsaid)

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "models": {
                name: {"queued": d.queued, "in_flight": d.in_flight,
                       "last_request": d.last_request, "oldest_wait": d.oldest_wait}
                for name, d in self.models.items()
            },
            "replicas": {
                rid: {"in_flight": r.in_flight, "stalled_for": r.stalled_for}
                for rid, r in self.replicas.items()
            },
            "keys": {
                kid: {"requests": u.requests, "tokens": u.tokens, "last_used": u.last_used}
                for kid, u in self.keys.items()
            },
            "queue_timeout": self.queue_timeout,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GatewayReport:
        """The report from its wire form; ValueError/KeyError/TypeError if it is malformed."""
        models = {
            str(name): ModelDemand(
                int(d["queued"]),
                int(d["in_flight"]),
                float(d["last_request"]),
                float(d.get("oldest_wait", 0.0)),
            )
            for name, d in dict(data.get("models", {})).items()
        }
        replicas = {
            str(rid): ReplicaLoad(
                int(r["in_flight"]),
                None if r.get("stalled_for") is None else float(r["stalled_for"]),
            )
            for rid, r in dict(data.get("replicas", {})).items()
        }
        keys = {
            str(kid): KeyUsage(int(u["requests"]), int(u["tokens"]), float(u["last_used"]))
            for kid, u in dict(data.get("keys", {})).items()
        }
        bound = data.get("queue_timeout")
        return cls(time=float(data["time"]), models=models, replicas=replicas, keys=keys,
                   queue_timeout=None if bound is None else float(bound))  # fmt: skip
