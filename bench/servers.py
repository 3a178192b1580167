"""Which HTTP server for the front door? One minimal proxy-like handler on each, in one run.

The same handler (read a JSON body; answer a JSON body, or with `"stream": true` an SSE stream
of 64 chunks 5 ms apart) on aiohttp's web server (what the gateway runs), aiohttp's low-level
server (same protocol code, no router or middlewares), uvicorn with httptools on a raw ASGI app,
granian (Rust: hyper + tokio) with an ASGI and an RSGI app, and a raw asyncio protocol with
httptools (no framework: the floor, and how the gateway's fast path is built). Each server
alone on CPU 1 (all its threads), the load generator (bench/gateway_overhead.py's) on CPU 0;
servers interleaved in rotated order per rep. Prints CPU per request / per stream, user and
system apart (user time is the steadiest figure on a shared machine), p50, req/s, and how much
of CPU 1 other processes and the hypervisor took meanwhile.

    .venv/bin/python bench/servers.py [--reps 3] [--duration 5] [--granian PATH]

granian is in the `bench` extra (`pip install 'sem[bench]'`), else give its executable from any
venv with granian and uvloop (it imports this module, which needs only the standard library at
import time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from shutil import which
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: sem's packages from this checkout
    sys.path.insert(0, str(REPO))

from bench.fake_answers import CHUNK, CHUNK_GAP, CHUNKS, COMPLETION, DONE  # noqa: E402

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def wants_stream(body: bytes) -> bool:
    """What every server's handler does with the request: parse it, as a proxy must."""
    request = json.loads(body)
    return isinstance(request, dict) and request.get("stream") is True


# -- raw ASGI (uvicorn, granian --interface asgi) -------------------------------------------------


async def asgi_app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if not wants_stream(body):
        headers = [*JSON_HEADERS, (b"content-length", str(len(COMPLETION)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": COMPLETION})
        return
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    for _ in range(CHUNKS):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await asyncio.sleep(CHUNK_GAP)
    await send({"type": "http.response.body", "body": DONE})


# -- RSGI (granian --interface rsgi) --------------------------------------------------------------


class RsgiApp:
    """granian's own interface: the body in one await, bytes straight to the Rust transport."""

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if not wants_stream(await protocol()):
            protocol.response_bytes(200, [("content-type", "application/json")], COMPLETION)
            return
        transport = protocol.response_stream(200, [("content-type", "text/event-stream")])
        for _ in range(CHUNKS):
            await transport.send_bytes(CHUNK)
            await asyncio.sleep(CHUNK_GAP)
        await transport.send_bytes(DONE)


rsgi_app = RsgiApp()


# -- a raw asyncio protocol with httptools (the lightest Python server: the floor) ---------------


class RawProtocol(asyncio.Protocol):
    """HTTP/1.1 on a plain asyncio protocol, parsed by httptools (llhttp, in C): no request or
    response objects, one `transport.write` per answer (a stream: one per chunk). What any
    server written in Python pays at least; keep-alive only, no limits, no pipelining."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as aiohttp does

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        self.answer(self.url.decode(), body)

    def answer(self, path: str, body: bytes) -> None:
        """The handler: the bench's fixed answers (bench/proxy_floor.py relays instead)."""
        assert self.transport is not None
        if not wants_stream(body):
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(COMPLETION), COMPLETION)
            )
            return
        asyncio.get_running_loop().create_task(self.stream(self.transport))

    async def stream(self, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        for _ in range(CHUNKS):
            transport.write(b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK))
            await asyncio.sleep(CHUNK_GAP)
        transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(DONE), DONE))


