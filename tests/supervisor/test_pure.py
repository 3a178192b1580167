"""Pure pieces: states, restart policy, units, engine command lines and environments."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from supervisor.engine import EngineCommand, LaunchPlan, engine_argv, engine_env
from supervisor.restart import Jitter, RestartPolicy
from supervisor.states import ReplicaState, aggregate, can_transition
from supervisor.units import GiB, parse_duration, parse_size


def test_transition_table_allows_the_documented_paths():
    path = ["pending", "starting", "ready", "draining", "stopped"]
    for old, new in itertools.pairwise(path):
        assert can_transition(ReplicaState(old), ReplicaState(new))
    assert can_transition(ReplicaState.READY, ReplicaState.RESTARTING)
    assert can_transition(ReplicaState.RESTARTING, ReplicaState.STARTING)
    assert can_transition(ReplicaState.RESTARTING, ReplicaState.FAILED)


def test_transition_table_refuses_shortcuts():
    assert not can_transition(ReplicaState.PENDING, ReplicaState.READY)
    assert not can_transition(ReplicaState.STOPPED, ReplicaState.STARTING)
    assert not can_transition(ReplicaState.FAILED, ReplicaState.READY)


def test_model_state_is_its_best_replica():
    assert aggregate([ReplicaState.FAILED, ReplicaState.READY]).value == "ready"
    assert aggregate([ReplicaState.PENDING, ReplicaState.STARTING]).value == "starting"
    assert aggregate([]).value == "stopped"


def test_backoff_doubles_then_caps():
    policy = RestartPolicy(backoff_base=1, backoff_cap=8, jitter=Jitter.NONE)
    rng = random.Random(0)
    assert [policy.next_delay(n, None, rng) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]


def delays(policy: RestartPolicy, seed: int, count: int = 6) -> list[float]:
    rng, out, previous = random.Random(seed), [], None
    for attempt in range(1, count + 1):
        previous = policy.next_delay(attempt, previous, rng)
        out.append(previous)
    return out


@pytest.mark.parametrize("jitter", [Jitter.FULL, Jitter.DECORRELATED])
def test_jittered_backoff_is_seeded_spread_and_capped(jitter: Jitter):
    policy = RestartPolicy(backoff_base=1, backoff_cap=8, jitter=jitter)
    assert delays(policy, seed=7) == delays(policy, seed=7), "deterministic under a seed"
    first_delays = {delays(policy, seed)[0] for seed in range(20)}
    assert len(first_delays) == 20, "replicas that crash together restart apart"
    every = [d for seed in range(20) for d in delays(policy, seed)]
    assert all(0 <= d <= 8 for d in every)
    if jitter is Jitter.DECORRELATED:
        assert min(every) >= 1, "never below the base"
        assert all(1 <= d <= 3 for d in first_delays)
    else:
        assert all(0 <= d <= 1 for d in first_delays)


def test_gives_up_after_max_failures_within_the_window_only():
    policy = RestartPolicy(max_failures=3, window=60)
    assert not policy.gives_up([0, 10], now=20)
    assert policy.gives_up([0, 10, 20], now=20)
    assert not policy.gives_up([0, 10, 100], now=100), "old failures age out"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GiB", 20 * GiB), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 1024**2), (7, 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_parse_duration():
    assert parse_duration("10s") == 10
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def plan(**kw) -> LaunchPlan:
    base = dict(
        replica_id="m-0", served_name="m", model="/models/m", port=1234,
        log_path=Path("/tmp/x.log"), max_num_seqs=8,
    )  # fmt: skip
    base.update(kw)
    return LaunchPlan(**base)  # type: ignore[arg-type]


def test_cpu_engine_argv_binds_loopback_and_runs_eager():
    argv = engine_argv(EngineCommand(python="/py"), plan(max_model_len=1024))
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--host 127.0.0.1 --port 1234" in joined
    assert "--served-model-name m" in joined
    assert "--max-model-len 1024" in joined
    assert "--enforce-eager" in argv
    assert "--gpu-memory-utilization" not in argv


def test_gpu_engine_argv_and_env_pin_the_devices():
    p = plan(gpu_ids=(1,), gpu_memory_utilization=0.5, tensor_parallel=1,
             engine_args={"dtype": "float16", "enable_prefix_caching": True})  # fmt: skip
    argv = engine_argv(EngineCommand(python="/py"), p)
    assert "--enforce-eager" not in argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.5000"
    assert argv[argv.index("--dtype") + 1] == "float16"
    assert "--enable-prefix-caching" in argv
    env = engine_env(EngineCommand(python="/py"), p, {"PATH": "/bin"}, instance="i")
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_cpu_engines_are_not_pinned_to_one_core_unless_the_model_says_so():
    env = engine_env(EngineCommand(python="/py"), plan(), {}, instance="i")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    own = plan(env={"VLLM_CPU_OMP_THREADS_BIND": "0-3"})
    assert (
        engine_env(EngineCommand(python="/py"), own, {}, "i")["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    )


def test_engine_env_is_clean():
    parent = {"PATH": "/bin", "VLLM_API_KEY": "secret", "HF_TOKEN": "t", "RANDOM": "x"}
    env = engine_env(EngineCommand(python="/py"), plan(cpu_kv_cache_gib=1.0), parent, "i")
    assert "VLLM_API_KEY" not in env, "the engine would demand auth from the gateway"
    assert "RANDOM" not in env
    assert env["HF_TOKEN"] == "t"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["SEM_INSTANCE"] == "i" and env["SEM_REPLICA_ID"] == "m-0"
