"""What does sem's own work cost per request and per stream? The gateway's hot path in one
process, its sockets faked: steady to a few % where the loopback benchmarks swing by 10-20%.

A client's request is fed to the front door's fast path (gateway.fastpath) as the bytes a
client sends; the route's whole journey runs (parse, validation, keys, admission, progress,
the relay, metrics) through sem's real engine client (gateway.upstream), whose engine answer is
fed to it as the bytes a vLLM server sends (a stream: 64 reads, one per loop turn, with usage in
every chunk, as sem asks). What is not measured: the kernel's socket calls and the event loop's
polling, which any proxy pays (bench/gateway_overhead.py and ../shared/bench measure those
too). Each figure is the best of several rounds of CPU time, the process pinned to one core.

    .venv/bin/python bench/hot_path.py [--against OTHER_CHECKOUT | --pure] [--rounds 10]
    .venv/bin/python bench/hot_path.py --instructions [--against OTHER_CHECKOUT | --pure]

With `--against`, the same measure of another checkout of sem (an older commit) in turn, and the
ratios; with `--pure`, of this checkout's pure Python against its compiled hot path (what runs
is the gateway's: compiled when built from these sources, gateway.native). The engine connection
is seeded into the pool and the client's is the front door's own: compiled classes cannot be
patched.

With `--instructions`, the figure is the instructions executed per request and per stream,
counted by valgrind (cachegrind, no cache simulation; ~1 min per checkout): the same on every
run and whatever the machine's neighbours do, where CPU time on a shared 2-core machine swings
by a third. It is the difference between a process that measures two rounds and one that
measures one, so start-up and warm-up cancel out. Instructions are not time (a cache miss costs
hundreds), but a change that removes work shows here first and exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CLIENT_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\n"
    b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\nContent-Length: %d\r\n"
    b"Content-Type: application/json\r\n\r\n"
)


def engine_reads(stream: bool) -> list[bytes]:
    """What the engine's socket gives the gateway, read by read."""
    from bench.fake_answers import CHUNKS, COMPLETION, DONE
    from bench.gateway_overhead import CHUNK_WITH_USAGE, FINAL_USAGE
    from gateway.proxy import http_chunk

    if not stream:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        return [head % len(COMPLETION) + COMPLETION]
    reads = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n"]  # fmt: skip
    reads += [http_chunk(CHUNK_WITH_USAGE % (n + 5, n)) for n in range(1, CHUNKS + 1)]
    reads.append(http_chunk(FINAL_USAGE) + http_chunk(DONE) + b"0\r\n\r\n")
    return reads


class FakeEngine:
    """The engine's side of an upstream connection: a request written to it is answered with
    `reads`, one per loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reads: list[bytes]) -> None:
        self.loop, self.reads, self.conn = loop, reads, None  # conn: set once it exists

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self._read, 0)

    def _read(self, index: int) -> None:
        self.conn.data_received(self.reads[index])  # type: ignore[attr-defined]
        if index + 1 < len(self.reads):
            self.loop.call_soon(self._read, index + 1)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class FakeClient:
    """The client's side: collects the answer, and says when it is whole."""

    def __init__(self, end: bytes) -> None:
        self.end, self.done = end, None  # done: a future per request
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data
        if self.done is not None and not self.done.done() and data.endswith(self.end):
            self.done.set_result(None)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


# Requests (or streams) per measured round.
COUNTS = {"request": 3000, "stream": 300}


async def measure(stream: bool, rounds: int, count: int | None = None) -> float:
    """CPU microseconds per request (or stream), the best of `rounds` of `count` each."""
    from aiohttp import web

    from gateway.app import create_app
    from gateway.daemon import static_routes
    from gateway.routes import RouteWatcher
    from gateway.state import DOOR, UPSTREAM
    from gateway.upstream import _Connection

    loop = asyncio.get_running_loop()
    watcher = RouteWatcher("http://127.0.0.1:1", None)  # type: ignore[arg-type]
    watcher.update(static_routes(["fake=http://127.0.0.1:9"]))
    app = create_app(watcher)
    pool, reads = app[UPSTREAM], engine_reads(stream)
    # One kept-alive engine connection, its socket the fake engine: every request reuses it
    # (a compiled gateway's pool cannot be patched, so it is seeded).
    conn = _Connection(pool, pool.target("http://127.0.0.1:9").key)
    engine = FakeEngine(loop, reads)
    engine.conn = conn
    conn.connection_made(engine)  # type: ignore[arg-type]
    pool.put_idle(conn)

    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    raw = json.dumps(body).encode()
    request = CLIENT_HEAD % len(raw) + raw
    client = FakeClient(b"0\r\n\r\n" if stream else b"}")
    door = app[DOOR]
    conn = door.protocols(web.Server(app._handle))()  # the front door's, aiohttp's behind it
    conn.connection_made(client)  # type: ignore[arg-type]

    async def one() -> None:
        client.done = loop.create_future()
        conn.data_received(request)
        await client.done
        await asyncio.sleep(0)  # the request's task ends

    for _ in range(200):  # warm: pools, caches, the first-byte clock
        await one()
    assert conn.fast is not None, "the request left the fast path: nothing to measure"
    assert b"200 OK" in client.last or client.last.endswith(client.end), client.last[:200]
    gc.freeze()
    count = count or COUNTS["stream" if stream else "request"]
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(count):
            await one()
        best = min(best, (time.process_time() - started) / count * 1e6)
    return best


