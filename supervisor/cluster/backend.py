"""The supervisor's side of a Ray cluster: its nodes, their agents, inventory and engines.

`RayCluster` is the seam the manager already has, twice over: an `Inventory` (`devices()`, every
alive node's devices as its agent measures them, with the node on each) and a spawner
(`spawn(command, plan, instance, env)`, the engine started by the agent of `plan.node`, after
`prepare(plan)` had that agent cache an hf:// model on its node). It
watches the nodes (`ray.nodes()` every `poll_interval`, 1 s) and reports those that join and
leave; `adopt()` finds the engines the agents still own after a supervisor restart.

Blocking Ray calls (`ray.init`, `ray.nodes`, `ray.get_actor`) run in worker threads from async
code; `devices()` is itself called from a worker thread by the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from supervisor.cluster import NAMESPACE, agent_name
from supervisor.cluster.agent import NodeAgent
from supervisor.cluster.handle import RayEngine
from supervisor.cluster.nodes import NodeInfo, alive_nodes, on_node
from supervisor.engine import EngineCommand, HubFetch, LaunchPlan
from supervisor.resources import Device
from supervisor.units import human

log = logging.getLogger("sem.cluster")

NodesChanged = Callable[[set[str], set[str]], None]  # (joined, lost) node ids


class NodeLost(ConnectionError):
    """The node a replica was placed on is gone: its engine cannot start there."""


class NotCachedOnNode(OSError):
    """The node could not cache the replica's hf:// model: its engine cannot start there."""


