"""The reference scenarios on the GPUs this box has: does sem's GPU accounting hold here?

    PYTHONPATH=. python scripts/gpu_check.py [--workdir DIR] [--timeout S]   (or `make gpu-check`)

Runs sem's supervisor in-process over the GPUs NVML finds and checks, in order:
1. two models, one per GPU (both on one GPU when there is one);
2. a third that does not fit waits, with a reason;
3. removing the first frees its memory: the third is placed there (time to re-place measured);
4. two engines killed together both come back;
5. tight packing: a GPU left with exactly a reservation free (another process holds the rest)
   makes the model wait instead of failing vLLM's start check; it starts once that is freed.
Engines are real vLLM where `.venv-engine` has it (the demo model in models/), else the
stand-in engine of tests/gpusim with SIM_LEDGER=torch: vLLM's start-up protocol on real GPU
memory through torch (a box with torch and nvidia-ml-py is enough; docs/gpu-accounting.md).
Prints a figures table (reservation vs NVML per engine, placement decisions, re-place time) and
exits 1 when a check failed.

NVML, the engines and "another process" are seams (`Seams`): tests run the same checks on the
simulated box (tests/test_gpu_check.py), a real box uses `real_seams`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.config import ModelSpec  # noqa: E402
from supervisor.engine import EngineCommand  # noqa: E402
from supervisor.events import EventKind, EventLog  # noqa: E402
from supervisor.gpu_usage import ProcessMemory, attribute  # noqa: E402
from supervisor.launch import EngineSettings  # noqa: E402
from supervisor.manager import Manager, ModelEntry  # noqa: E402
from supervisor.probe import EngineProbe  # noqa: E402
from supervisor.replica import ReplicaTiming  # noqa: E402
from supervisor.resources import Device, NvmlApi, detect  # noqa: E402
from supervisor.restart import RestartPolicy  # noqa: E402
from supervisor.scheduler import SchedulerSettings  # noqa: E402
from supervisor.states import ReplicaState  # noqa: E402

GiB = 1024**3
Release = Callable[[], Awaitable[None]]
# Another process takes all but `leave_free` bytes of GPU `index`; awaiting the result frees it.
Hold = Callable[[int, int], Awaitable[Release]]


@dataclass
class Seams:
    nvml: Callable[[], NvmlApi]
    process_memory: ProcessMemory
    command: EngineCommand
    source: Path  # the model folder every engine loads
    hold: Hold
    engine: str  # what runs: "vLLM" or "stand-in (torch)" or "stand-in (simulated)"


@dataclass
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    engines: list[tuple[str, str, int, int]] = field(default_factory=list)  # id, gpu, res, nvml
    decisions: list[str] = field(default_factory=list)
    replace_seconds: float | None = None

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append((name, ok, detail))
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def render(self, engine: str, devices: list[Device]) -> str:
        gpus = ", ".join(f"{d.label} {d.name} {d.total / GiB:.1f} GiB" for d in devices)
        lines = [f"box: {gpus}", f"engines: {engine}", "",
                 f"{'ENGINE':14} {'GPU':5} {'RESERVED':>9} {'NVML':>9} {'OUTSIDE':>8}"]  # fmt: skip
        for rid, gpu, reserved, used in self.engines:
            lines.append(f"{rid:14} {gpu:5} {reserved / GiB:8.2f}G {used / GiB:8.2f}G"
                         f" {(used - reserved) / GiB:7.2f}G")  # fmt: skip
        lines += ["", "placement decisions:", *(f"  {d}" for d in self.decisions)]
        if self.replace_seconds is not None:
            lines.append(f"re-placed {self.replace_seconds:.2f}s after a removal released memory")
        lines += ["", "checks:"]
        lines += [f"  {'PASS' if ok else 'FAIL'} {name}: {detail}" for name, ok, detail in
                  self.checks]  # fmt: skip
        return "\n".join(lines)


class Scenario:
    """One supervisor over the seams, and the waits the checks need."""

    def __init__(self, seams: Seams, workdir: Path, timeout: float) -> None:
        self.seams, self.timeout, self.report = seams, timeout, Report()
        self.probe = EngineProbe(timeout=2)
        settings = EngineSettings(
            command=seams.command, state_dir=workdir / "state", instance=uuid.uuid4().hex,
            parent_env=dict(os.environ),
        )  # fmt: skip
        self.manager = Manager(
            settings=settings, inventory=detect("gpu", "auto", environ={}, nvml=seams.nvml),
            probe=self.probe, events=EventLog(),
            policy=RestartPolicy(backoff_base=0.5, backoff_cap=2, max_failures=5, window=120),
            timing=ReplicaTiming(start_timeout=timeout, health_interval=0.5, stop_grace=10),
            scheduling=SchedulerSettings(recheck_interval=1.0), gpu_memory=seams.process_memory,
        )  # fmt: skip

    async def add(self, name: str, need: int) -> ModelEntry:
        spec = ModelSpec(name=name, source=f"path:{self.seams.source}", memory=str(need),
                         max_model_len=512, max_num_seqs=4)  # fmt: skip
        return await self.manager.add(spec)

    async def until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout or self.timeout)
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def gone(self, *names: str) -> bool:
        for name in names:
            self.manager.remove(name, drain_timeout=0)
        return await self.until(
            lambda: not {e.spec.name for e in self.manager.entries()} & set(names)
        )

    def record_engine(self, entry: ModelEntry) -> None:
        replica = entry.replicas[0]
        if replica.placement is None or replica.process is None:
            return
        usage = attribute(self.seams.process_memory.usage(), {replica.process.pgid: replica.id})
        for device in replica.placement.device_ids:
            used = usage.by_replica.get((device, replica.id), 0)
            self.report.engines.append(
                (replica.id, f"GPU{device}", replica.placement.per_device, used)
            )

    def decisions(self) -> None:
        placed = self.manager.events.recent(kind=EventKind.PLACED)
        self.report.decisions = [f"{e.subject}: {e.message}" for e in placed]


def ready(entry: ModelEntry) -> bool:
    return entry.replicas[0].state is ReplicaState.READY


def device_of(entry: ModelEntry) -> tuple[str, ...]:
    placement = entry.replicas[0].placement
    return placement.device_ids if placement else ()


async def two_per_box(s: Scenario, need: int, gpus: int) -> tuple[ModelEntry, ...] | None:
    """Checks 1-3; the two models running at the end (b and c), or None if a check failed."""
    a, b = await s.add("a", need), await s.add("b", need)
    ok = await s.until(lambda: ready(a) and ready(b))
    s.record_engine(a)
    s.record_engine(b)
    where = "one per GPU" if gpus > 1 else "both on GPU0"
    spread = (device_of(a) != device_of(b)) if gpus > 1 else (device_of(a) == device_of(b))
    if not s.report.check("two models", ok and spread, f"{where}: a on {device_of(a)}, b on"
                          f" {device_of(b)}, states {a.state.value}/{b.state.value}"):  # fmt: skip
        return None
    c = await s.add("c", need)
    waits = await s.until(lambda: c.replicas[0].reason.startswith("needs"), 30)
    if not s.report.check("third waits", waits, c.replicas[0].reason):
        return None
    removed = time.monotonic()
    s.manager.remove("a", drain_timeout=0)
    placed = await s.until(lambda: c.replicas[0].placement is not None)
    s.report.replace_seconds = time.monotonic() - removed if placed else None
    ok = placed and await s.until(lambda: ready(c))
    s.record_engine(c)
    return (b, c) if s.report.check(
        "removal frees", ok and device_of(c) == device_of(a),
        f"c on {device_of(c)} (a was on {device_of(a)}), {c.state.value}",
    ) else None  # fmt: skip


async def killed_together(s: Scenario, entries: tuple[ModelEntry, ...]) -> None:
    pgids = [e.replicas[0].process.pgid for e in entries if e.replicas[0].process]
    for pgid in pgids:
        os.killpg(pgid, signal.SIGKILL)
    back = await s.until(lambda: all(e.replicas[0].restarts >= 1 and ready(e) for e in entries))
    states = ", ".join(f"{e.spec.name} {e.state.value} ({e.reason})" for e in entries)
    s.report.check("two engines killed together", back and len(pgids) == 2, states)


async def tight_packing(s: Scenario, need: int, gpus: list[Device]) -> None:
    # On every GPU a gap equal to the reservation: vLLM's start check would refuse it there.
    api = s.seams.nvml()
    await s.until(lambda: all(not api.processes(int(d.id)) for d in gpus))  # engines' memory back
    releases = [await s.seams.hold(int(d.id), need) for d in gpus]
    try:
        d = await s.add("d", need)
        waited = await s.until(lambda: d.replicas[0].reason.startswith("needs"), 30)
        moves = s.manager.events.recent("d-0", kind=EventKind.TRANSITION)
        failed = any(e.data.get("new") == "starting" for e in moves)
        s.report.check("tight packing waits", waited and not failed, d.replicas[0].reason)
    finally:
        for release in releases:
            await release()
    ok = await s.until(lambda: ready(d))
    s.report.check("tight packing starts once freed", ok, f"{d.state.value}: {d.reason}")


async def run_checks(seams: Seams, workdir: Path, timeout: float) -> tuple[Report, list[Device]]:
    s = Scenario(seams, workdir, timeout)
    devices = [d for d in s.manager.devices if d.kind == "gpu"]
    s.manager.start()
    try:
        smallest = min(d.total for d in devices)
        need = int(smallest * (0.55 if len(devices) > 1 else 0.4))
        running = await two_per_box(s, need, len(devices))
        if running is not None:
            await killed_together(s, running)
        if await s.gone(*(e.spec.name for e in s.manager.entries())):
            await tight_packing(s, need, devices)
        s.decisions()
    finally:
        await s.manager.shutdown(drain_timeout=1)
        await s.probe.aclose()
    return s.report, devices


# -- a real box ----------------------------------------------------------------------------------

HOLDER = """
import os, sys, torch
torch.zeros(1, device="cuda")
free, _ = torch.cuda.mem_get_info()
held = torch.empty(max(0, free - int(sys.argv[1])), dtype=torch.uint8, device="cuda")
print("held", flush=True)
sys.stdin.read()
"""


async def torch_hold(index: int, leave_free: int) -> Release:
    """Another process on GPU `index` that leaves `leave_free` bytes free (its context too)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(index)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(leave_free), env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await proc.stdout.readline()

    async def release() -> None:
        proc.kill()
        await proc.wait()

    return release


