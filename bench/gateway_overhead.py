"""What does sem's gateway cost in front of an engine? Gateway vs direct access, in one run.

A fast stand-in engine (aiohttp, instant answers; streams of 64 chunks 5 ms apart) and the load
generator share CPU 0; the gateway (`python -m gateway --route fake=...`) gets CPU 1, like a
gateway with its own core. Each scenario runs direct, then through the gateway, and prints the
figures and the ratio to direct, plus the gateway's own CPU time per request or stream (the
steadiest figure on a noisy machine).

    .venv/bin/python bench/gateway_overhead.py [--duration 10] [--scenarios ns1,ns64,s256,s1000]
                                               [--gateway-from OTHER_CHECKOUT]

Run ../shared/bench/run.sh to compare with peers (nginx, vllm-router, LiteLLM) side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

from supervisor.engine import free_port

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: sem's packages from this checkout
    sys.path.insert(0, str(REPO))

from bench.fake_answers import CHUNK, CHUNK_GAP, CHUNKS, COMPLETION, DONE  # noqa: E402

# -- the stand-in engine -------------------------------------------------------------------------

CHUNK_WITH_USAGE = (
    CHUNK[:-3] + b',"usage":{"prompt_tokens":5,"total_tokens":%d,"completion_tokens":%d}}\n\n'
)
FINAL_USAGE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"total_tokens":69,"completion_tokens":64}}\n\n'  # noqa: E501


async def engine_handler(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.Response(body=COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    options = body.get("stream_options") or {}
    continuous = options.get("include_usage") and options.get("continuous_usage_stats")
    for n in range(1, CHUNKS + 1):  # usage in every chunk when asked, as vLLM writes it
        await response.write(CHUNK_WITH_USAGE % (n + 5, n) if continuous else CHUNK)
        await asyncio.sleep(CHUNK_GAP)
    if options.get("include_usage"):
        await response.write(FINAL_USAGE)
    await response.write(DONE)
    return response


# -- the load generator --------------------------------------------------------------------------


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    @property
    def done(self) -> int:
        return len(self.latencies)

    def pct(self, values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else 0.0


async def one_request(
    session: aiohttp.ClientSession, url: str, stream: bool, result: Result
) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    started = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.errors += 1
                await response.read()
                return
            if not stream:
                await response.read()
            else:
                first = None
                tail = b""
                async for chunk in response.content.iter_any():
                    if first is None:
                        first = time.perf_counter()
                    tail = (tail + chunk)[-32:]
                if b"[DONE]" not in tail or first is None:
                    result.errors += 1
                    return
                result.ttfts.append(first - started)
        result.latencies.append(time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError):
        result.errors += 1


async def load(url: str, concurrency: int, stream: bool, duration: float, total: int) -> Result:
    result = Result()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    deadline = time.perf_counter() + duration
    sent = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < total:
                sent += 1
                await one_request(session, url, stream, result)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


# -- orchestration -------------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


SCENARIOS = {
    # name: (concurrency, stream, max requests)
    "ns1": (1, False, 10**9),
    "ns64": (64, False, 10**9),
    "s256": (256, True, 1024),
    "s1000": (1000, True, 2000),
}


class CpuMeter:
    """The CPU a process tree used since the meter was made, user and system apart, and what
    else its core did meanwhile. The split matters on a virtual machine: time stolen by the
    hypervisor lands in the kernel's share of whatever ran (system time grows with steal,
    sometimes 5x between two runs of the same server here), while user time is the part the
    process's own code decides; compare servers by user time when steal is high."""

    def __init__(self, procs: list[psutil.Process], core: int | None) -> None:
        self._procs, self._core = procs, core
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        user = system = 0.0
        for proc in self._procs:
            times = proc.cpu_times()
            user, system = user + times.user, system + times.system
        if self._core is None:
            return user, system, 0.0, 0.0
        core = psutil.cpu_times(percpu=True)[self._core]
        busy = sum(core) - core.idle - getattr(core, "iowait", 0.0)
        return user, system, getattr(core, "steal", 0.0), busy

    def since(self) -> CpuUse:
        now = self._read()
        user, system, steal, busy = (b - a for a, b in zip(self._start, now, strict=True))
        return CpuUse(user, system, steal, busy - user - system - steal)


