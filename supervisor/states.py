"""The whole lifecycle vocabulary: replica states, the legal transitions, model aggregates.

A leaf module (imports nothing of sem). Every state change goes through
`Replica._transition`, which checks `can_transition` and records an event.

    pending -> starting -> ready -> draining -> stopped
    starting/ready --crash or failed health--> restarting --backoff--> starting
    starting/ready/restarting --too many crashes--> failed --removal--> stopped
"""

from __future__ import annotations

from enum import StrEnum


class ReplicaState(StrEnum):
    PENDING = "pending"  # waiting for resources
    STARTING = "starting"  # engine process spawned, /health not yet 200
    READY = "ready"  # serving; the only state the gateway routes to
    DRAINING = "draining"  # no new requests; in-flight ones finish, then the engine stops
    RESTARTING = "restarting"  # engine died or went unhealthy; waiting out the backoff
    FAILED = "failed"  # gave up (crash loop or deterministic failure); resources released
    STOPPED = "stopped"  # terminal: engine gone, resources released


_TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    ReplicaState.PENDING: frozenset({ReplicaState.STARTING, ReplicaState.STOPPED}),
    ReplicaState.STARTING: frozenset(
        {
            ReplicaState.READY,
            ReplicaState.RESTARTING,
            ReplicaState.FAILED,
            ReplicaState.DRAINING,
        }
    ),
    ReplicaState.READY: frozenset(
        {ReplicaState.DRAINING, ReplicaState.RESTARTING, ReplicaState.FAILED}
    ),
    ReplicaState.RESTARTING: frozenset(
        {ReplicaState.STARTING, ReplicaState.FAILED, ReplicaState.STOPPED}
    ),
    ReplicaState.DRAINING: frozenset({ReplicaState.STOPPED}),
    ReplicaState.FAILED: frozenset({ReplicaState.STOPPED}),
    ReplicaState.STOPPED: frozenset(),
}

# Replicas in these states hold (or are about to hold) a reservation and an engine process.
ACTIVE_STATES = frozenset(
    {ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING, ReplicaState.RESTARTING}
)
TERMINAL_STATES = frozenset({ReplicaState.STOPPED})


def can_transition(current: ReplicaState, new: ReplicaState) -> bool:
    return new in _TRANSITIONS[current]


class ModelState(StrEnum):
    DOWNLOADING = "downloading"  # weights being cached
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"  # at least one replica ready
    DRAINING = "draining"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


# Most hopeful first: a model is as good as its best replica.
_AGGREGATE_ORDER = (
    ReplicaState.READY,
    ReplicaState.STARTING,
    ReplicaState.RESTARTING,
    ReplicaState.PENDING,
    ReplicaState.DRAINING,
    ReplicaState.FAILED,
    ReplicaState.STOPPED,
)


def aggregate(states: list[ReplicaState]) -> ModelState:
    """A model's state from its replicas' states (a model with none is stopped)."""
    for candidate in _AGGREGATE_ORDER:
        if candidate in states:
            return ModelState(candidate.value)
    return ModelState.STOPPED
