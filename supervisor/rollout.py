"""Reloading models.yaml: new models added, unlisted ones removed, changed ones rolled out.

A reload acts on the file's changes since it was last applied (reconcile.py), not on the whole
file, so runtime edits (`sem add`, `sem rm`) stay. A changed model is rolled replica by replica,
so a model with 2+ replicas keeps serving.

sem.db never runs ahead of what runs: a changed model's new spec becomes its desired state only
once the model takes it. If the new spec's files cannot be cached or sized, the old engines keep
serving, the model's reason and a `rollout_failed` event say why, and models.yaml's entry counts
as not applied (the next reload tries it again).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from supervisor.cache_job import Job
from supervisor.config import ModelSpec
from supervisor.errors import SupervisorError
from supervisor.events import EventKind, EventLog
from supervisor.models import ModelEntry
from supervisor.reconcile import ConfigDiff, diff_config
from supervisor.registry import Registry
from supervisor.sizing import Prepared, after_download
from supervisor.states import ModelPhase, ReplicaState
from supervisor.store import Store, spec_digest

log = logging.getLogger("sem.rollout")


@dataclass(frozen=True)
class Rollout:
    """One changed model's move to a new spec."""

    spec: ModelSpec
    prepared: Prepared  # its folder and size, or the download that comes first
    before: ModelSpec | None  # models.yaml's entry as applied before (restored on failure)
    drain_timeout: float


class Rollouts:
    """Applies models.yaml to the registry, one reload at a time."""

    def __init__(self, registry: Registry, store: Store, events: EventLog) -> None:
        self._registry = registry
        self._store = store
        self._events = events
        self._reloading = asyncio.Lock()

    async def reload(
        self, config: list[ModelSpec], drain_timeout: float, strict: bool = True
    ) -> ConfigDiff:
        """Apply models.yaml's changes since it was last applied: new models are added, models
        no longer listed are drained and stopped, changed ones are rolled replica by replica.

        Every added or changed model is checked before anything changes: if one is invalid,
        InvalidSpec says which and why, and what runs is untouched. Not `strict` (at start):
        an invalid model is skipped with a `model_invalid` event, the others go ahead, and the
        skipped one is tried again at the next reload.
        """
        async with self._reloading:
            diff = diff_config(self._store.applied_config(), config)
            prepared = await self._prepare_all(diff.added + diff.changed, strict)
            for spec in diff.added + diff.changed:
                if spec.name not in prepared:
                    continue  # invalid, skipped (not strict)
                entry = self._registry.find(spec.name)
                if entry is None or entry.leaving:
                    self._registry.create(spec, "config", prepared[spec.name])
                    self._store.put_desired(spec, "config")
                else:  # its desired state changes once the rollout has the new spec
                    before = self._store.applied_config().get(spec.name)
                    rollout = Rollout(spec, prepared[spec.name], before, drain_timeout)
                    self._reconfigure(entry, rollout)
            for name in diff.removed:
                entry = self._registry.find(name)
                if entry is not None and entry.origin == "config" and not entry.leaving:
                    self._registry.remove(name, drain_timeout)
            invalid = {s.name for s in diff.added + diff.changed} - set(prepared)
            self._store.set_applied_config([s for s in config if s.name not in invalid])
            self._events.emit(EventKind.RELOADED, "models.yaml", str(diff))
            return diff

    async def _prepare_all(self, specs: list[ModelSpec], strict: bool) -> dict[str, Prepared]:
        """Each valid model's folder and size (or download); `strict`: the first invalid one's
        InvalidSpec, else it is left out with a `model_invalid` event."""
        prepared: dict[str, Prepared] = {}
        for spec in specs:
            try:
                prepared[spec.name] = await self._registry.prepare(spec)
            except SupervisorError as exc:
                if strict:
                    raise
                self._events.emit(EventKind.MODEL_INVALID, spec.name, exc.message)
                log.error("%s", exc.message)
        return prepared

    def _reconfigure(self, entry: ModelEntry, rollout: Rollout) -> None:
        spec = rollout.spec
        self._events.emit(
            EventKind.MODEL_CHANGED, spec.name, f"new spec; {spec.min_replicas} replica(s)"
        )
        entry.origin = "config"
        if entry.rollout is not None:
            entry.rollout.cancel()
        entry.rollout = asyncio.create_task(
            self._roll_out(entry, rollout), name=f"rollout-{spec.name}"
        )

    async def _roll_out(self, entry: ModelEntry, rollout: Rollout) -> None:
        """Bring the replicas in line with a new spec (its files cached first if need be), one
        at a time: extras drained first; then each replica from an older spec gets a successor,
        which starts (beside it if memory allows, else once it is gone) while the old one
        drains; the next waits until that successor is ready, so a model with 2+ replicas keeps
        serving. Then missing ones."""
        spec, prepared, drain_timeout = rollout.spec, rollout.prepared, rollout.drain_timeout
        if isinstance(prepared, Job):
            try:
                prepared = await after_download(spec, prepared, self._registry.devices)
            except Exception as exc:  # nobody awaits this task: every failure is reported here
                self._failed(entry, rollout, exc)
                return
        entry.spec, (entry.model_ref, entry.estimate) = spec, prepared
        entry.rollout_failure = ""
        self._store.put_desired(spec, "config")
        if entry.phase is ModelPhase.UNLOADED:
            return  # nothing runs: its next load starts from the new spec
        digest = spec_digest(spec)
        live = [r for r in entry.replicas if not r.done]
        extras = live[spec.min_replicas :]
        await asyncio.gather(*(r.stop(drain_timeout) for r in extras))
        for old in [r for r in live if r not in extras and r.digest != digest]:
            new = self._registry.add_replica(entry)
            await old.stop(drain_timeout)
            entry.replicas.remove(old)
            await new.wait_for_state({ReplicaState.READY, ReplicaState.FAILED})
        entry.replicas = [r for r in entry.replicas if not r.done]
        self._registry.add_replicas(entry)

    def _failed(self, entry: ModelEntry, rollout: Rollout, exc: Exception) -> None:
        """The new spec cannot be had: say so, keep the old one running and in sem.db, and
        count models.yaml's entry as not applied."""
        why = exc.message if isinstance(exc, SupervisorError) else repr(exc)
        if not isinstance(exc, SupervisorError):
            log.error("rollout of %s failed", entry.spec.name, exc_info=exc)
        name = rollout.spec.name
        entry.rollout_failure = f"new spec not applied, still running the old one: {why}"
        self._events.emit(EventKind.ROLLOUT_FAILED, name, entry.rollout_failure, error=why)
        applied = self._store.applied_config()
        if rollout.before is None:
            applied.pop(name, None)
        else:
            applied[name] = rollout.before
        self._store.set_applied_config(list(applied.values()))
        self._registry.publish()  # the model's reason changed
