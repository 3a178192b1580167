"""The model cache: download jobs from the Hugging Face hub, with progress, resume, clear errors.

One asyncio task per source (a second request for a source being fetched joins its job); the
blocking huggingface_hub calls run in the cache's own thread pool, so the event loop never
waits on the network or the disk. cache_job.py has a job's states and progress; hub.py has the
files and the layout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from supervisor.cache_folder import CachedModel
from supervisor.cache_job import Job, JobState
from supervisor.config import Source
from supervisor.errors import (
    CacheConflict,
    CacheError,
    HubUnreachable,
    InsufficientDisk,
    InvalidSource,
    InvalidSpec,
    NotCached,
)
from supervisor.hub import DownloadCancelled, HubClient, Plan, RemoteFile
from supervisor.units import human

log = logging.getLogger("sem.cache")

KEEP_FINISHED_JOBS = 50


@dataclass(frozen=True)
class CacheSettings:
    cache_dir: Path = field(default_factory=lambda: Path(constants.HF_HUB_CACHE))
    endpoint: str | None = None  # default: HF_ENDPOINT (huggingface.co)
    budget: int | None = None  # the most bytes the cache folder may hold (default: the disk)
    margin: int = 1 << 30  # free disk kept after a download
    parallel_files: int = 8  # files of one model fetched at once (huggingface_hub's default)
    offline: bool = field(default_factory=lambda: bool(constants.HF_HUB_OFFLINE))


class ModelCache:
    """Download jobs, the list of cached models, and freeing them."""

    def __init__(self, settings: CacheSettings | None = None) -> None:
        self.settings = settings or CacheSettings()
        self.client = HubClient(self.settings.cache_dir, self.settings.endpoint)
        # File downloads of all jobs share these threads; HEADs and small writes get their own.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sem-cache")
        self._meta_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sem-cache-meta")
        self._jobs: dict[int, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._last_used: dict[str, float] = {}  # path: sources (not in any manifest)
        self._closed = False

    @property
    def cache_dir(self) -> Path:
        return self.settings.cache_dir

    # -- queries -----------------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def running(self, source: Source) -> Job | None:
        for job in self._jobs.values():
            if job.running and job.source == source:
                return job
        return None

    def local(self, source: Source) -> Path | None:
        """The folder an engine can start from now, without the network; None if not cached."""
        if source.kind == "path":
            assert source.path is not None
            return source.path if (source.path / "config.json").is_file() else None
        return self.client.local(source)

    async def locate(self, source: Source) -> Path | None:
        """`local` off the event loop (it reads refs and manifests and stats every file)."""
        path: Path | None = await self._call(self.local, source)
        return path

    async def listing(self, path_sources: list[Source]) -> list[dict[str, Any]]:
        """Cached models (hf), then the given local folders as they are."""
        cached: list[CachedModel] = await self._call(self.client.listing)
        out = [c.to_json() for c in cached]
        for source in dict.fromkeys(path_sources):
            assert source.path is not None
            size = await self._call(_folder_size, source.path)
            out.append({
                "source": str(source), "sources": [str(source)], "repo": None,
                "revision": None, "commit": None, "size": size, "path": str(source.path),
                "completed": None, "last_used": self._last_used.get(str(source)),
            })  # fmt: skip
        return out

    async def wait_change(self, timeout: float) -> None:
        """Until a job changes state (not mere progress) or `timeout` seconds pass."""
        if timeout <= 0:
            return
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            pass

    # -- commands ----------------------------------------------------------------------------

    def fetch(self, source: Source) -> Job:
        """Start caching `source` (or join the job already on it)."""
        if self._closed:
            raise HubUnreachable("the supervisor is shutting down")
        if (job := self.running(source)) is not None:
            return job
        job = Job(source, next(self._ids))
        self._jobs[job.id] = job
        self._forget_old_jobs()
        task = asyncio.create_task(self._run(job), name=f"cache-{source}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._notify()
        return job

    async def fetch_many(self, sources: list[Source]) -> list[Job]:
        """Start every source; answer once each is past its check (or failed)."""
        jobs = [self.fetch(s) for s in sources]
        await asyncio.gather(*(j.checked.wait() for j in jobs))
        return jobs

    async def prepare(self, source: Source) -> Path | Job:
        """For the manager: the local folder if cached, else the job that fetches it."""
        if (path := await self.locate(source)) is not None:
            self.touch(source)
            return path
        if source.kind == "path":
            assert source.path is not None
            raise InvalidSpec(
                f"source {source}: no config.json in {source.path}"
                " (expected a Hugging Face model folder; run `make models` for the demo models)"
            )
        return self.fetch(source)

    def touch(self, source: Source) -> None:
        """An engine starts from this model now ("last used")."""
        self._last_used[str(source)] = time.time()
        if source.kind == "hf":
            self._meta_pool.submit(self.client.touch, source)

    async def delete(self, source: Source, users: list[str]) -> dict[str, Any]:
        """Free a cached model's files; 409 while a model uses it or a job fetches it."""
        if source.kind == "path":
            raise InvalidSource(f"{source} is a local folder: sem lists it but never deletes it")
        if users:
            raise CacheConflict(
                f"{source} is in use by model(s) {', '.join(users)}: remove them first"
            )
        if self.running(source) is not None:
            raise CacheConflict(f"{source} is being downloaded; wait for the job to end")
        path = await self.locate(source)
        if path is None:
            raise NotCached(f"{source} is not in the cache at {self.cache_dir}")
        freed: int = await self._call(self.client.delete, source.repo, path.name)
        self._notify()
        return {"source": str(source), "commit": path.name, "freed": freed}

    async def aclose(self) -> None:
        """Stop every job (partial files stay for the next run to resume) and the threads."""
        self._closed = True
        for job in self._jobs.values():
            job.cancelled.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        await asyncio.to_thread(self._meta_pool.shutdown, wait=True)

    # -- a job -------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        try:
            job.path = await self._cache(job)
            job.state = JobState.DONE
            log.info("cached %s in %s", job.source, job.path)
        except DownloadCancelled:
            job.state = JobState.CANCELLED
        except CacheError as exc:
            job.error, job.state = exc, JobState.FAILED
            log.warning("caching failed: %s", exc.message)
        except Exception as exc:  # a bug or an unforeseen hub answer: say it, keep serving
            log.exception("caching %s failed", job.source)
            job.error = CacheError(f"{job.source}: download failed: {exc!r}")
            job.state = JobState.FAILED
        finally:
            job.finished = time.time()
            job.checked.set()
            job.ended.set()
            self._notify()

    async def _cache(self, job: Job) -> Path:
        source = job.source
        if source.kind == "path":
            if (path := await self.locate(source)) is None:
                raise InvalidSource(f"{source}: no config.json in {source.path}")
            return path
        if self.settings.offline:
            if (path := await self.locate(source)) is not None:
                job.note = "HF_HUB_OFFLINE is set: the cached copy is used as it is"
                return path
            raise HubUnreachable(
                f"{source}: HF_HUB_OFFLINE is set and it is not in the cache at {self.cache_dir}"
            )
        try:
            plan: Plan = await self._call(self.client.plan, source, self._meta_pool)
        except HubUnreachable:
            if (path := await self.locate(source)) is not None:
                job.note = "the hub is unreachable: the cached copy is used as it is"
                return path
            raise
        job.skipped, job.files = plan.skipped, len(plan.files)
        job.progress.start(plan.total, plan.present)
        await self._check_disk(job, plan)
        job.state = JobState.DOWNLOADING
        job.checked.set()
        self._notify()
        await self._download(job, plan)
        return await self._call(self.client.finish, plan)  # type: ignore[no-any-return]

    async def _check_disk(self, job: Job, plan: Plan) -> None:
        """Refuse before the first byte if the disk (or the budget) cannot take the model."""
        need = plan.missing
        if need <= 0:
            return
        held = sum(
            max(j.progress.total - j.progress.done, 0)
            for j in self._jobs.values()
            if j is not job and j.state is JobState.DOWNLOADING
        )
        free: int = await self._call(self.client.free_bytes)
        available = free - self.settings.margin - held
        detail = f"{human(free)} free on disk minus a {human(self.settings.margin)} margin"
        if self.settings.budget is not None:
            used: int = await self._call(self.client.used_bytes)
            if self.settings.budget - used - held < available:
                available = self.settings.budget - used - held
                detail = f"cache budget {human(self.settings.budget)}, {human(used)} used"
        if held:
            detail += f", {human(held)} held for other downloads"
        if need > available:
            raise InsufficientDisk(
                f"{job.source} needs {human(need)} but only {human(max(available, 0))} is"
                f" available in {self.cache_dir} ({detail})"
            )

    async def _download(self, job: Job, plan: Plan) -> None:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.settings.parallel_files)

        async def one(file: RemoteFile) -> None:
            async with limit:
                if job.cancelled.is_set():
                    raise DownloadCancelled
                await loop.run_in_executor(
                    self._pool, self.client.fetch, plan, file, job.progress.add, job.cancelled
                )
                job.files_done += 1

        # Largest first: the long files start at once and the small ones fill in around them.
        order = sorted(plan.files, key=lambda f: -f.size)
        results = await asyncio.gather(
            *(self._first_error_stops_all(job, one(f)) for f in order), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        real = [e for e in errors if not isinstance(e, DownloadCancelled)]
        if real:
            raise real[0]
        if errors:
            raise errors[0]

    @staticmethod
    async def _first_error_stops_all(job: Job, work: Any) -> None:
        try:
            await work
        except BaseException:
            job.cancelled.set()  # the other files stop at their next chunk
            raise

    # -- plumbing ----------------------------------------------------------------------------

    @staticmethod
    async def _call(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _forget_old_jobs(self) -> None:
        finished = [j for j in self._jobs.values() if not j.running]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED_JOBS)]:
            del self._jobs[job.id]


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