async def serve_raw(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(RawProtocol, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()  # until terminated


# -- aiohttp (web and low-level) and uvicorn, served from this process ---------------------------


async def aiohttp_handler(request: web.BaseRequest) -> web.StreamResponse:
    from aiohttp import web

    if not wants_stream(await request.read()):
        return web.Response(body=COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(CHUNKS):
        await response.write(CHUNK)
        await asyncio.sleep(CHUNK_GAP)
    await response.write(DONE)
    return response


async def serve_aiohttp(port: int, lowlevel: bool) -> None:
    from aiohttp import web

    if lowlevel:
        runner: web.BaseRunner[Any] = web.ServerRunner(web.Server(aiohttp_handler))
    else:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", aiohttp_handler)
        runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()  # until terminated


def serve(kind: str, port: int) -> None:
    import uvloop

    if kind == "uvicorn-httptools":
        import uvicorn

        uvicorn.run(
            asgi_app, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
            lifespan="off", log_level="warning", access_log=False, backlog=4096,
        )  # fmt: skip
        return
    if kind == "raw-httptools":
        uvloop.run(serve_raw(port))
        return
    uvloop.run(serve_aiohttp(port, lowlevel=kind == "aiohttp-lowlevel"))


# -- the comparison ------------------------------------------------------------------------------


def server_argv(kind: str, port: int, granian: str | None) -> list[str] | None:
    """The command that serves `kind` on `port`, pinned to CPU 1; None if it cannot run here."""
    pin = ["taskset", "-c", "1"]  # every thread the server starts inherits it
    if not kind.startswith("granian"):
        return [*pin, sys.executable, __file__, "serve", kind, str(port)]
    if granian is None:
        return None
    interface = kind.removeprefix("granian-")
    return [*pin, granian, "--interface", interface, "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
            "--backlog", "4096", f"bench.servers:{interface}_app"]  # fmt: skip


KINDS = ["aiohttp-web", "aiohttp-lowlevel", "uvicorn-httptools", "granian-asgi", "granian-rsgi",
         "raw-httptools"]  # fmt: skip
SCENARIOS = {"ns64": (64, False), "s256": (256, True)}


# CPU per request or stream (user, system), p50 ms, req/s, others' and the hypervisor's share
Row = tuple[float, float, float, float, float, float]


async def run_one(pid: int, port: int, stream: bool, concurrency: int, duration: float) -> Row:
    """One load run against one server; its process tree's CPU per request (or stream)."""
    import psutil

    from bench.gateway_overhead import CpuMeter, load

    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    await load(url, 8, stream, 0.5, 50)  # warm up
    meter = CpuMeter(tree, 1)
    limit = (30.0, 1024) if stream else (duration, 10**9)
    got = await load(url, concurrency, stream, *limit)
    cpu, n = meter.since(), max(1, got.done)
    if got.errors:
        print(f"  {got.errors} errors of {got.done + got.errors}")
    return (cpu.user / n, cpu.system / n, got.pct(got.latencies, 50), got.done / got.elapsed,
            cpu.others / got.elapsed, cpu.steal / got.elapsed)  # fmt: skip


def cpu_per(seconds: float, stream: bool) -> str:
    return f"{seconds * 1000:.2f} ms" if stream else f"{seconds * 1e6:.0f} us"


def print_table(rows: dict[tuple[str, str], list[Row]]) -> None:
    print("\n| server | scenario | CPU per request/stream: user + system | p50 ms | req/s |"
          " others / steal on CPU 1 |\n|---|---|---|---|---|---|")  # fmt: skip
    for (kind, name), got in rows.items():
        user, system, p50, rps, others, steal = (statistics.median(r[i] for r in got)
                                                 for i in range(6))  # fmt: skip
        stream = SCENARIOS[name][1]
        cpu = f"{cpu_per(user, stream)} + {cpu_per(system, stream)}"
        print(f"| {kind} | {name} | {cpu} | {p50:.1f} | {rps:.0f} | {others:.0%} / {steal:.0%} |")


async def compare(args: argparse.Namespace) -> int:
    from bench.gateway_overhead import wait_port
    from supervisor.engine import free_port

    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs: servers on CPU 1, load on CPU 0")
        return 2
    os.sched_setaffinity(0, {0})
    procs: dict[str, tuple[asyncio.subprocess.Process, int]] = {}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for kind in args.servers.split(","):
        port = free_port()
        argv = server_argv(kind, port, args.granian)
        if argv is None:
            print(f"{kind}: skipped (no granian: give --granian)")
            continue
        procs[kind] = (await asyncio.create_subprocess_exec(*argv, cwd=REPO, env=env), port)
    rows: dict[tuple[str, str], list[Row]] = {}
    try:
        for _, port in procs.values():
            await asyncio.to_thread(wait_port, port)
        print(f"load average {os.getloadavg()[0]:.2f}; servers on CPU 1, load on CPU 0")
        kinds = list(procs)
        for rep in range(args.reps):
            for kind in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:
                proc, port = procs[kind]
                for name in args.scenarios.split(","):
                    concurrency, stream = SCENARIOS[name]
                    row = await run_one(proc.pid, port, stream, concurrency, args.duration)
                    rows.setdefault((kind, name), []).append(row)
                    cpu = f"{cpu_per(row[0], stream)} + {cpu_per(row[1], stream)}"
                    print(f"rep {rep} {kind:18} {name:5} CPU {cpu:18} p50 {row[2]:8.2f} ms "
                          f"{row[3]:8.1f} req/s  others {row[4]:.0%}, steal {row[5]:.0%} of CPU 1",
                          flush=True)  # fmt: skip
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            await proc.wait()
    print_table(rows)
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per non-stream run")
    parser.add_argument("--servers", default=",".join(KINDS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    beside = Path(sys.executable).parent / "granian"  # `pip install 'sem[bench]'`
    parser.add_argument("--granian", default=str(beside) if beside.exists() else which("granian"))
    return asyncio.run(compare(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