@dataclass
class CpuUse:
    """Seconds: the tree's user and system time; the core's steal and other processes."""

    user: float
    system: float
    steal: float
    others: float

    @property
    def used(self) -> float:
        return self.user + self.system

    def per(self, count: int, unit: float) -> str:
        """Per request (unit 1e6: us) or stream (1e3: ms), total and the split."""
        n, fmt = max(1, count), ".0f" if unit >= 1e6 else ".2f"
        return (f"{self.used / n * unit:{fmt}} (user {self.user / n * unit:{fmt}},"
                f" system {self.system / n * unit:{fmt}})")  # fmt: skip


def describe(r: Result) -> str:
    rps = r.done / r.elapsed if r.elapsed else 0
    p50, p99 = r.pct(r.latencies, 50), r.pct(r.latencies, 99)
    line = f"{rps:9.1f} req/s  p50 {p50:8.2f} ms  p99 {p99:8.2f} ms"
    if r.ttfts:
        line += f"  TTFT p50 {r.pct(r.ttfts, 50):7.1f} ms p99 {r.pct(r.ttfts, 99):7.1f} ms"
    return line + f"  errors {r.errors} of {r.done + r.errors}"


def report(name: str, concurrency: int, stream: bool, direct: Result, through: Result,
           cpu: CpuUse, pinned: bool) -> None:  # fmt: skip
    kind = "stream of 64 chunks 5 ms apart" if stream else "non-stream"
    print(f"\n[{name}] c={concurrency} {kind}")
    print(f"  direct   {describe(direct)}")
    print(f"  gateway  {describe(through)}")
    ratio = (through.done / through.elapsed) / (direct.done / direct.elapsed)
    if stream:
        added = through.pct(through.ttfts, 50) - direct.pct(direct.ttfts, 50)
        extra = f"added TTFT p50 {added:+.1f} ms"
        unit = f"{cpu.per(through.done, 1e3)} ms per stream"
    else:
        added = through.pct(through.latencies, 50) - direct.pct(direct.latencies, 50)
        extra, unit = f"added p50 {added:+.3f} ms", f"{cpu.per(through.done, 1e6)} us per request"
    print(f"  ratio to direct {ratio:.2f}, {extra}; gateway CPU {unit}", flush=True)
    if pinned:  # a ratio is only meaningful when the gateway had its core
        elapsed = max(through.elapsed, 1e-9)
        print(f"  other processes used {cpu.others / elapsed:.0%} of the gateway's core meanwhile,"
              f" the hypervisor stole {cpu.steal / elapsed:.0%}", flush=True)  # fmt: skip


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--scenarios", default="ns1,ns64,s256,s1000")
    parser.add_argument(
        "--gateway-from", type=Path, default=REPO, metavar="CHECKOUT",
        help="run the gateway of another checkout of sem (an older commit, to compare; same"
        " load and engine), with this Python",
    )  # fmt: skip
    parser.add_argument(
        "--proxy", choices=["gateway", "floor"], default="gateway",
        help="floor: bench/proxy_floor.py in the gateway's place (a raw protocol in front of"
        " sem's engine client and nothing else: what any Python proxy costs at least)",
    )  # fmt: skip
    args = parser.parse_args()
    pin = (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {0})  # engine and load generator on CPU 0

    engine_port, gateway_port = free_port(), free_port()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", engine_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", engine_port, backlog=4096).start()

    engine = f"http://127.0.0.1:{engine_port}"
    argv = (
        ["-m", "gateway", "--port", str(gateway_port), "--route", f"fake={engine}"]
        if args.proxy == "gateway"
        else [str(REPO / "bench" / "proxy_floor.py"), str(gateway_port), engine]
    )
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=args.gateway_from,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_port, gateway_port)
        gw = psutil.Process(gateway.pid)
        if pin:
            gw.cpu_affinity([1])
            print(f"engine :{engine_port} and load on CPU 0, gateway :{gateway_port} on CPU 1")
        direct_url = f"http://127.0.0.1:{engine_port}/v1/chat/completions"
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        for name in args.scenarios.split(","):
            concurrency, stream, total = SCENARIOS[name]
            duration = max(args.duration, 30) if stream else args.duration
            await load(gateway_url, min(concurrency, 8), stream, 1.0, 50)  # warm up
            direct = await load(direct_url, concurrency, stream, duration, total)
            meter = CpuMeter([gw], 1 if pin else None)
            through = await load(gateway_url, concurrency, stream, duration, total)
            report(name, concurrency, stream, direct, through, meter.since(), pin)
    finally:
        gateway.terminate()
        await gateway.wait()
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
