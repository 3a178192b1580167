"""The whole lifecycle vocabulary: replica and model states, their legal transitions.

A leaf module (imports nothing of sem). Every replica state change goes through
`Replica._transition`, which checks `can_transition` and records an event:

    pending -> starting -> ready -> draining -> stopped
    starting/ready --crash or failed health--> restarting --backoff--> starting
    starting/ready/restarting --too many crashes--> failed --removal--> stopped
    starting --out of memory at start--> pending (placed again);  --bad config--> failed
    starting --removed before its engine spawned (a node still caching its model)--> stopped

A model has a phase of its own, changed only by `ModelEntry.transition` (models.py), which checks
`can_enter` and records an event:

    new -> downloading -> active -> draining -> removed
    new -> active;  downloading --files not cached or sized--> failed --removal--> draining
    new/downloading -> unloaded (load: on_demand);  active <-> unloaded (loaded on demand;
    unloaded when idle or evicted: its replicas drain and stop);  unloaded --removal--> draining

The state a model shows (API, route table) is its phase, except while active: then it is its
best replica's (`shown_state`).
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
            ReplicaState.PENDING,
            ReplicaState.READY,
            ReplicaState.RESTARTING,
            ReplicaState.FAILED,
            ReplicaState.DRAINING,
            ReplicaState.STOPPED,
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


class ModelPhase(StrEnum):
    """What the supervisor does with a model: its own state, apart from its replicas'."""

    NEW = "new"  # just made: its files are looked up next
    DOWNLOADING = "downloading"  # its files are being cached; no replicas yet
    ACTIVE = "active"  # sized up: its replicas are placed, run and restarted
    UNLOADED = "unloaded"  # sized up, no replicas wanted until a request asks (elastic.py)
    FAILED = "failed"  # its files could not be cached or sized; the reason is kept
    DRAINING = "draining"  # removed: its replicas drain and stop, it takes no new requests
    REMOVED = "removed"  # terminal: every replica stopped, gone from the registry


_MODEL_TRANSITIONS: dict[ModelPhase, frozenset[ModelPhase]] = {
    ModelPhase.NEW: frozenset({ModelPhase.DOWNLOADING, ModelPhase.ACTIVE, ModelPhase.UNLOADED}),
    ModelPhase.DOWNLOADING: frozenset(
        {ModelPhase.ACTIVE, ModelPhase.UNLOADED, ModelPhase.FAILED, ModelPhase.DRAINING}
    ),
    ModelPhase.ACTIVE: frozenset({ModelPhase.DRAINING, ModelPhase.UNLOADED}),
    ModelPhase.UNLOADED: frozenset({ModelPhase.ACTIVE, ModelPhase.DRAINING}),
    ModelPhase.FAILED: frozenset({ModelPhase.DRAINING}),
    ModelPhase.DRAINING: frozenset({ModelPhase.REMOVED}),
    ModelPhase.REMOVED: frozenset(),
}

# A model in these phases is on its way out: a reload that lists it again makes a new one.
LEAVING_PHASES = frozenset({ModelPhase.DRAINING, ModelPhase.REMOVED})


def can_enter(current: ModelPhase, new: ModelPhase) -> bool:
    return new in _MODEL_TRANSITIONS[current]


class ModelState(StrEnum):
    """The state a model shows in the API and the route table."""

    DOWNLOADING = "downloading"  # weights being cached
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"  # at least one replica ready
    DRAINING = "draining"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"
    UNLOADED = "unloaded"  # loaded on demand: a request for it queues while it loads


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


# The state shown for each phase but `active` (whose state is its replicas').
_SHOWN: dict[ModelPhase, ModelState] = {
    ModelPhase.NEW: ModelState.PENDING,
    ModelPhase.DOWNLOADING: ModelState.DOWNLOADING,
    ModelPhase.FAILED: ModelState.FAILED,
    ModelPhase.DRAINING: ModelState.DRAINING,
    ModelPhase.UNLOADED: ModelState.UNLOADED,
    ModelPhase.REMOVED: ModelState.STOPPED,
}


def shown_state(phase: ModelPhase, replicas: list[ReplicaState]) -> ModelState:
    """The state a model shows: an active model is as good as its best replica."""
    if phase is ModelPhase.ACTIVE:
        return aggregate(replicas)
    return _SHOWN[phase]
