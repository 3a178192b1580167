"""Throughput of real vLLM engines, direct and through sem: a concurrency sweep (the "TPS table").

Starts `sem run` over models.yaml (real vLLM from .venv-engine, or `--engine-module
tests.fake_engine`), waits until every model serves, reads the benchmarked model's engine URL
and the key it demands from the admin API (GET /routes), then, per concurrency level, runs the
same closed-loop streamed workload (fixed prompt, `max_tokens` N, `ignore_eos`, temperature 0)
direct to the engine and through sem's gateway, interleaved (direct, sem, direct, sem ...
`--reps`) so machine noise hits both. Measured at the client: output tokens/s (token events that
arrived while the concurrency was held, i.e. before the run's deadline), requests/s (answers over
the whole run, the drain included), time to first token and inter-token latency (gaps between
streamed events' arrival) p50/p99, errors (any answer short of N tokens counts), and the ratio
sem/direct. Also the machine's state: cores, load average, and how much CPU other
processes (not this script, sem or its engines) took during each run.

    .venv/bin/python bench/throughput.py [--levels 1,4,16,64] [--duration 20] [--reps 2]
        [--max-tokens 64] [--model tiny-llama-base] [--json out.json]

On a small CPU machine the tiny random-weight models' absolute figures are small and noisy: the
ratio is the point. Ctrl-C stops sem and its engines; nothing outlives the script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: sem's packages from this checkout
    sys.path.insert(0, str(REPO))

from bench.machine_load import CpuMeter, busiest, machine_state  # noqa: E402
from bench.throughput_figures import (  # noqa: E402
    Run,
    Stream,
    figures,
    markdown_table,
    ratio_text,
    ratios,
)
from contract.routes import RouteTable  # noqa: E402
from supervisor.engine import free_port  # noqa: E402
from supervisor.procgroup import INSTANCE_ENV, kill_marked  # noqa: E402

ENGINE_PYTHON = os.environ.get("SEM_ENGINE_PYTHON", str(REPO / ".venv-engine" / "bin" / "python"))
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,"
PATHS = ("direct", "sem")


# -- the load (client side, aiohttp) -------------------------------------------------------------


def request_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip


@dataclass(frozen=True)
class Target:
    """Where a path's requests go, and the bearer token it demands (an engine demands the key
    sem gave it; the gateway, none unless API keys are configured)."""

    url: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def stream_once(
    session: aiohttp.ClientSession, target: Target, body: dict[str, Any]
) -> Stream:
    stream = Stream(started=time.perf_counter())
    try:
        async with session.post(target.url, json=body, headers=target.headers) as response:
            if response.status != 200:
                text = (await response.text())[:80]
                stream.error = f"HTTP {response.status}: {text}"
                return stream
            async for data in response.content.iter_any():
                stream.feed(data, time.perf_counter())
    except (aiohttp.ClientError, TimeoutError) as exc:
        stream.error = type(exc).__name__
    return stream


async def closed_loop(
    path: str,
    target: Target,
    body: dict[str, Any],
    concurrency: int,
    duration: float,
    meter: CpuMeter,
) -> Run:
    """`concurrency` workers, each sending its next request as soon as one ends, until
    `duration` has passed; requests then in flight finish (the run's drain)."""
    streams: list[Stream] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:
        before, started = meter.reading(), time.perf_counter()
        deadline = started + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                streams.append(await stream_once(session, target, body))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        ended = time.perf_counter()
        others = CpuMeter.others(before, meter.reading())
    return Run(path, concurrency, started, deadline, ended, streams, body["max_tokens"], others)


# -- sem -----------------------------------------------------------------------------------------


@dataclass
class SemRun:
    """`sem run` in its own session, marked with its own instance id so nothing of it survives."""

    config: Path
    state_dir: Path
    engine_python: str
    engine_module: str | None
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    gateway: str = field(default_factory=lambda: f"http://127.0.0.1:{free_port()}")
    supervisor: str = field(default_factory=lambda: f"http://127.0.0.1:{free_port()}")
    proc: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> Path:
        return self.state_dir / "sem-run.log"

    async def start(self) -> None:
        argv = [
            sys.executable, "-m", "sem", "run", "--config", str(self.config),
            "--state-dir", str(self.state_dir), "--engine-python", self.engine_python,
            "--gateway-port", self.gateway.rsplit(":", 1)[1],
            "--supervisor-port", self.supervisor.rsplit(":", 1)[1],
        ]  # fmt: skip
        if self.engine_module:
            argv += ["--engine-module", self.engine_module]
        env = dict(os.environ, **{INSTANCE_ENV: self.instance})
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
            )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> list[str]:
        """Until every model of the config serves (one still starting would take the CPU from
        the measured engine); prints progress every 5 s. The models' names."""
        started = last = time.monotonic()
        while True:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"sem run exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                async with session.get(f"{self.supervisor}/models") as response:
                    models = (await response.json())["models"]
                states = {m["name"]: m["state"] for m in models}
                if states and all(s == "ready" for s in states.values()):
                    async with session.get(f"{self.gateway}/health") as response:
                        if set(states) <= set((await response.json())["ready_models"]):
                            return sorted(states)
                if time.monotonic() - last >= 5:
                    last = time.monotonic()
                    shown = ", ".join(f"{n} {s}" for n, s in sorted(states.items()))
                    print(f"  waiting for models ({last - started:.0f} s): {shown}", flush=True)
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"models not ready after {timeout:g} s:\n{self.tail()}")
            await asyncio.sleep(0.5)

    async def engine(self, session: aiohttp.ClientSession, model: str) -> Target:
        """The model's first ready replica and the key its engine demands, from the route
        table (the admin API; this sem run sets no admin token, so loopback may read it)."""
        async with session.get(f"{self.supervisor}/routes") as response:
            if response.status != 200:
                raise RuntimeError(f"GET /routes: {response.status}")
            table = RouteTable.from_json(await response.json())
        route = table.models.get(model)
        ready = route.ready_replicas if route else ()
        if not ready or ready[0].url is None:
            raise RuntimeError(f"{model} has no ready replica: {route}")
        return Target(f"{ready[0].url}/v1/completions", ready[0].api_key)

    def processes(self) -> list[psutil.Process]:
        """sem run and its process tree (supervisor, gateway, engines and their workers)."""
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    async def stop(self, timeout: float = 40) -> None:
        """SIGTERM (sem drains and stops every engine), SIGKILL past `timeout`, then anything
        still marked with this run's instance id."""
        if self.proc is not None and self.proc.returncode is None:
            started = time.monotonic()
            print("stopping sem (it stops its engines) ...", flush=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            print(f"sem stopped in {time.monotonic() - started:.1f} s", flush=True)
        if left := await asyncio.to_thread(kill_marked, INSTANCE_ENV, self.instance):
            print(f"killed {left} leftover process(es) of this run", flush=True)


# -- orchestration -------------------------------------------------------------------------------


async def sweep(
    args: argparse.Namespace, direct: Target, gateway: str, meter: CpuMeter
) -> list[Run]:
    """Every level, `reps` times direct then sem, after one warm-up request each way."""
    body = request_body(args.model, args.max_tokens)
    urls = {"direct": direct, "sem": Target(f"{gateway}/v1/completions")}
    for path in PATHS:  # the first requests of an engine are slower; and fail fast if broken
        warm = await closed_loop(path, urls[path], body, 1, 0.01, meter)
        if problems := warm.errors():
            raise RuntimeError(f"warm-up {path} ({urls[path].url}): {dict(problems)}")
    runs: list[Run] = []
    for concurrency in args.levels:
        for rep in range(1, args.reps + 1):
            done = {}
            for path in PATHS:
                print(f"  c={concurrency} rep {rep}/{args.reps} {path}: {args.duration:g} s",
                      flush=True)  # fmt: skip
                run = await closed_loop(path, urls[path], body, concurrency, args.duration, meter)
                runs.append(run)
                done[path] = figures([run])
                print(f"    {done[path].tokens_per_s:.1f} tok/s, {len(run.streams)} requests,"
                      f" {run.errors().total()} errors", flush=True)  # fmt: skip
            ratio = ratios(done["sem"], done["direct"])["tokens_per_s"]
            print(f"  c={concurrency} rep {rep}: tok/s sem/direct {ratio_text(ratio)}", flush=True)
    return runs


def report(args: argparse.Namespace, runs: list[Run], state: dict[str, Any]) -> dict[str, Any]:
    levels = [
        (c, figures([r for r in runs if (r.concurrency, r.path) == (c, "direct")]),
         figures([r for r in runs if (r.concurrency, r.path) == (c, "sem")]))
        for c in args.levels
    ]  # fmt: skip
    errors = sum((r.errors() for r in runs), Counter[str]())
    print(f"\n{markdown_table(levels)}\n")
    print(f"errors: {dict(errors.most_common(5)) or 'none'}")
    return {
        "state": state,
        "errors": dict(errors),
        "levels": [
            {"concurrency": c, "direct": asdict(d), "sem": asdict(s), "ratio": ratios(s, d)}
            for c, d, s in levels
        ],
    }


def machine_lines(state: dict[str, Any]) -> list[str]:
    def load(stage: str) -> str:
        return "/".join(f"{x:.1f}" for x in state[stage]["load_average"])

    others = ", ".join(f"{name} {cores:.2f}" for name, cores in state["busiest_others"])
    return [
        f"machine: {state['before']['cores']} cores, {state['ready']['memory_available_gib']} GiB"
        f" available with sem up; load average (1/5/15 min) {load('before')} at start,"
        f" {load('ready')} when ready, {load('after')} at the end",
        f"other processes' CPU during the sweep (cores): {others or 'none'}",
    ]


async def bench(args: argparse.Namespace, sem: SemRun) -> int:
    state: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                             "before": machine_state()}  # fmt: skip
    kind = f"module {args.engine_module}" if args.engine_module else "real vLLM"
    print(f"starting sem run over {args.config} (engines: {kind}; {INSTANCE_ENV}={sem.instance})"
          " ...", flush=True)  # fmt: skip
    await sem.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        models = await sem.wait_ready(session, args.ready_timeout)
        if args.model not in models:
            raise RuntimeError(f"--model {args.model} is not in {args.config}: {models}")
        direct = await sem.engine(session, args.model)
    print(f"ready: {', '.join(models)}; {args.model} direct at {direct.url}, sem at {sem.gateway}")
    state["ready"] = machine_state()
    meter = CpuMeter([psutil.Process(), *sem.processes()])
    before, started = await asyncio.to_thread(meter.others_by_process), time.monotonic()
    runs = await sweep(args, direct, sem.gateway, meter)
    after, elapsed = await asyncio.to_thread(meter.others_by_process), time.monotonic() - started
    state["after"], state["busiest_others"] = machine_state(), busiest(before, after, elapsed)
    result = report(args, runs, state)
    print("\n".join(machine_lines(state)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if result["errors"] else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 16, 64],
        help="concurrency levels, e.g. 1,4,16,64",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--reps", type=int, default=2, help="direct+sem pairs per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="tiny-llama-base")
    parser.add_argument("--config", type=Path, default=REPO / "models.yaml")
    parser.add_argument("--engine-python", help="default: .venv-engine (with a module: this one)")
    parser.add_argument("--engine-module", help="a stand-in engine, e.g. tests.fake_engine")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.engine_python is None:
        args.engine_python = sys.executable if args.engine_module else ENGINE_PYTHON
    return args  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sem-bench-") as folder:
        sem = SemRun(args.config.resolve(), Path(folder) / "state", args.engine_python,
                     args.engine_module)  # fmt: skip

        async def guarded() -> int:
            try:
                return await bench(args, sem)
            finally:
                await sem.stop()

        try:
            return asyncio.run(guarded())
        except KeyboardInterrupt:
            print("\ninterrupted", flush=True)
            return 130
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:  # a second Ctrl-C can cut the graceful stop short: never leave engines behind
            kill_marked(INSTANCE_ENV, sem.instance)


if __name__ == "__main__":
    sys.exit(main())
