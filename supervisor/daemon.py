"""The supervisor process: load models.yaml, start the models, serve the admin API, stop cleanly.

At start it restores the desired state from `<state-dir>/sem.db` and re-adopts engines that
outlived an earlier run (kill -9, crash) before the route table is served. Signals only set a
flag or start a task; the main coroutine acts (uvicorn's habit): SIGHUP reloads models.yaml;
the first SIGTERM/SIGINT drains and stops every engine (bounded), then the API closes; a second
one stops engines at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from contract import defaults
from supervisor.api import create_app
from supervisor.cache import CacheSettings, ModelCache
from supervisor.config import ConfigError, InvalidModel, ModelSpec, SemConfig, load_config
from supervisor.elastic_policy import ElasticSettings
from supervisor.engine import EngineCommand, spawn_engine
from supervisor.engine_metrics import EngineScraper
from supervisor.errors import SupervisorError
from supervisor.events import EventKind, EventLog
from supervisor.gpu_usage import NvmlProcessMemory
from supervisor.hosts import allowed_hosts, is_loopback
from supervisor.launch import EngineSettings
from supervisor.manager import Manager
from supervisor.metrics import SupervisorMetrics
from supervisor.probe import EngineProbe
from supervisor.procgroup import signal_group
from supervisor.reloader import Reloader
from supervisor.replica import ReplicaTiming
from supervisor.resources import Device, Inventory, NvmlInventory, describe, detect
from supervisor.scheduler import SchedulerSettings
from supervisor.store import Store, StoreError, private_folder
from supervisor.units import parse_size

if TYPE_CHECKING:
    from supervisor.cluster.backend import RayCluster

log = logging.getLogger("sem.supervisor")


def default_engine_python() -> str:
    """`.venv-engine/bin/python` beside sem's own venv, else the current interpreter."""
    candidate = Path(sys.prefix).parent / ".venv-engine" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m supervisor", description=__doc__)
    p.add_argument("--config", type=Path, default=Path("models.yaml"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=defaults.SUPERVISOR_PORT)
    p.add_argument("--state-dir", type=Path, default=Path(".sem"))
    p.add_argument("--engine-python", default=os.environ.get("SEM_ENGINE_PYTHON"))
    p.add_argument("--engine-module", default=os.environ.get("SEM_ENGINE_MODULE"))
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=defaults.SHUTDOWN_DRAIN,
        help="on shutdown, per model",
    )
    p.add_argument("--stop-grace", type=float, default=10.0, help="SIGTERM to SIGKILL, per engine")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--stall-after", type=float, default=10.0,
                   help="an engine with requests in flight and no progress this many seconds"
                   " is wedged: restarted (docs/faults.md)")  # fmt: skip
    p.add_argument("--token", default=os.environ.get("SEM_ADMIN_TOKEN"),
                   help="bearer token for mutating calls; required beyond loopback")  # fmt: skip
    p.add_argument(
        "--allowed-hosts", default=os.environ.get("SEM_ALLOWED_HOSTS", ""),
        help="comma-separated Host names answered besides loopback and --host (`*`: any)",
    )  # fmt: skip
    p.add_argument("--cache-dir", type=Path, help="hf:// models go here (default: models.yaml's"
                   " cache.dir, else HF_HUB_CACHE)")  # fmt: skip
    p.add_argument("--cluster-address", help="a Ray cluster's head (host:port): place models on"
                   " its nodes (overrides models.yaml's cluster.address)")  # fmt: skip
    p.add_argument(
        "--instance", default=os.environ.get("SEM_INSTANCE"),
        help="marker on every engine process (default: the one kept in the state folder)",
    )  # fmt: skip
    return p.parse_args(argv)


