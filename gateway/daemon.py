"""The gateway process: serve until SIGTERM/SIGINT, then stop accepting and finish in-flight
requests (bounded by --shutdown-timeout)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket

import aiohttp
from aiohttp import web

import gateway
from contract import defaults
from contract.routes import ModelRoute, ReplicaRoute, RouteTable
from gateway.admission import Admission
from gateway.app import create_app
from gateway.limits import Limits
from gateway.reporter import Reporter
from gateway.retry import RetryBudget
from gateway.routes import RouteWatcher
from gateway.state import DOOR, JOURNEYS, KEYS

log = logging.getLogger("sem.gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=defaults.GATEWAY_PORT)
    p.add_argument("--supervisor", default=defaults.SUPERVISOR_URL)
    p.add_argument("--admin-token", default=os.environ.get("SEM_ADMIN_TOKEN"),
                   help="the supervisor's admin token (the route table and demand reports"
                   " need it)")  # fmt: skip
    p.add_argument("--require-keys", action="store_true",
                   help="refuse requests without an API key even while no key exists"
                   " (keys are checked as soon as one exists: `sem keys create`)")  # fmt: skip
    p.add_argument("--report-interval", type=float, default=1.0,
                   help="seconds between demand reports to the supervisor")  # fmt: skip
    p.add_argument("--route", action="append", default=[], metavar="MODEL=URL[@SLOTS]",
                   help="serve MODEL from an engine at URL, without a supervisor"
                   " (repeatable; SLOTS: requests in flight, default 4096)")  # fmt: skip
    p.add_argument("--listen-fd", type=int, default=None,
                   help="serve on this inherited listening socket instead of binding --port"
                   " (`sem run` keeps it open across gateway restarts)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=10.0)
    p.add_argument(
        "--max-queue", type=int, default=defaults.MAX_QUEUE, help="waiting requests per model"
    )
    p.add_argument("--queue-timeout", type=float, default=defaults.QUEUE_TIMEOUT,
                   help="longest wait for a slot or for the model to be ready")  # fmt: skip
    p.add_argument("--upstream-timeout", type=float, default=defaults.UPSTREAM_TIMEOUT,
                   help="longest a single engine call may take")  # fmt: skip
    p.add_argument("--max-attempts", type=int, default=3,
                   help="engine failures one request may meet before it is refused")  # fmt: skip
    p.add_argument("--replay-timeout", type=float, default=defaults.REPLAY_TIMEOUT,
                   help="how long a failed request waits for a ready replica")  # fmt: skip
    p.add_argument("--stall-after", type=float, default=defaults.STALL_AFTER,
                   help="seconds without a byte from an engine whose streams are producing"
                   " before it is taken as stalled (its requests go elsewhere)")  # fmt: skip
    p.add_argument("--quarantine", type=float, default=defaults.QUARANTINE,
                   help="seconds a request that used all its attempts is refused")  # fmt: skip
    add_limits(p)
    return p.parse_args(argv)


LIMIT_HELP = {  # each front-door limit's option (gateway.limits.Limits' fields, dashed)
    "header_timeout": "s from accept to a connection's first request headers",
    "body_timeout": "s between two reads of a request body (408 past it)",
    "client_write_timeout": "s a client may leave its answer unread before it loses the"
    " connection (its engine request is cancelled)",
    "keepalive_timeout": "s an idle client connection is kept",
    "max_connections": "open client connections; more are closed at accept (0: half of ulimit -n)",
    "max_body": "bytes of one request body (413 past it)",
    "max_body_memory": "bytes of request bodies held at once (503 past it)",
    "max_json_depth": "nesting of arrays and objects in a body (400 past it)",
}


YOUNG_OBJECTS = 10_000  # the collector's first threshold (Python's default: 700)


def add_limits(p: argparse.ArgumentParser) -> None:
    """The front door's options, each defaulting to Limits' default."""
    g = p.add_argument_group("front door limits")
    for name, help_ in LIMIT_HELP.items():
        default = getattr(Limits(), name)
        g.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help=help_)  # fmt: skip


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(**{name: getattr(args, name) for name in LIMIT_HELP})


def static_routes(specs: list[str]) -> RouteTable:
    """`MODEL=URL[@SLOTS]` entries as a route table of ready replicas (engines run elsewhere)."""
    models: dict[str, ModelRoute] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        url, _, slots = rest.partition("@")
        if not sep or not name or not url.startswith("http"):
            raise ValueError(f"{spec!r} is not MODEL=http://host:port[@SLOTS]")
        replicas = models[name].replicas if name in models else ()
        replica = ReplicaRoute(f"{name}-{len(replicas)}", "ready", url.rstrip("/"),
                               int(slots or 4096))  # fmt: skip
        models[name] = ModelRoute(name, "ready", "static route", (*replicas, replica))
    return RouteTable(version=1, models=models)


async def serve(args: argparse.Namespace) -> int:
    try:
        fixed = static_routes(args.route) if args.route else None
    except ValueError as exc:
        log.error("--route: %s", exc)
        return 2
    control = aiohttp.ClientSession(trust_env=False)
    watcher = RouteWatcher(args.supervisor, control, token=args.admin_token)
    if fixed is not None:
        watcher.update(fixed)
    # With static routes there is no supervisor to follow.
    watch_task = None if fixed else asyncio.create_task(watcher.run(), name="route-watcher")
    admission = Admission(watcher, max_queue=args.max_queue, queue_timeout=args.queue_timeout)
    retry = RetryBudget(
        max_attempts=args.max_attempts, quarantine=args.quarantine,
        replay_timeout=args.replay_timeout, stall_after=args.stall_after,
    )  # fmt: skip
    app = create_app(
        watcher, admission, upstream_timeout=args.upstream_timeout, retry=retry,
        limits=limits_of(args), require_keys=args.require_keys,
    )  # fmt: skip
    door = app[DOOR]
    door.shutdown_timeout = args.shutdown_timeout  # for both servers: see FrontDoor.stop
    reporter = Reporter(args.supervisor, control, admission, args.admin_token,
                        args.report_interval, stalls=app[JOURNEYS].progress.stalls,
                        usage=app[KEYS].usage)  # fmt: skip
    report_task = None if fixed else asyncio.create_task(reporter.run(), name="reporter")
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream request, and vLLM aborts the generation (freeing its slot).
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=door.shutdown_timeout, handler_cancellation=True,
        keepalive_timeout=args.keepalive_timeout,
    )  # fmt: skip
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    listener: asyncio.Server | None = None
    try:
        await runner.setup()
        try:
            inherited = None if args.listen_fd is None else socket.socket(fileno=args.listen_fd)
            listener = await door.listen(runner, args.host, args.port, inherited)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror)
            return 2
        log.info("gateway listening on http://%s:%d (supervisor %s); hot path: %s",
                 args.host, args.port, args.supervisor, gateway.RUNS)  # fmt: skip
        # What start-up made lives as long as the gateway: out of the collector's way, so its
        # full collections under load walk only what requests make. And a young generation of
        # 10,000 objects, not 700: requests free almost everything they make by reference
        # counting, and at 700 the collector ran 876 times in a benchmark run for 2.2% of the
        # gateway's CPU; at 10,000, 4 times for 0.2% (docs/benchmarks.md).
        gc.freeze()
        gc.set_threshold(YOUNG_OBJECTS)
        await stopping.wait()
        log.info("stopping: no new connections; finishing in-flight requests")
    finally:
        if listener is not None:
            listener.close()  # no new connections
        await runner.cleanup()  # stops listening, waits for handlers up to shutdown_timeout
        for task in (watch_task, report_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await control.close()
    log.info("gateway stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        import uvloop  # the faster event loop where it is installed (Linux: with uvicorn)
    except ImportError:
        return asyncio.run(serve(args))
    return uvloop.run(serve(args))
