"""`sem run`: supervisor and gateway as two child processes, in the foreground.

Two processes, so the gateway keeps serving ready engines while the supervisor restarts. A child
that dies (a signal, a crash) is started again at once, like systemd's Restart=on-failure would:
a new supervisor re-adopts the engines that outlived the old one. The gateway's listening socket
belongs to `sem run` and is handed to each gateway it starts (like systemd's socket activation):
while a dead gateway is replaced, new connections wait in the socket's backlog instead of being
refused; only the requests the dead one held are lost. Up to 5 restarts a minute; a child
that exits on its own (code 0, or 2 for bad config / busy port) stops everything; `sem run` then
exits with the same 2 (a usage error: fix the config or the ports), else with 1.
SIGHUP is passed to the supervisor (reload models.yaml).
Ctrl-C or SIGTERM: the gateway stops taking requests, the supervisor drains and stops every
engine, and whatever is left after the deadline (engines included, found by the SEM_INSTANCE
marker in their environment) is killed. A second Ctrl-C skips the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from contract import defaults
from supervisor.procgroup import INSTANCE_ENV, kill_marked


@dataclass(frozen=True)
class RunOptions:
    config: Path
    host: str = "127.0.0.1"
    gateway_port: int = defaults.GATEWAY_PORT
    supervisor_port: int = defaults.SUPERVISOR_PORT
    state_dir: Path = Path(".sem")
    engine_python: str | None = None
    engine_module: str | None = None
    stop_timeout: float = 25.0  # both children gone within this, else SIGKILL
    token: str | None = None
    max_restarts: int = 5  # per child and minute
    queue_timeout: float = defaults.QUEUE_TIMEOUT  # the gateway's wait for a ready replica
    replay_timeout: float = defaults.REPLAY_TIMEOUT  # its wait for a restarted engine on a retry
    cluster_address: str | None = None  # a Ray cluster's head (the supervisor's --cluster-address)
    # More options of each daemon, as NAME=VALUE (or a bare NAME for a flag): `--max-body=...`.
    supervisor_options: tuple[str, ...] = ()
    gateway_options: tuple[str, ...] = ()

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def supervisor_url(self) -> str:
        return f"http://{self.host}:{self.supervisor_port}"


def say(message: str) -> None:
    print(f"sem: {message}", flush=True)


def supervisor_argv(opts: RunOptions) -> list[str]:
    argv = [
        sys.executable, "-m", "supervisor",
        "--config", str(opts.config),
        "--host", opts.host,
        "--port", str(opts.supervisor_port),
        "--state-dir", str(opts.state_dir),
    ]  # fmt: skip
    if opts.engine_python:
        argv += ["--engine-python", opts.engine_python]
    if opts.engine_module:
        argv += ["--engine-module", opts.engine_module]
    if opts.cluster_address:
        argv += ["--cluster-address", opts.cluster_address]
    return argv + option_args(opts.supervisor_options)


def gateway_argv(opts: RunOptions, listen_fd: int) -> list[str]:
    return [
        sys.executable, "-m", "gateway",
        "--host", opts.host,
        "--port", str(opts.gateway_port),
        "--listen-fd", str(listen_fd),
        "--supervisor", opts.supervisor_url,
        "--queue-timeout", f"{opts.queue_timeout:g}",
        "--replay-timeout", f"{opts.replay_timeout:g}",
        *option_args(opts.gateway_options),
    ]  # fmt: skip


def option_args(options: tuple[str, ...]) -> list[str]:
    """`name=value` -> `--name value`; a bare `name` (a flag) -> `--name`."""
    out = []
    for option in options:
        name, equals, value = option.partition("=")
        out += [f"--{name.strip().lstrip('-')}", *([value] if equals else [])]
    return out


def gateway_socket(opts: RunOptions) -> socket.socket:
    """The gateway's listening socket (SO_REUSEADDR), inheritable by each gateway started;
    OSError if the port is taken."""
    sock = socket.create_server((opts.host, opts.gateway_port), backlog=4096)
    sock.set_inheritable(True)
    return sock


async def _announce(opts: RunOptions) -> None:
    """Print where sem listens once the gateway answers, then each model as it becomes ready."""
    auth = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}  # /routes needs it
    async with httpx.AsyncClient(trust_env=False, timeout=30, headers=auth) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{opts.gateway_url}/health")).status_code == 200:
                    break
            await asyncio.sleep(0.3)
        say(f"gateway    {opts.gateway_url}   (POST /generate, /v1/*)")
        say(f"supervisor {opts.supervisor_url}   (GET /models, /routes, /events)")
        announced: set[str] = set()
        version = -1
        while True:
            try:
                response = await client.get(
                    f"{opts.supervisor_url}/routes", params={"after": version, "timeout": 20}
                )
                table = response.json()
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(1)
                continue
            version = table["version"]
            for name, model in table["models"].items():
                if model["state"] == "ready" and name not in announced:
                    announced.add(name)
                    say(f"model {name} is ready; try:")
                    print(
                        f"  curl -s {opts.gateway_url}/generate -H 'content-type: application/json'"
                        f' -d \'{{"model":"{name}","prompt":"Hello"}}\'',
                        flush=True,
                    )


async def _terminate(procs: list[asyncio.subprocess.Process], deadline: float) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        # Gateway first (stops taking requests), then the supervisor (drains engines).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                await proc.wait()
    for proc in procs:
        if proc.returncode is None:
            say(f"pid {proc.pid} did not stop in time: killing it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def busy_ports(opts: RunOptions) -> list[int]:
    busy = []
    for port in (opts.gateway_port, opts.supervisor_port):
        with socket.socket() as sock:
            try:
                sock.bind((opts.host, port))
            except OSError:
                busy.append(port)
    return busy


async def run(opts: RunOptions) -> int:
    if busy := busy_ports(opts):
        taken = ", ".join(str(p) for p in busy)
        say(f"port(s) {taken} on {opts.host} are in use (another sem?); choose others with"
            " --gateway-port / --supervisor-port")  # fmt: skip
        return 2
    instance = os.environ.get(INSTANCE_ENV) or uuid.uuid4().hex
    env = dict(os.environ, **{INSTANCE_ENV: instance, "PYTHONUNBUFFERED": "1"})
    if opts.token:
        env["SEM_ADMIN_TOKEN"] = opts.token
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            say("stopping (Ctrl-C again to force)")
        stop.set()

    try:
        listener = gateway_socket(opts)
    except OSError as exc:
        say(f"cannot listen on {opts.host}:{opts.gateway_port}: {exc.strerror}")
        return 2
    argvs = {
        "supervisor": supervisor_argv(opts),
        "gateway": gateway_argv(opts, listener.fileno()),
    }
    inherits = {"supervisor": (), "gateway": (listener.fileno(),)}
    procs: dict[str, asyncio.subprocess.Process] = {}

    async def spawn(name: str) -> None:
        # Own process groups: a terminal's Ctrl-C reaches only this launcher, which then stops
        # the children in order with one signal each (a second signal would mean "force").
        procs[name] = await asyncio.create_subprocess_exec(
            *argvs[name], env=env, process_group=0, pass_fds=inherits[name]
        )

    def on_hangup() -> None:
        say("reloading models.yaml")
        with contextlib.suppress(ProcessLookupError):
            procs["supervisor"].send_signal(signal.SIGHUP)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    say(f"starting supervisor and gateway (config {opts.config}, state in {opts.state_dir})")
    await spawn("supervisor")
    await spawn("gateway")
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    announce = asyncio.create_task(_announce(opts))
    stopping = asyncio.ensure_future(stop.wait())
    restarts: dict[str, list[float]] = {name: [] for name in argvs}
    code = 0
    while not stop.is_set():
        exits = {asyncio.ensure_future(proc.wait()): name for name, proc in procs.items()}
        done, _ = await asyncio.wait({stopping, *exits}, return_when="FIRST_COMPLETED")
        for fut in exits:
            fut.cancel()
        exited = [exits[fut] for fut in done if fut in exits]
        if stop.is_set() or not exited:
            break
        name = exited[0]
        returncode = procs[name].returncode
        now = time.monotonic()
        recent = restarts[name] = [t for t in restarts[name] if now - t < 60] + [now]
        if returncode in (0, 2) or len(recent) > opts.max_restarts:
            say(f"{name} exited with code {returncode}; stopping the rest")
            code = 2 if returncode == 2 else 1
            break
        killed = returncode is not None and returncode < 0
        how = f"signal {-returncode}" if killed and returncode else f"code {returncode}"
        kept = " (engines keep running and are re-adopted)" if name == "supervisor" else ""
        say(f"{name} died ({how}); starting it again{kept}")
        await spawn(name)
    loop.remove_signal_handler(signal.SIGHUP)
    supervisor, gateway = procs["supervisor"], procs["gateway"]
    announce.cancel()
    listener.close()  # the gateway's own copy listens until it stops taking requests
    deadline = time.monotonic() + (1.0 if signals > 1 else opts.stop_timeout)
    stop_task = asyncio.create_task(_terminate([gateway, supervisor], deadline))
    while not stop_task.done():
        await asyncio.wait({stop_task}, timeout=0.2)
        if signals > 1 and not stop_task.done():
            for proc in (gateway, supervisor):
                if proc.returncode is None:
                    proc.kill()
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await announce
    leftovers = kill_marked(INSTANCE_ENV, instance)
    if leftovers:
        say(f"killed {leftovers} leftover engine process(es)")
    say("stopped")
    return code
