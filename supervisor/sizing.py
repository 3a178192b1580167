"""Sizing a model up: the local folder an engine loads and the memory one replica needs.

Shared by the supervisor (before a model gets replicas) and `sem plan` (dryrun.py), which starts
nothing. The memory comes from estimate.py, or where an earlier engine of the same spec was
measured (measure.py, kept in the store) from that measurement: `size_up` is the one place
where a measured figure replaces the estimate.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from supervisor.cache import ModelCache
from supervisor.cache_job import Job
from supervisor.config import ModelSpec, Source
from supervisor.errors import InvalidSpec
from supervisor.estimate import EstimateError, MemoryEstimate, estimate
from supervisor.measure import measured_need
from supervisor.placement import never_fits
from supervisor.resources import Device
from supervisor.store import Store

# What a model needs before it can have replicas: (engine's model folder, memory per replica),
# or the download of its files that must come first.
Prepared = tuple[str, MemoryEstimate] | Job


def local_model_dir(spec: ModelSpec) -> Path:
    """The local folder an engine will load; InvalidSpec if there is none."""
    source = Source.parse(spec.source)
    if source.kind == "path":
        assert source.path is not None
        if not (source.path / "config.json").is_file():
            raise InvalidSpec(
                f"source {spec.source}: no config.json in {source.path}"
                " (expected a Hugging Face model folder; run `make models` for the demo models)"
            )
        return source.path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.repo, revision=source.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise InvalidSpec(
            f"source {spec.source} is not in the local Hugging Face cache; download it first"
        ) from None


def size_up(
    spec: ModelSpec, model_dir: Path | None, devices: list[Device], store: Store | None = None
) -> MemoryEstimate:
    """The memory one replica needs: estimated, and measured where `store` knows this spec;
    InvalidSpec if it cannot be estimated or never fits. Blocks (it reads the checkpoint's
    headers): the daemon calls `sized` instead."""
    return _corrected(spec, _estimated(spec, model_dir, devices), devices, store)


async def sized(
    spec: ModelSpec, model_dir: Path | None, devices: list[Device], store: Store | None = None
) -> MemoryEstimate:
    """`size_up` with the checkpoint read in a worker thread (the store, whose SQLite
    connection belongs to the event loop's thread, stays on it)."""
    need = await asyncio.to_thread(_estimated, spec, model_dir, devices)
    return _corrected(spec, need, devices, store)


def _estimated(spec: ModelSpec, model_dir: Path | None, devices: list[Device]) -> MemoryEstimate:
    try:
        return estimate(spec, model_dir, on_gpu=_on_gpu(devices))
    except EstimateError as exc:
        raise InvalidSpec(str(exc)) from None


def _on_gpu(devices: list[Device]) -> bool:
    return any(d.kind == "gpu" for d in devices)


def _corrected(
    spec: ModelSpec, need: MemoryEstimate, devices: list[Device], store: Store | None
) -> MemoryEstimate:
    """`need` with what was measured of this spec, if anything; InvalidSpec if it never fits."""
    on_gpu = _on_gpu(devices)
    if store is not None:
        need = replace(need, measured=measured_need(store, spec, on_gpu))
    eligible = [(d.label, d.total) for d in devices if on_gpu == (d.kind == "gpu")]
    if problem := never_fits(need.per_device, spec.tensor_parallel, eligible, on_gpu):
        raise InvalidSpec(f"{spec.name} can never be placed: {problem}")
    return need


async def prepare(
    spec: ModelSpec, cache: ModelCache | None, devices: list[Device], store: Store | None = None
) -> Prepared:
    """The engine's model folder and the memory a replica needs, or the download that must
    come first (an hf:// source not cached yet); InvalidSpec if neither can be had. The disk
    is read in worker threads, never on the event loop."""
    if cache is None:
        located: Path | Job = await asyncio.to_thread(local_model_dir, spec)
    else:
        located = await cache.prepare(Source.parse(spec.source))
    if isinstance(located, Job):
        return located
    return str(located), await sized(spec, located, devices, store)


async def after_download(
    spec: ModelSpec, job: Job, devices: list[Device], store: Store | None = None
) -> tuple[str, MemoryEstimate]:
    """Once `job` has cached the model's files: its folder and the memory a replica needs.
    The job's CacheError if the download failed, InvalidSpec if it cannot be sized."""
    path = await job.wait()
    return str(path), await sized(spec, path, devices, store)
