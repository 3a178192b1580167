"""models.yaml applied again on a running supervisor: POST /reload and SIGHUP.

A reload is all-or-nothing (an invalid file or model changes nothing, InvalidConfig says why)
and a file that lists no models any more, as an emptied or half-written one does, is not
taken as "remove everything" unless the caller confirms it (ConfirmationRequired otherwise:
409 on the API, an error in the log on SIGHUP).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import ConfigError, ModelSpec, SemConfig, load_config
from supervisor.errors import ConfirmationRequired, InvalidConfig
from supervisor.manager import Manager
from supervisor.reconcile import ConfigDiff

log = logging.getLogger("sem.supervisor")

RESTART_ONLY = (
    "devices",
    "cpu_memory_budget",
    "recheck_interval",
    "cluster",
    "min_residency",
    "autoscale",
)


def removes_every_model(manager: Manager, models: list[ModelSpec]) -> list[str]:
    """The models from models.yaml that a reload to `models` would all remove when the file
    lists none any more; [] otherwise."""
    if models:
        return []
    return sorted(e.spec.name for e in manager.entries() if e.origin == "config" and not e.leaving)


@dataclass(frozen=True)
class Reloader:
    """Reloads `path` into `manager`; the settings outside `models` apply only at restart."""

    path: Path
    manager: Manager
    started_with: SemConfig
    drain_timeout: float

    async def __call__(self, confirm_remove_all: bool = False) -> ConfigDiff:
        try:
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            raise InvalidConfig(f"models.yaml not reloaded: {exc}") from None
        if not confirm_remove_all and (running := removes_every_model(self.manager, new.models)):
            raise ConfirmationRequired(
                f"{self.path} lists no models: reloading it would drain and stop"
                f" {', '.join(running)}. Nothing was changed; to do it, POST"
                " /reload?confirm_remove_all=true (`sem reload --yes`)"
            )
        if ignored := [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.started_with, k)]:
            log.warning("reload applies models only; %s take effect at restart", ", ".join(ignored))
        diff = await self.manager.reload(new.models, self.drain_timeout)
        log.info("reloaded %s: %s", self.path, diff)
        return diff
