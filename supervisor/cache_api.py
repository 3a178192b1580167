"""The admin API's /cache routes: fetch models into the cache, list it, free a model's files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from supervisor.cache import ModelCache
from supervisor.cache_job import Job
from supervisor.config import Source
from supervisor.errors import InvalidSource
from supervisor.manager import Manager


class CacheRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, max_length=64,
                              description="hf://org/name[@revision] or path:/some/dir")  # fmt: skip


def parse_source(text: str) -> Source:
    """A source from a request; 400 naming it if malformed."""
    if text.startswith("hf:/") and not text.startswith("hf://"):
        text = "hf://" + text[len("hf:/") :]  # a path segment whose // a client folded
    try:
        return Source.parse(text)
    except ValueError as exc:
        raise InvalidSource(str(exc)) from None


def users_of(manager: Manager, local: Path | None, source: Source) -> list[str]:
    """Models that run from (or are downloading) this source's files (`local`: its folder)."""
    return [
        e.spec.name
        for e in manager.entries()
        if (local is not None and e.model_ref == str(local))
        or (e.download is not None and e.download.source.repo == source.repo)
    ]


def _answer(jobs: list[Job], ok_status: int) -> JSONResponse:
    """202/200 with the jobs; if every one failed, the (first) failure's own status."""
    body: dict[str, Any] = {"jobs": [j.to_json() for j in jobs]}
    failed = [j for j in jobs if j.error is not None]
    if jobs and len(failed) == len(jobs):
        error = failed[0].error
        assert error is not None
        body["error"] = {"type": error.type, "message": "; ".join(
            j.error.message for j in failed if j.error is not None)}  # fmt: skip
        return JSONResponse(body, status_code=error.status)
    return JSONResponse(body, status_code=ok_status)


def cache_router(manager: Manager, cache: ModelCache, mutating: Sequence[Depends]) -> APIRouter:
    router = APIRouter()

    def path_sources() -> list[Source]:
        sources = [Source.parse(e.spec.source) for e in manager.entries()]
        return [s for s in sources if s.kind == "path"]

    @router.post("/cache", status_code=202, dependencies=list(mutating))
    async def fetch(request: CacheRequest, wait: bool = False) -> JSONResponse:
        """Cache models: 202 once each is checked (size known, disk enough) and downloading.

        `?wait=true`: answer 200 once every job has ended. A failure of one model does not stop
        the others; when all fail, the answer carries the failure's status (404, 401/403, 503,
        507, ...).
        """
        sources = [parse_source(text) for text in request.models]
        jobs = await cache.fetch_many(sources)
        if wait:
            for job in jobs:
                await job.ended.wait()
        return _answer(jobs, 200 if wait else 202)

    @router.get("/cache")
    async def listing(wait: Annotated[float, Query(ge=0, le=60)] = 0.0) -> dict[str, Any]:
        """Cached models and download jobs; `?wait=S` first waits up to S s for a job to change
        state (a long-poll for progress displays)."""
        if wait and any(j.running for j in cache.jobs()):
            await cache.wait_change(wait)
        return {
            "cache_dir": str(cache.cache_dir),
            "models": await cache.listing(path_sources()),
            "jobs": [j.to_json() for j in cache.jobs()],
        }

    @router.delete("/cache/{source:path}", dependencies=list(mutating))
    async def delete(source: str) -> dict[str, Any]:
        """Free a cached model's files; 409 while a model uses it."""
        parsed = parse_source(source)
        users = users_of(manager, await cache.locate(parsed), parsed)
        return await cache.delete(parsed, users)

    return router
