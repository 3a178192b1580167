"""Reloading models.yaml: new models added, unlisted ones removed, changed ones rolled out.

A reload acts on the file's changes since it was last applied (reconcile.py), not on the whole
file, so runtime edits (`sem add`, `sem rm`) stay. A changed model is rolled replica by replica,
so a model with 2+ replicas keeps serving.
"""

from __future__ import annotations

import asyncio
import logging

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
            prepared = self._prepare_all(diff.added + diff.changed, strict)
            for spec in diff.added + diff.changed:
                if spec.name not in prepared:
                    continue  # invalid, skipped (not strict)
                entry = self._registry.find(spec.name)
                if entry is None or entry.leaving:
                    self._registry.create(spec, "config", prepared[spec.name])
                else:
                    self._reconfigure(entry, spec, prepared[spec.name], drain_timeout)
                self._store.put_desired(spec, "config")
            for name in diff.removed:
                entry = self._registry.find(name)
                if entry is not None and entry.origin == "config" and not entry.leaving:
                    self._registry.remove(name, drain_timeout)
            invalid = {s.name for s in diff.added + diff.changed} - set(prepared)
            self._store.set_applied_config([s for s in config if s.name not in invalid])
            self._events.emit(EventKind.RELOADED, "models.yaml", str(diff))
            return diff

    def _prepare_all(self, specs: list[ModelSpec], strict: bool) -> dict[str, Prepared]:
        """Each valid model's folder and size (or download); `strict`: the first invalid one's
        InvalidSpec, else it is left out with a `model_invalid` event."""
        prepared: dict[str, Prepared] = {}
        for spec in specs:
            try:
                prepared[spec.name] = self._registry.prepare(spec)
            except SupervisorError as exc:
                if strict:
                    raise
                self._events.emit(EventKind.MODEL_INVALID, spec.name, exc.message)
                log.error("%s", exc.message)
        return prepared

    def _reconfigure(
        self, entry: ModelEntry, spec: ModelSpec, prepared: Prepared, drain_timeout: float
    ) -> None:
        self._events.emit(
            EventKind.MODEL_CHANGED, spec.name, f"new spec; {spec.min_replicas} replica(s)"
        )
        entry.origin = "config"
        if entry.rollout is not None:
            entry.rollout.cancel()
        entry.rollout = asyncio.create_task(
            self._roll_out(entry, spec, prepared, drain_timeout), name=f"rollout-{spec.name}"
        )

    async def _roll_out(
        self, entry: ModelEntry, spec: ModelSpec, prepared: Prepared, drain_timeout: float
    ) -> None:
        """Bring the replicas in line with a new spec (its files cached first if need be), one
        at a time: extras drained first; then each replica from an older spec gets a successor,
        which starts (beside it if memory allows, else once it is gone) while the old one
        drains; the next waits until that successor is ready, so a model with 2+ replicas keeps
        serving. Then missing ones."""
        if isinstance(prepared, Job):
            prepared = await after_download(spec, prepared, self._registry.devices)
        entry.spec, (entry.model_ref, entry.estimate) = spec, prepared
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
