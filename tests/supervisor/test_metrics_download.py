"""Download progress in GET /metrics while a model's files are being cached from the hub."""

from __future__ import annotations

from pathlib import Path

from supervisor.cache import CacheSettings, Job, ModelCache
from supervisor.config import Source
from tests.conftest import ManagerFactory, wait_until
from tests.hubrepos import TWO_B, Hub
from tests.supervisor.test_metrics import metrics_api, scrape, value


async def test_download_bytes_and_active_jobs_while_files_are_cached(
    make_manager: ManagerFactory, hub: Hub, tmp_path: Path
) -> None:
    cache = ModelCache(CacheSettings(cache_dir=tmp_path / "hf", endpoint=hub.url, margin=0,
                                     offline=False))  # fmt: skip
    manager = make_manager()
    manager.cache = cache
    source = f"hf://{TWO_B}"
    hub.throttle(1 << 20)  # per connection: its few MiB take a few seconds
    try:
        async with metrics_api(manager) as (client, _):
            job = await cache.prepare(Source.parse(source))
            assert isinstance(job, Job)
            await wait_until(lambda: job.progress.done > 0, what="bytes arriving")
            during = await scrape(client)
            hub.throttle(0)
            await job.wait()
            after = await scrape(client)
    finally:
        hub.throttle(0)
        await cache.aclose()

    assert value(during, "sem_supervisor_downloads_active") == 1
    total = value(during, "sem_supervisor_download_total_bytes", source=source)
    done = value(during, "sem_supervisor_download_done_bytes", source=source)
    assert total is not None and done is not None and 0 < done < total
    assert value(after, "sem_supervisor_downloads_active") == 0
    assert value(after, "sem_supervisor_download_total_bytes", source=source) is None