class RayCluster:
    def __init__(
        self,
        address: str,
        poll_interval: float = 1.0,
        call_timeout: float = 10.0,
        engines_on_head: bool = True,
    ) -> None:
        self.address = address
        self.engines_on_head = engines_on_head  # False: the head's devices are not offered
        self.poll_interval = poll_interval
        self.call_timeout = call_timeout
        self._agents: dict[str, Any] = {}  # node id -> ActorHandle
        self._known: set[str] = set()  # alive node ids at the last look
        self._watch: asyncio.Task[None] | None = None

    def connect(self) -> None:
        """Join the cluster as a driver in sem's namespace (blocking: call from a thread)."""
        ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)  # fmt: skip
        self._known = {n.node_id for n in self.nodes()}

    def nodes(self) -> list[NodeInfo]:
        return alive_nodes(ray.nodes())  # type: ignore[no-untyped-call]

    def agent(self, node: NodeInfo) -> Any:
        """The node's agent, created on first use (named and detached: one per node, ever)."""
        handle = self._agents.get(node.node_id)
        if handle is None:
            actor = ray.remote(NodeAgent).options(
                name=agent_name(node.node_id), namespace=NAMESPACE, lifetime="detached",
                get_if_exists=True, num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            )  # fmt: skip
            handle = self._agents[node.node_id] = actor.remote(node)
        return handle

    # -- Inventory ---------------------------------------------------------------------------

    def devices(self) -> list[Device]:
        """Every alive node's devices, measured by its agent (the head's only with
        `engines_on_head`); a node that does not answer within `call_timeout` is left out of
        this round."""
        nodes = [n for n in self.nodes() if self.engines_on_head or not n.head]
        refs = [(node, self.agent(node).devices.remote()) for node in nodes]
        found: list[Device] = []
        for node, ref in refs:
            try:
                found += on_node(node, ray.get(ref, timeout=self.call_timeout))
            except (RayError, GetTimeoutError) as exc:
                log.warning("node %s: no inventory (%s)", node.short, type(exc).__name__)
        return found

    # -- spawner -----------------------------------------------------------------------------

    async def spawn(
        self, command: EngineCommand, plan: LaunchPlan, instance: str, _env: Mapping[str, str]
    ) -> RayEngine:
        """Start the engine on `plan.node` through its agent. The node's own environment is
        the parent of the engine's, as a supervisor on that node would give it."""
        node, agent = await self._node_agent(plan)
        pid = int(await _on(node, agent.start.remote(command, plan, instance)))
        return RayEngine(plan.port, plan.log_path, pid, plan.replica_id, agent, plan.api_key)

    async def prepare(self, plan: LaunchPlan) -> LaunchPlan:
        """Before a spawn (EngineSettings.prepare): a port free on the plan's node (the one the
        supervisor picked is free on its own machine only), and an hf:// model cached there."""
        node, agent = await self._node_agent(plan)
        plan = replace(plan, port=int(await _on(node, agent.free_port.remote(plan.host))))
        if plan.fetch is None:
            return plan
        return await self._cached_on(node, agent, plan, plan.fetch)

    async def _node_agent(self, plan: LaunchPlan) -> tuple[NodeInfo, Any]:
        nodes = {n.node_id: n for n in await asyncio.to_thread(self.nodes)}
        node = nodes.get(plan.node or "")
        if node is None:
            raise NodeLost(f"node {plan.node} is not in the cluster")
        return node, self.agent(node)

    async def _cached_on(
        self, node: NodeInfo, agent: Any, plan: LaunchPlan, fetch: HubFetch
    ) -> LaunchPlan:
        """`plan` with `--model` in the node's own cache: its agent caches the hf:// model
        there first (at once if the node has it), polled every second, progress logged every
        5 s."""
        logged = started = time.monotonic()
        while True:
            status = await _on(node, agent.cache.remote(fetch))
            if status["state"] == "done":
                return replace(plan, model=status["path"])
            if status["state"] in ("failed", "cancelled"):
                raise NotCachedOnNode(
                    f"{fetch.source} could not be cached on node {node.short}: {status['error']}"
                )
            if time.monotonic() - logged >= 5:
                logged = time.monotonic()
                log.info("%s: caching %s on node %s (%.0fs): %s, %s of %s", plan.replica_id,
                         fetch.source, node.short, logged - started, status["state"],
                         human(status["done"]), human(status["total"]))  # fmt: skip
            await asyncio.sleep(1.0)

    async def adopt(self) -> dict[str, RayEngine]:
        """The live engines the agents of alive nodes own, by replica id: what a restarted
        supervisor takes over."""
        found: dict[str, RayEngine] = {}
        for node in await asyncio.to_thread(self.nodes):
            agent = self.agent(node)
            try:
                engines = await agent.engines.remote()
            except RayError:
                continue
            for replica_id, info in engines.items():
                if info["returncode"] is None:
                    found[replica_id] = RayEngine(
                        int(info["port"]), Path(info["log_path"]), int(info["pid"]), replica_id,
                        agent, api_key=info["api_key"],
                    )  # fmt: skip
        return found

    # -- nodes joining and leaving -----------------------------------------------------------

    def watch(self, on_change: NodesChanged) -> None:
        """Report nodes that join or leave, within `poll_interval`, until `close()`."""
        self._watch = asyncio.create_task(self._watch_loop(on_change), name="ray-nodes")

    async def _watch_loop(self, on_change: NodesChanged) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                alive = {n.node_id for n in await asyncio.to_thread(self.nodes)}
            except Exception:  # the GCS restarting: try again at the next tick
                log.exception("cannot list the cluster's nodes")
                continue
            joined, lost = alive - self._known, self._known - alive
            self._known = alive
            for node_id in lost:
                self._agents.pop(node_id, None)
            if joined or lost:
                log.info("nodes: %d joined, %d lost", len(joined), len(lost))
                on_change(joined, lost)

    async def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def close(self) -> None:
        """Stop watching and leave the cluster. The agents stay, with any engine they own."""
        await self.stop_watching()
        self._agents.clear()  # handles of this connection only
        await asyncio.to_thread(ray.shutdown)


async def _on(node: NodeInfo, call: Any) -> Any:
    """The result of a call to `node`'s agent (an ObjectRef); NodeLost if the agent is gone."""
    try:
        return await call
    except RayError as exc:
        raise NodeLost(f"node {node.short}: {type(exc).__name__}") from exc
