"""A cluster node caches an hf:// model before its engine starts: the node agent's `cache`,
against the loopback hub, without Ray (the agent is a plain class; Ray only wraps it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.cluster import CACHE_ENV
from supervisor.cluster.agent import NodeAgent
from supervisor.cluster.nodes import NodeInfo
from supervisor.engine import HubFetch
from supervisor.launch import hub_fetch
from tests.hubrepos import TINY, Hub, cached_here


async def until_ended(agent: NodeAgent, fetch: HubFetch) -> dict[str, Any]:
    """Poll the agent as the supervisor does (the backend: once a second; here faster)."""
    states = []
    async with asyncio.timeout(30):
        while True:
            status = await agent.cache(fetch)
            states.append(status["state"])
            if status["state"] in ("done", "failed", "cancelled"):
                return {**status, "seen": states}
            await asyncio.sleep(0.05)


@pytest.fixture
async def agent() -> AsyncIterator[NodeAgent]:
    node_agent = NodeAgent(NodeInfo("n1", "127.0.0.1", gpus=0, gpu_memory=None))
    yield node_agent
    await node_agent.close_caches()


def test_the_launch_plan_pins_an_hf_model_to_the_commit_cached_here(tmp_path: Path):
    snapshot = tmp_path / "hf" / "models--demo--tiny" / "snapshots" / ("a" * 40)
    fetch = hub_fetch("hf://demo/tiny", str(snapshot), "http://hub")
    assert fetch == HubFetch(f"hf://demo/tiny@{'a' * 40}", str(tmp_path / "hf"), "http://hub")
    assert hub_fetch(f"path:{tmp_path}", str(tmp_path), "http://hub") is None


async def test_a_node_without_the_model_downloads_it_into_its_own_cache(
    hub: Hub, agent: NodeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    snapshot = await cached_here(hub, tmp_path / "supervisor-cache")
    fetch = hub_fetch(f"hf://{TINY}", str(snapshot), hub.url)
    assert fetch is not None
    node_cache = tmp_path / "node-cache"
    monkeypatch.setenv(CACHE_ENV, str(node_cache))  # the node keeps its cache elsewhere
    status = await until_ended(agent, fetch)
    assert status["state"] == "done", status
    path = Path(status["path"])
    assert path.is_relative_to(node_cache) and path.name == snapshot.name  # the same commit
    for file in snapshot.iterdir():  # byte for byte what the supervisor has
        assert (path / file.name).read_bytes() == file.read_bytes()
    again = await agent.cache(fetch)  # cached now: at once, no download
    assert (again["state"], again["path"]) == ("done", str(path))


async def test_a_node_that_has_it_at_the_supervisors_path_starts_at_once(
    hub: Hub, agent: NodeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    snapshot = await cached_here(hub, tmp_path / "shared")
    fetch = hub_fetch(f"hf://{TINY}", str(snapshot), hub.url)
    assert fetch is not None
    assert await agent.cache(fetch) == {
        "state": "done",
        "path": str(snapshot),
        "error": None,
        "done": 0,
        "total": 0,
    }


async def test_a_model_the_hub_does_not_have_fails_with_its_reason_and_is_retried(
    hub: Hub, agent: NodeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    fetch = HubFetch(f"hf://nobody/nothing@{'b' * 40}", str(tmp_path / "c"), hub.url)
    status = await until_ended(agent, fetch)
    assert status["state"] == "failed" and "nobody/nothing" in status["error"]
    retried = await agent.cache(fetch)  # a new try, not the old failure again
    assert retried["state"] in ("checking", "failed")