def run_one(checkout: Path, rounds: int, pure: bool = False) -> dict[str, float]:
    """This script's measure of `checkout`'s gateway, in a process of its own on one core
    (`pure`: its pure Python, not its compiled modules; see gateway.native)."""
    command = [sys.executable, __file__, "--child", str(checkout), "--rounds", str(rounds)]
    env = {**os.environ, "SEM_GATEWAY_NATIVE": "0"} if pure else None
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return dict(json.loads(out.splitlines()[-1]))


def run_counted(checkout: Path, pure: bool, count: int | None) -> dict[str, float]:
    """Instructions per request and per stream of `checkout`'s gateway (valgrind's count of a
    child measuring two rounds, less one measuring one)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dicts in both processes
    if pure:
        env["SEM_GATEWAY_NATIVE"] = "0"
    figures = {}
    for kind in COUNTS:
        total = []
        for rounds in (1, 2):
            command = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
                       "--cachegrind-out-file=/dev/null", sys.executable, __file__, "--child",
                       str(checkout), "--rounds", str(rounds), "--kinds", kind]  # fmt: skip
            if count:
                command += ["--count", str(count)]
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            counted = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
            assert counted is not None, done.stderr[-2000:]
            total.append(int(counted[1].replace(",", "")))
        figures[kind] = (total[1] - total[0]) / (count or COUNTS[kind])
    return figures


def child(checkout: Path, rounds: int, kinds: list[str], count: int | None) -> None:
    import uvloop

    sys.path.insert(0, str(checkout))  # its gateway; the bench's helpers stay this checkout's
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    figures = {kind: uvloop.run(measure(kind == "stream", rounds, count)) for kind in kinds}
    print(json.dumps(figures))


def instructions(checkouts: list[tuple[str, Path, bool]], count: int | None) -> None:
    """`--instructions`: each checkout's count, and the ratio."""
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt install valgrind)")
    counted = {}
    for name, path, pure in checkouts:
        print(f"counting {name} ({path}{', pure Python' if pure else ''})...", flush=True)
        counted[name] = figures = run_counted(path.resolve(), pure, count)
        print(f"  {name:8s} {figures['request']:10,.0f} instructions per request,"
              f" {figures['stream']:12,.0f} per stream (64 chunks)", flush=True)  # fmt: skip
    if len(counted) > 1:
        this, other = counted["this"], counted["against"]
        print(f"  ratio this/against: {this['request'] / other['request']:.3f} per request,"
              f" {this['stream'] / other['stream']:.3f} per stream")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="another checkout of sem, measured in turn")  # fmt: skip
    parser.add_argument("--pure", action="store_true",
                        help="against this checkout's pure Python")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--turns", type=int, default=2, help="alternations with --against")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions executed, counted by valgrind")  # fmt: skip
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # per round (tests)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kinds", default=",".join(COUNTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.rounds, args.kinds.split(","), args.count)
        return
    checkouts = [("this", REPO, False)]
    if args.against or args.pure:
        checkouts.append(("against", args.against or REPO, args.pure))
    if args.instructions:
        instructions(checkouts, args.count)
        return
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in checkouts}
    for turn in range(args.turns if len(checkouts) > 1 else 1):
        for name, path, pure in checkouts:
            figures = run_one(path.resolve(), args.rounds, pure)
            results[name].append(figures)
            print(f"turn {turn + 1} {name:8s} {figures['request']:6.1f} us per request,"
                  f" {figures['stream']:6.1f} us per stream", flush=True)  # fmt: skip
    best = {name: {k: min(f[k] for f in runs) for k in ("request", "stream")}
            for name, runs in results.items()}  # fmt: skip
    print("\nbest of each (CPU time, sockets faked):")
    for name, figures in best.items():
        print(f"  {name:8s} {figures['request']:6.1f} us per request,"
              f" {figures['stream']:6.1f} us per stream (64 chunks)")  # fmt: skip
    if len(best) > 1:
        this, other = best["this"], best["against"]
        print(f"  ratio this/against: {this['request'] / other['request']:.2f} per request,"
              f" {this['stream'] / other['stream']:.2f} per stream")  # fmt: skip


if __name__ == "__main__":
    if str(REPO) not in sys.path:  # run as a file: the bench's helpers from this checkout
        sys.path.insert(0, str(REPO))
    main()