def listen_socket(host: str, port: int) -> socket.socket:
    """The admin API's socket, bound before anything starts (OSError if the port is taken).

    Made with proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose
    proto says TCP, and without it a response written as headers then body waits for the
    client's delayed ACK (~40 ms per request on a kept-alive connection; bench/control_plane.py).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def join_cluster(args: argparse.Namespace, config: SemConfig) -> RayCluster | None:
    """The Ray cluster to place models on (docs/cluster.md), None for this machine alone.
    Ray is imported only here: a single box needs none."""
    address = args.cluster_address or (config.cluster.address if config.cluster else None)
    if address is None:
        return None
    from supervisor.cluster.backend import RayCluster

    on_head = config.cluster.engines_on_head if config.cluster else True
    cluster = RayCluster(address, engines_on_head=on_head)
    await asyncio.to_thread(cluster.connect)
    log.info("Ray cluster at %s: %d node(s)", address, len(cluster.nodes()))
    return cluster


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: this daemon owns the signals."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def refuse_open_admin(host: str, token: str | None) -> str | None:
    """Why the admin API may not listen on `host` this way; None if it may."""
    if token or is_loopback(host):
        return None
    return (
        f"the admin API would listen on {host}, beyond loopback, without a token: anyone who"
        " reaches it could add models and run engines as this user. Set SEM_ADMIN_TOKEN"
        " (e.g. `openssl rand -hex 32`) or --token, or listen on 127.0.0.1"
    )


async def serve(args: argparse.Namespace) -> int:
    if why := refuse_open_admin(args.host, args.token):
        log.error("%s", why)
        return 2
    skipped: list[InvalidModel] = []
    try:
        config = load_config(args.config, skipped)
        store = Store(args.state_dir.resolve() / "sem.db")
    except (ConfigError, StoreError) as exc:
        log.error("%s", exc)
        return 2
    try:
        return await _serve(args, config, store, skipped)
    finally:
        store.close()


def models_at_start(
    config: SemConfig, skipped: list[InvalidModel], store: Store, events: EventLog
) -> list[ModelSpec]:
    """models.yaml's valid models; each skipped one is reported (`model_invalid`) and, if it
    ran before, kept as last applied: a typo in its entry must not drain a running model."""
    applied = store.applied_config()
    kept = []
    for invalid in skipped:
        log.error("model %s skipped: %s", invalid.name, invalid.problem)
        events.emit(EventKind.MODEL_INVALID, invalid.name, invalid.problem)
        if invalid.name in applied:
            kept.append(applied[invalid.name])
    return config.models + kept


def log_devices(inventory: Inventory, devices: list[Device]) -> None:
    """The start-up log's word on devices: those sem uses, and the GPUs it left out and why
    (MIG mode, hidden by CUDA_VISIBLE_DEVICES or `devices:`): an operator who expected them
    must see why they are not used."""
    log.info("devices: %s", describe(devices))
    if isinstance(inventory, NvmlInventory):
        for note in inventory.notes:
            log.warning("devices: %s", note)


async def _serve(
    args: argparse.Namespace, config: SemConfig, store: Store, skipped: list[InvalidModel]
) -> int:
    instance = args.instance or store.get_meta("instance") or uuid.uuid4().hex
    store.set_meta("instance", instance)
    command = EngineCommand(
        python=args.engine_python or default_engine_python(),
        **({"module": args.engine_module} if args.engine_module else {}),
    )
    try:
        cluster = await join_cluster(args, config)
        inventory: Inventory = (
            cluster
            if cluster is not None
            else await asyncio.to_thread(detect, config.devices, config.cpu_memory_budget)
        )
        sock = listen_socket(args.host, args.port)
    except (RuntimeError, ConnectionError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror)
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
    settings = EngineSettings(
        command=command,
        state_dir=args.state_dir.resolve(),
        instance=instance,
        parent_env=dict(os.environ),
        spawn=spawn_engine if cluster is None else cluster.spawn,
        adopt=None if cluster is None else cluster.adopt,
        prepare=None if cluster is None else cluster.prepare,
        hub_endpoint=cache.client.endpoint,
    )
    events = EventLog()
    probe = EngineProbe()
    timing = ReplicaTiming(
        start_timeout=args.start_timeout, stop_grace=args.stop_grace, stall_after=args.stall_after
    )
    gpus = NvmlProcessMemory() if isinstance(inventory, NvmlInventory) else None
    manager = Manager(
        settings=settings, inventory=inventory, probe=probe, events=events, timing=timing,
        scheduling=SchedulerSettings(recheck_interval=config.recheck_seconds), store=store,
        cache=cache, gpu_memory=gpus,
        elastic=ElasticSettings(min_residency=config.residency_seconds,
                                scale=config.autoscale.settings()),
    )  # fmt: skip
    await asyncio.to_thread(private_folder, settings.state_dir / "logs")  # engine logs
    log_devices(inventory, manager.devices)
    log.info("model cache: %s", cache.cache_dir)

    reload = Reloader(args.config, manager, config, args.drain_timeout)
    hosts = allowed_hosts(args.host, args.allowed_hosts.split(","))
    metrics = SupervisorMetrics(manager, events, EngineScraper(), gpus)
    await metrics.start()  # before restore(): its events count too
    app = create_app(
        manager, events, token=args.token, reload=reload, cache=cache, allowed_hosts=hosts,
        metrics=metrics, demand=manager.demand,
    )  # fmt: skip
    server = _QuietServer(
        uvicorn.Config(
            app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off",
        )
    )  # fmt: skip

    stopping = asyncio.Event()
    signals_seen = 0
    reloads: set[asyncio.Task[None]] = set()

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("got %s (%s)", sig.name, "stopping" if signals_seen == 1 else "forcing")
        stopping.set()
        if signals_seen > 1 and cluster is None:  # a cluster's engines are not our processes
            for entry in manager.entries():
                for replica in entry.replicas:
                    if replica.process is not None:
                        signal_group(replica.process.pgid, signal.SIGKILL)

    async def reload_on_hangup() -> None:
        try:
            await reload()
        except SupervisorError as exc:
            log.error("%s", exc.message)

    def on_hangup() -> None:
        task = asyncio.create_task(reload_on_hangup(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    models = models_at_start(config, skipped, store, events)
    diff = await manager.restore(models, args.drain_timeout)  # invalid models: events
    log.info("models: %s", diff)
    manager.start()
    if cluster is not None:
        cluster.watch(lambda joined, lost: manager.nodes_changed(lost))
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]), name="admin-api")
    try:
        log.info("supervisor listening on http://%s:%d (state in %s)",
                 args.host, args.port, settings.state_dir)  # fmt: skip
        await asyncio.wait(
            {serve_task, asyncio.ensure_future(stopping.wait())}, return_when="FIRST_COMPLETED"
        )
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in reloads:
            task.cancel()
        await manager.shutdown(args.drain_timeout)
        await cache.aclose()  # partial downloads stay on disk for the next run to resume
        server.should_exit = True
        await serve_task
        await metrics.aclose()
        await probe.aclose()
        if cluster is not None:
            await cluster.close()
        sock.close()
    log.info("supervisor stopped; no engine left")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return asyncio.run(serve(parse_args(argv)))