def has_vllm(python: Path) -> bool:
    done = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, check=False)
    return python.exists() and done.returncode == 0


def real_seams(workdir: Path) -> Seams:
    from supervisor.gpu_usage import NvmlProcessMemory
    from supervisor.resources import PynvmlApi

    engine_python = REPO / ".venv-engine" / "bin" / "python"
    demo = REPO / "models" / "tiny-llama-base"
    if has_vllm(engine_python) and (demo / "config.json").is_file():
        command, source, engine = EngineCommand(python=str(engine_python)), demo, "vLLM"
    else:
        from tests.checkpoints import llama2_7b

        env = {"SIM_LEDGER": "torch", "PYTHONPATH": str(REPO), "SIM_WEIGHTS_FACTOR": "0.1"}
        command = EngineCommand(python=sys.executable, module="tests.gpusim.engine",
                                extra_env=env)  # fmt: skip
        source, engine = llama2_7b(workdir / "llama2-7b"), "stand-in (torch)"
    return Seams(PynvmlApi, NvmlProcessMemory(), command, source, torch_hold, engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=600, help="seconds an engine may take")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sem-gpu-check-"))
    seams = real_seams(workdir)
    report, devices = asyncio.run(run_checks(seams, workdir, args.timeout))
    print(report.render(seams.engine, devices))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
