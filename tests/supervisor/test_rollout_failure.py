"""A reload whose new hf:// spec cannot be downloaded: visible, harmless, and not in sem.db."""

from __future__ import annotations

from pathlib import Path

from supervisor.cache import CacheSettings, ModelCache
from supervisor.config import ModelSpec
from supervisor.events import EventKind
from supervisor.states import ModelState
from supervisor.store import Store
from tests.conftest import ManagerFactory, wait_until
from tests.hubrepos import Hub


async def test_a_rollout_whose_download_fails_keeps_the_old_engines_and_the_old_desired_state(
    make_manager: ManagerFactory, model_dir: Path, hub: Hub, tmp_path: Path
):
    store = Store(tmp_path / "sem.db")
    manager = make_manager(store=store)
    cache = ModelCache(CacheSettings(cache_dir=tmp_path / "hf", endpoint=hub.url, margin=0,
                                     offline=False))  # fmt: skip
    manager.cache = cache
    try:
        old = ModelSpec(name="m", source=f"path:{model_dir}")
        await manager.reload([old], drain_timeout=1)
        await wait_until(lambda: manager.get("m").state is ModelState.READY, what="m ready")
        (replica,) = manager.get("m").replicas
        pid = replica.process.pid if replica.process else None

        new = ModelSpec(name="m", source="hf://nobody/ghost")
        diff = await manager.reload([new], drain_timeout=1)
        assert [s.name for s in diff.changed] == ["m"]
        await wait_until(
            lambda: bool(manager.events.recent("m", kind=EventKind.ROLLOUT_FAILED)),
            what="the rollout_failed event",
        )

        (event,) = manager.events.recent("m", kind=EventKind.ROLLOUT_FAILED)
        entry = manager.get("m")
        assert "not found" in event.message and "still running the old one" in event.message
        assert entry.reason == event.message, "the model says why"
        assert entry.state is ModelState.READY and entry.spec == old
        assert entry.replicas == [replica] and replica.process and replica.process.pid == pid
        assert manager.routes.models["m"].reason == event.message
        assert [d.spec for d in store.desired()] == [old], "sem.db holds what runs"
        assert store.applied_config() == {"m": old}, "the next reload tries the new spec again"
        diff = await manager.reload([new], drain_timeout=1)
        assert [s.name for s in diff.changed] == ["m"]
    finally:
        await manager.shutdown(drain_timeout=1)
        await cache.aclose()
