"""The model cache against a loopback hub, with the real huggingface_hub client: parallel
downloads with progress, what is fetched, typed errors, disk refusal, offline reuse, the admin
API, and a model that is downloaded first and then started."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import constants

from supervisor.api import create_app
from supervisor.cache import CacheSettings, ModelCache
from supervisor.cache_job import JobState
from supervisor.config import ModelSpec, Source
from supervisor.engine import free_port
from supervisor.errors import HubAccessDenied
from supervisor.hub import select_files
from tests.conftest import ManagerFactory, wait_until
from tests.hubrepos import GATED, TINY, TWO_A, TWO_B, UNWANTED, Hub
from tests.supervisor.conftest import cache_admin


@pytest.fixture
def make_cache(hub: Hub, tmp_path: Path) -> Iterator[object]:
    made: list[ModelCache] = []

    def factory(**overrides: object) -> ModelCache:
        options: dict[str, object] = {"cache_dir": tmp_path / "hf", "endpoint": hub.url,
                                      "margin": 0, "offline": False}  # fmt: skip
        options.update(overrides)
        cache = ModelCache(CacheSettings(**options))  # type: ignore[arg-type]
        made.append(cache)
        return cache

    yield factory
    hub.throttle(0)
    for cache in made:
        # Not awaited here (sync fixture): every test closes its caches; this is the backstop.
        assert cache._closed or not cache._tasks, "a test left its cache open"


def hf(repo: str) -> Source:
    return Source.parse(f"hf://{repo}")


def test_select_files_takes_configs_tokenizers_and_safetensors_only():
    listing = ["config.json", "tokenizer.json", "tokenizer.model", "merges.txt",
               "model-00001-of-00002.safetensors", "model.safetensors.index.json",
               "chat_template.jinja", *UNWANTED]  # fmt: skip
    wanted, skipped = select_files(listing)
    assert sorted(skipped) == sorted(UNWANTED)
    assert "model-00001-of-00002.safetensors" in wanted and "tokenizer.model" in wanted
    wanted, _ = select_files(["config.json", "pytorch_model.bin", "original/x.pth"])
    assert wanted == ["config.json", "pytorch_model.bin"], "no safetensors: .bin weights"


async def test_two_models_download_in_parallel_with_progress(make_cache, hub: Hub):
    cache = make_cache()
    hub.throttle(3 << 20)  # per connection: the downloads take a second or two
    try:
        jobs = await cache.fetch_many([hf(TWO_A), hf(TWO_B)])
        assert [j.state for j in jobs] == [JobState.DOWNLOADING, JobState.DOWNLOADING]
        assert jobs[0].progress.total > 9 << 20 and jobs[1].progress.total > 4 << 20
        seen_both_moving = False
        while any(j.running for j in jobs):
            snaps = [j.to_json() for j in jobs]
            if all(0 < s["done"] < s["total"] and s["rate"] > 0 and s["eta"] for s in snaps):
                seen_both_moving = True
            await asyncio.sleep(0.1)
        assert seen_both_moving, "both models were downloading at once, with rate and ETA"
        paths = [await j.wait() for j in jobs]
    finally:
        await cache.aclose()
    for repo, path in zip([TWO_A, TWO_B], paths, strict=True):
        source = hub.root / repo
        fetched = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        assert fetched == sorted(select_files([p for p in _files(source)])[0])
        for name in fetched:
            assert (path / name).read_bytes() == (source / name).read_bytes(), name
        assert not any(n.endswith((".bin", ".pth", ".gguf")) for n in fetched)
    done = jobs[0].to_json()
    assert done["state"] == "done" and done["done"] == done["total"] and done["eta"] is None
    assert sorted(done["skipped"]) == sorted(UNWANTED)
    # huggingface_hub itself finds sem's files (the standard cache layout)
    from huggingface_hub import snapshot_download

    assert snapshot_download(TWO_A, cache_dir=cache.cache_dir, local_files_only=True) == str(
        paths[0]
    )


def _files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]


async def test_unknown_repo_is_404_and_does_not_stop_the_others(make_cache):
    cache = make_cache()
    try:
        good, bad = await cache.fetch_many([hf(TWO_B), hf("nobody/nothing")])
        assert bad.state is JobState.FAILED and bad.error is not None
        assert bad.error.status == 404 and bad.error.type == "repo_not_found"
        assert "nobody/nothing" in bad.error.message
        (rev,) = await cache.fetch_many([Source.parse(f"hf://{TWO_B}@v9")])
        assert rev.error is not None and rev.error.type == "revision_not_found"
        assert rev.error.status == 404 and "'v9'" in rev.error.message
        assert await asyncio.to_thread((await good.wait()).is_dir)
    finally:
        await cache.aclose()


async def test_gated_repo_needs_hf_token(make_cache, monkeypatch: pytest.MonkeyPatch):
    cache = make_cache()
    try:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache.cache_dir / "no-token"))
        (job,) = await cache.fetch_many([hf(GATED)])
        with pytest.raises(HubAccessDenied) as err:
            await job.wait()
        assert err.value.status == 401 and "HF_TOKEN" in err.value.message
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        (job,) = await cache.fetch_many([hf(GATED)])
        with pytest.raises(HubAccessDenied) as err:
            await job.wait()
        assert err.value.status == 403 and "HF_TOKEN" in err.value.message
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        (job,) = await cache.fetch_many([hf(GATED)])
        assert (await job.wait() / "config.json").is_file()
    finally:
        await cache.aclose()


async def test_unreachable_hub_is_503(make_cache):
    cache = make_cache(endpoint=f"http://127.0.0.1:{free_port()}")
    try:
        (job,) = await cache.fetch_many([hf(TWO_B)])
        assert job.error is not None and job.error.status == 503
        assert "cannot reach the hub" in job.error.message
    finally:
        await cache.aclose()


async def test_refused_when_the_disk_budget_is_short(make_cache):
    cache = make_cache(budget=2 << 20)
    try:
        (job,) = await cache.fetch_many([hf(TWO_A)])
        assert job.error is not None and job.error.status == 507
        message = job.error.message
        assert "needs 9.00 MiB" in message and "only 2.00 MiB is available" in message, message
        assert not list(cache.cache_dir.glob("models--*/blobs/*.incomplete"))
        assert job.progress.done == 0
    finally:
        await cache.aclose()


async def test_cached_models_are_used_offline(make_cache, hub: Hub):
    online = make_cache()
    try:
        (job,) = await online.fetch_many([hf(TWO_B)])
        path = await job.wait()
    finally:
        await online.aclose()
    offline = make_cache(offline=True, endpoint=f"http://127.0.0.1:{free_port()}")
    try:
        assert await offline.prepare(hf(TWO_B)) == path
        requests_before = len(hub.requests())
        (job,) = await offline.fetch_many([hf(TWO_B)])
        assert await job.wait() == path and "HF_HUB_OFFLINE" in job.note
        (missing,) = await offline.fetch_many([hf(TWO_A)])
        assert missing.error is not None and missing.error.status == 503
        assert "HF_HUB_OFFLINE" in missing.error.message
        assert len(hub.requests()) == requests_before, "offline: the hub was never asked"
    finally:
        await offline.aclose()
    # and huggingface_hub in another process, with HF_HUB_OFFLINE=1, finds the same snapshot
    code = (
        "import sys; from huggingface_hub import snapshot_download as s;"
        " print(s(sys.argv[1], cache_dir=sys.argv[2]))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, TWO_B, str(online.cache_dir), env=env,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and out.decode().strip() == str(path)


@pytest.fixture
async def api(make_manager: ManagerFactory, make_cache) -> AsyncIterator[tuple]:
    cache, manager = make_cache(), make_manager()
    async with cache_admin(manager, cache) as client:
        yield client, manager, cache


async def test_api_cache_list_and_free(api):
    client, _, cache = api
    response = await client.post("/cache", json={"models": [f"hf://{TWO_A}", f"hf://{TWO_B}"]})
    assert response.status_code == 202, response.text
    assert [j["state"] for j in response.json()["jobs"]] == ["downloading", "downloading"]
    await wait_until(lambda: not any(j.running for j in cache.jobs()), what="downloads end")
    listed = (await client.get("/cache")).json()
    models = {m["source"]: m for m in listed["models"]}
    assert set(models) == {f"hf://{TWO_A}", f"hf://{TWO_B}"}
    entry = models[f"hf://{TWO_B}"]
    assert entry["revision"] == "main" and entry["size"] > 4 << 20
    assert await asyncio.to_thread(Path(entry["path"]).is_dir)
    assert [j["state"] for j in listed["jobs"]] == ["done", "done"]

    response = await client.delete(f"/cache/hf://{TWO_B}")
    assert response.status_code == 200 and response.json()["freed"] > 4 << 20
    assert not await asyncio.to_thread(Path(entry["path"]).exists)
    assert [m["source"] for m in (await client.get("/cache")).json()["models"]] == [f"hf://{TWO_A}"]
    again = await client.delete(f"/cache/hf://{TWO_B}")
    assert again.status_code == 404 and again.json()["error"]["type"] == "not_cached"


async def test_api_errors_are_typed_json(api):
    client, _, _ = api
    bad = await client.post("/cache", json={"models": ["hf://ok/fine", "ftp://nope"]})
    assert bad.status_code == 400 and "ftp://nope" in bad.json()["error"]["message"]
    assert (await client.post("/cache", json={"models": []})).status_code == 422
    missing = await client.post("/cache", json={"models": ["hf://nobody/nothing"]})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "repo_not_found"
    assert missing.json()["jobs"][0]["error"]["status"] == 404
    gated = await client.post("/cache", json={"models": [f"hf://{GATED}"]})
    assert gated.status_code in (401, 403) and "HF_TOKEN" in gated.json()["error"]["message"]
    mixed = await client.post("/cache", json={"models": [f"hf://{TWO_B}", "hf://nobody/x"]})
    assert mixed.status_code == 202
    path = await client.delete("/cache/path:/tmp")
    assert path.status_code == 400 and "never deletes" in path.json()["error"]["message"]


async def test_model_is_downloaded_then_started_and_its_files_are_kept(api, hub: Hub):
    client, manager, cache = api
    hub.throttle(64 << 10)  # the tiny checkpoint takes a moment: `downloading` is visible
    spec = {"name": "tiny", "source": f"hf://{TINY}", "max_model_len": 512}
    response = await client.post("/models", json=spec)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "downloading" and body["download"]["source"] == f"hf://{TINY}"
    model = (await client.get("/models/tiny")).json()
    assert model["state"] == "downloading" and "total" in model["download"]
    hub.throttle(0)
    await wait_until(lambda: manager.get("tiny").state.value == "ready", what="tiny ready")
    model = (await client.get("/models/tiny")).json()
    snapshot = cache.local(Source.parse(f"hf://{TINY}"))
    assert model["download"] is None and snapshot is not None
    assert manager.get("tiny").model_ref == str(snapshot)
    events = [e["kind"] for e in (await client.get("/events?subject=tiny")).json()["events"]]
    assert events.index("model_downloading") < events.index("model_added")

    in_use = await client.delete(f"/cache/hf://{TINY}")
    assert in_use.status_code == 409 and "tiny" in in_use.json()["error"]["message"]
    tiny = [m for m in (await client.get("/cache")).json()["models"] if m["path"] == str(snapshot)]
    assert len(tiny) == 1 and tiny[0]["last_used"] is not None, "when an engine started from it"


async def test_model_whose_download_fails_is_failed_with_the_reason(api):
    client, manager, _ = api
    spec = ModelSpec(name="ghost", source="hf://nobody/ghost")
    await manager.add(spec)
    await wait_until(lambda: manager.get("ghost").state.value == "failed", what="ghost failed")
    model = (await client.get("/models/ghost")).json()
    assert "not found" in model["reason"] and model["replicas"] == []
    assert (await client.delete("/models/ghost")).status_code == 202
    await wait_until(lambda: manager.entries() == [], what="ghost removed")


def test_cache_section_of_models_yaml(tmp_path: Path):
    from supervisor.config import ConfigError, parse_config

    text = "cache: {dir: hf, budget: 20GiB, margin: 0, parallel_files: 4}\nmodels: []\n"
    config = parse_config(text, base_dir=tmp_path)
    assert config.cache.dir == str(tmp_path / "hf") and config.cache.margin == 0
    assert config.cache.budget == "20GiB"
    assert parse_config("models: []\n").cache.dir is None, "default: HF_HUB_CACHE"
    with pytest.raises(ConfigError, match=r"models.yaml:1: cache.budget: .*not a size"):
        parse_config("cache: {budget: lots}\n")


async def test_cache_changes_need_the_admin_token(make_manager: ManagerFactory, make_cache):
    cache = make_cache()
    manager = make_manager()
    app = create_app(manager, manager.events, token="s3cret", cache=cache)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        assert (await c.post("/cache", json={"models": [f"hf://{TWO_B}"]})).status_code == 401
        assert (await c.delete(f"/cache/hf://{TWO_B}")).status_code == 401
        assert (await c.get("/cache")).status_code == 200
    assert cache.jobs() == []
    await cache.aclose()
