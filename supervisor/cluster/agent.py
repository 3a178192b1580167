"""The node agent: one named, detached Ray actor per node that owns the engines on that node.

It measures the node's devices (NVML, else what the node declared, else the CPU) and starts each
engine exactly as a single box does (`supervisor.engine.spawn_engine`: same command line, same
environment, its own process group, but tethered: it gets SIGTERM when the agent dies), owns it,
stops it and serves its log tail. Before an hf://
model's engine starts, it caches the model on its node (`cache`: sem's own downloader, into the
node's Hugging Face cache folder), polled by the supervisor for progress. Detached, it
outlives the supervisor that created it: a restarted supervisor finds it by name and re-adopts
its engines. It dies with its node (or its raylet), and so do the engines.

Ray runs it as an async actor: a call that waits for an engine's exit does not hold up the rest.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from supervisor.cache import CacheSettings, ModelCache
from supervisor.cache_job import Job, JobState
from supervisor.cluster import CACHE_ENV, NODE_ENV
from supervisor.cluster.nodes import NodeInfo, declared_devices
from supervisor.engine import (
    EngineCommand,
    EngineProcess,
    HubFetch,
    LaunchPlan,
    free_port,
    spawn_engine,
)
from supervisor.resources import Device, detect
from supervisor.source import Source
from supervisor.start_failure import log_tail


class NodeAgent:
    """Wrapped with `ray.remote` by the backend; plain (and testable) here."""

    def __init__(self, node: NodeInfo) -> None:
        self._node = node
        self._engines: dict[str, EngineProcess] = {}
        self._keys: dict[str, str | None] = {}  # replica id -> its engine's api key
        self._caches: dict[Path, ModelCache] = {}  # by cache folder
        self._fetching: dict[str, Job] = {}  # hf:// source -> its download, until seen ended

    async def devices(self) -> list[Device]:
        """What this node has now: declared GPUs if it declared their memory, else NVML or
        the CPU, as `detect("auto")` finds them on one box."""
        if declared := declared_devices(self._node):
            return declared
        inventory = await asyncio.to_thread(detect, "auto", "auto")
        return await asyncio.to_thread(inventory.devices)

    async def cache(self, fetch: HubFetch) -> dict[str, Any]:
        """Cache an hf:// model on this node, or join the download already on it; where it
        stands now: `state` (a download job's: checking, downloading, done, failed), `path`
        once done, `error`, bytes `done` of `total`. The folder is the node's SEM_CACHE_DIR,
        else the supervisor's own path."""
        job = self._fetching.get(fetch.source)
        if job is None:
            folder = Path(os.environ.get(CACHE_ENV) or fetch.cache_dir)
            cache = self._caches.get(folder)
            if cache is None:
                settings = CacheSettings(cache_dir=folder, endpoint=fetch.endpoint)
                cache = self._caches[folder] = ModelCache(settings)
            located = await cache.prepare(Source.parse(fetch.source))
            if isinstance(located, Path):
                return _status(JobState.DONE.value, located)
            job = self._fetching[fetch.source] = located
        if job.ended.is_set():
            del self._fetching[fetch.source]  # a later call looks again (a failure is retried)
        return _status(job.state.value, job.path, job.error, job.progress.done, job.progress.total)

    async def free_port(self, host: str) -> int:
        """A port free on this node at `host`, for the next engine to listen on."""
        return free_port(host)

    async def close_caches(self) -> None:
        """Stop the downloads (partial files stay to resume) and their threads."""
        caches, self._caches, self._fetching = self._caches, {}, {}
        for cache in caches.values():
            await cache.aclose()

    async def start(self, command: EngineCommand, plan: LaunchPlan, instance: str) -> int:
        """Start a replica's engine on this node; its pid. A previous engine of the same
        replica is stopped first (the supervisor restarts a replica under the same id)."""
        if plan.replica_id in self._engines:
            await self.stop(plan.replica_id, grace=5.0)
        marked = replace(plan, env={**plan.env, NODE_ENV: self._node.node_id})
        # Tethered: the engine dies with this agent (with its node, or `ray stop` on it).
        engine = await spawn_engine(command, marked, instance, dict(os.environ), tether=True)
        self._engines[plan.replica_id] = engine
        self._keys[plan.replica_id] = plan.api_key
        return engine.pid

    async def wait(self, replica_id: str) -> int:
        """Until the engine exits; its exit code (-1 if this agent has no such engine)."""
        engine = self._engines.get(replica_id)
        return -1 if engine is None else await engine.wait()

    async def stop(self, replica_id: str, grace: float) -> bool:
        """Stop the engine's whole group and forget it; True if it had to be killed."""
        engine = self._engines.pop(replica_id, None)
        return False if engine is None else await engine.stop(grace)

    async def engines(self) -> dict[str, dict[str, Any]]:
        """The engines this agent owns, for re-adoption by a restarted supervisor."""
        return {
            replica_id: {
                "pid": engine.pid, "port": engine.port, "log_path": str(engine.log_path),
                "returncode": engine.returncode, "api_key": self._keys.get(replica_id),
            }
            for replica_id, engine in self._engines.items()
        }  # fmt: skip

    async def log_tail(self, replica_id: str, lines: int = 20) -> str:
        """The last lines of the engine's log, which is on this node's disk."""
        engine = self._engines.get(replica_id)
        return "" if engine is None else await asyncio.to_thread(log_tail, engine, lines)


def _status(
    state: str, path: Path | None, error: object = None, done: int = 0, total: int = 0
) -> dict[str, Any]:
    """`cache`'s answer, plain data for the trip back to the supervisor."""
    return {
        "state": state, "path": None if path is None else str(path),
        "error": None if error is None else str(error), "done": done, "total": total,
    }  # fmt: skip
