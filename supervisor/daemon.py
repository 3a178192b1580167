"""The supervisor process: load models.yaml, start the models, serve the admin API, stop cleanly.

Signals only set a flag; the main coroutine acts on it (uvicorn's habit): first SIGTERM/SIGINT
drains and stops every engine (bounded), then the API closes; a second one stops engines at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from sem.procgroup import signal_group
from supervisor.api import create_app
from supervisor.cache import CacheSettings, ModelCache
from supervisor.config import ConfigError, load_config
from supervisor.engine import EngineCommand
from supervisor.errors import SupervisorError
from supervisor.events import EventLog
from supervisor.manager import EngineSettings, Manager, SchedulerSettings
from supervisor.probe import EngineProbe
from supervisor.replica import ReplicaTiming
from supervisor.resources import describe, detect
from supervisor.units import parse_size

log = logging.getLogger("sem.supervisor")


def default_engine_python() -> str:
    """`.venv-engine/bin/python` beside sem's own venv, else the current interpreter."""
    candidate = Path(sys.prefix).parent / ".venv-engine" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m supervisor", description=__doc__)
    p.add_argument("--config", type=Path, default=Path("models.yaml"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--state-dir", type=Path, default=Path(".sem"))
    p.add_argument("--engine-python", default=os.environ.get("SEM_ENGINE_PYTHON"))
    p.add_argument("--engine-module", default=os.environ.get("SEM_ENGINE_MODULE"))
    p.add_argument("--drain-timeout", type=float, default=10.0, help="on shutdown, per model")
    p.add_argument("--stop-grace", type=float, default=10.0, help="SIGTERM to SIGKILL, per engine")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--token", default=os.environ.get("SEM_ADMIN_TOKEN"))
    p.add_argument("--cache-dir", type=Path, help="hf:// models go here (default: models.yaml's"
                   " cache.dir, else HF_HUB_CACHE)")  # fmt: skip
    p.add_argument("--instance", default=os.environ.get("SEM_INSTANCE") or uuid.uuid4().hex)
    return p.parse_args(argv)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: this daemon owns the signals."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    command = EngineCommand(
        python=args.engine_python or default_engine_python(),
        **({"module": args.engine_module} if args.engine_module else {}),
    )
    settings = EngineSettings(
        command=command,
        state_dir=args.state_dir.resolve(),
        instance=args.instance,
        parent_env=dict(os.environ),
    )
    try:
        inventory = await asyncio.to_thread(detect, config.devices, config.cpu_memory_budget)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2

    cache_config = config.cache
    cache = ModelCache(
        CacheSettings(
            cache_dir=(args.cache_dir or Path(cache_config.dir or CacheSettings().cache_dir)),
            budget=None if cache_config.budget is None else parse_size(cache_config.budget),
            margin=parse_size(cache_config.margin),
            parallel_files=cache_config.parallel_files,
        )
    )
    events = EventLog()
    probe = EngineProbe()
    timing = ReplicaTiming(start_timeout=args.start_timeout, stop_grace=args.stop_grace)
    manager = Manager(
        settings=settings, inventory=inventory, probe=probe, events=events, timing=timing,
        scheduling=SchedulerSettings(recheck_interval=config.recheck_seconds), cache=cache,
    )  # fmt: skip
    log.info("devices: %s", describe(manager.devices))
    log.info("model cache: %s", cache.cache_dir)
    app = create_app(manager, events, token=args.token, cache=cache)
    server = _QuietServer(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning",
            timeout_graceful_shutdown=1, lifespan="off",
        )
    )  # fmt: skip

    stopping = asyncio.Event()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("got %s (%s)", sig.name, "stopping" if signals_seen == 1 else "forcing")
        stopping.set()
        if signals_seen > 1:
            for entry in manager.entries():
                for replica in entry.replicas:
                    if replica.process is not None:
                        signal_group(replica.process.pgid, signal.SIGKILL)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    async def serve_api() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way of saying it could not bind
            log.error("cannot listen on %s:%d (address in use?)", args.host, args.port)

    serve_task = asyncio.create_task(serve_api(), name="admin-api")
    while not server.started and not serve_task.done():
        await asyncio.sleep(0.05)
    if serve_task.done():
        await probe.aclose()
        await cache.aclose()
        return 2
    manager.start()
    try:
        for spec in config.models:
            try:
                manager.add(spec)
            except SupervisorError as exc:
                events.emit("model_invalid", spec.name, exc.message)
        log.info("supervisor listening on http://%s:%d (state in %s)",
                 args.host, args.port, settings.state_dir)  # fmt: skip
        await asyncio.wait(
            {serve_task, asyncio.ensure_future(stopping.wait())}, return_when="FIRST_COMPLETED"
        )
    finally:
        await manager.shutdown(args.drain_timeout)
        await cache.aclose()  # partial downloads stay on disk for the next run to resume
        server.should_exit = True
        await serve_task
        await probe.aclose()
    log.info("supervisor stopped; no engine left")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return asyncio.run(serve(parse_args(argv)))
