"""hf:// sources are checked at the edge with huggingface_hub's own rule, and the cache never
reaches outside its folder: a bad name is a 4xx naming the field (API) or a skipped model
(models.yaml at start), never a 500 or a crash."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from supervisor.cache import CacheSettings, ModelCache
from supervisor.config import ConfigError, InvalidModel, Source, parse_config
from supervisor.errors import InvalidSource
from supervisor.hub import HubClient
from supervisor.manager import Manager
from tests.conftest import ManagerFactory
from tests.supervisor.conftest import cache_admin

REPO_ONLY_THE_HUB_REJECTS = ["hf://org/model..v2", "hf://a--b/c", "hf://org/m.git"]
ESCAPING_REVISIONS = ["hf://org/m@../../x", "hf://org/m@a//b", "hf://org/m@.hidden",
                      "hf://org/m@main/..", "hf://org/m@x.lock", "hf://org/m@/etc"]  # fmt: skip
BAD_SOURCES = REPO_ONLY_THE_HUB_REJECTS + ESCAPING_REVISIONS


@pytest.mark.parametrize("text", BAD_SOURCES)
def test_source_the_hub_or_the_cache_cannot_take_is_a_value_error(text: str):
    with pytest.raises(ValueError, match="source"):
        Source.parse(text)


@pytest.mark.parametrize(
    ("text", "revision"),
    [("hf://org/m@refs/pr/1", "refs/pr/1"), ("hf://org/m@v1.0-rc_2", "v1.0-rc_2"),
     ("hf://org/m@" + "a" * 40, "a" * 40), ("hf://org/m", None)],
)  # fmt: skip
def test_branch_tag_pr_and_commit_revisions_are_accepted(text: str, revision: str | None):
    source = Source.parse(text)
    assert (source.repo, source.revision) == ("org/m", revision)


@pytest.fixture
async def api(
    make_manager: ManagerFactory, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Manager, ModelCache]]:
    cache, manager = ModelCache(CacheSettings(tmp_path / "hf", offline=True)), make_manager()
    async with cache_admin(manager, cache) as client:
        yield client, manager, cache


@pytest.mark.parametrize("source", BAD_SOURCES)
async def test_bad_source_is_422_naming_the_field_on_add(api, source: str):
    client, manager, _ = api
    response = await client.post("/models", json={"name": "m", "source": source})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("body.source:")
    assert manager.entries() == []


@pytest.mark.parametrize("source", BAD_SOURCES)
async def test_bad_source_is_400_on_cache_fetch_and_delete(api, source: str):
    client, _, cache = api
    fetch = await client.post("/cache", json={"models": [source]})
    assert fetch.status_code == 400 and fetch.json()["error"]["type"] == "invalid_source"
    # Dots percent-encoded, as curl --path-as-is would send them (httpx drops `..` segments).
    delete = await client.delete(f"/cache/{source.replace('.', '%2E')}")
    assert delete.status_code == 400 and delete.json()["error"]["type"] == "invalid_source"
    assert cache.jobs() == []


def test_models_yaml_entry_with_a_bad_source_is_skipped_at_start_and_the_others_kept():
    text = (
        "models:\n"
        "  - {name: good, source: 'path:/x'}\n"
        "  - name: bad\n"
        "    source: hf://org/model..v2\n"
        "  - {name: escape, source: 'hf://org/m@../../x'}\n"
    )
    skipped: list[InvalidModel] = []
    config = parse_config(text, origin="m.yaml", skipped=skipped)
    assert [m.name for m in config.models] == ["good"]
    assert [s.name for s in skipped] == ["bad", "escape"]
    assert skipped[0].problem.startswith("m.yaml:4: models[1].source:")
    assert "Cannot have -- or .." in skipped[0].problem
    assert skipped[1].problem.startswith("m.yaml:5: models[2].source:")
    with pytest.raises(ConfigError, match=r"m.yaml:4: models\[1\].source"):
        parse_config(text, origin="m.yaml")  # a reload stays all-or-nothing


COMMIT = "c" * 40


def test_a_ref_pointing_outside_the_cache_is_not_followed(tmp_path: Path):
    """A ref file whose content is not a commit (say `../../..`) names no snapshot."""
    client = HubClient(tmp_path / "hf")
    refs = client.storage("org/m") / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("../../../../etc")
    assert client.local(Source.parse("hf://org/m")) is None
    with pytest.raises(InvalidSource, match="not a commit"):
        client.delete("org/m", "../../..")


def test_a_manifest_listing_files_outside_the_snapshot_is_not_cached(tmp_path: Path):
    client = HubClient(tmp_path / "hf")
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    storage = client.storage("org/m")
    (storage / "sem").mkdir(parents=True)
    (storage / "snapshots" / COMMIT).mkdir(parents=True)
    escape = os.path.relpath(outside, storage / "snapshots" / COMMIT)
    (storage / "sem" / f"{COMMIT}.json").write_text(f'{{"files": {{"{escape}": 1}}}}')
    assert client.local(Source.parse(f"hf://org/m@{COMMIT}")) is None


async def test_a_fifo_in_the_cache_does_not_freeze_delete(api, tmp_path: Path):
    """The issue's freeze: DELETE /cache read a FIFO planted as a ref on the event loop."""
    client, _, cache = api
    refs = cache.client.storage("org/m") / "refs"
    refs.mkdir(parents=True)
    os.mkfifo(refs / "main")
    async with asyncio.timeout(10):
        response = await client.delete("/cache/hf://org/m")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_cached"
