"""What a model spec's engine_args and env may not touch: what sem itself owns.

sem builds each engine's command line and environment (engine.py) and relies on what it set:
the address the gateway and probe use, the memory it reserved, the GPUs it placed the engine on,
the slots the gateway counts, the marker that finds the engine after a supervisor restart.

engine_args keys become `--flag value` on vLLM's command line, parsed by Python's argparse with
abbreviations allowed (vllm/utils/argparse_utils.py FlexibleArgumentParser: `allow_abbrev` is
true, `_` reads as `-`, `--flag=value` splits at `=`, `--flag.key` builds a JSON value). So a
key is refused when, read that way, it names a fenced flag: exactly, as a prefix (`hos` is
`--host`), as `host=127.0.0.2`, or as `host.x`. No other vLLM 0.32 flag is a prefix of a fenced
one (checked against its parser's 430 option strings), so the prefix rule refuses nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

EngineArg = str | int | float | bool

# flag (vLLM's spelling, without --) -> why sem owns it
FENCED_FLAGS: dict[str, str] = {
    "model": "sem passes the model's local files; use the spec's source",
    "served-model-name": "sem serves the model under the spec's name",
    "host": "sem binds engines to 127.0.0.1 (on a cluster, their node's address) and tells the"
    " gateway where they are",
    "port": "sem picks each engine's port and tells the gateway",
    "uds": "sem reaches engines over TCP on 127.0.0.1",
    "api-key": "sem gives cluster engines their key (docs/cluster.md); on one box none is used",
    "ssl-keyfile": "the gateway and the health probe talk plain HTTP on loopback",
    "ssl-certfile": "the gateway and the health probe talk plain HTTP on loopback",
    "headless": "sem needs the engine's API server",
    "config": "a config file could set any fenced flag",
    "max-num-seqs": "the gateway's slots follow it; use the spec's max_num_seqs",
    "max-num-active-seqs": "the gateway's slots follow max_num_seqs; use the spec's field",
    "max-model-len": "the memory estimate follows it; use the spec's max_model_len",
    "tensor-parallel-size": "sem places that many GPUs; use the spec's tensor_parallel",
    "pipeline-parallel-size": "sem places tensor_parallel GPUs, no more",
    "prefill-context-parallel-size": "it multiplies the GPUs an engine takes; sem places them",
    "data-parallel-size": "sem runs replicas as separate engines; use the spec's replicas",
    "data-parallel-size-local": "sem runs replicas as separate engines; use the spec's replicas",
    "gpu-memory-utilization": "sem sets it from the memory it reserved on each GPU",
    "kv-cache-memory-bytes": "it bypasses the memory budget sem reserved; use kv_cache_tokens",
    "num-gpu-blocks-override": "it bypasses the memory budget sem reserved; use kv_cache_tokens",
}

# env key -> why sem owns it
FENCED_ENV: dict[str, str] = {
    "SEM_REPLICA_ID": "sem marks its engines with it to find them after a restart",
    "SEM_INSTANCE": "sem marks its engines with it to find them after a restart",
    "CUDA_VISIBLE_DEVICES": "sem pins each engine to the GPUs it placed it on",
    "CUDA_DEVICE_ORDER": "sem sets PCI_BUS_ID so CUDA's indexes are NVML's",
    "NVIDIA_VISIBLE_DEVICES": "sem pins each engine to the GPUs it placed it on",
    "VLLM_CPU_KVCACHE_SPACE": "sem sizes the CPU KV cache from the memory it reserved",
    "VLLM_API_KEY": "sem gives cluster engines their key (docs/cluster.md); on one box none",
    "HF_HUB_OFFLINE": "engines start from the files sem cached, never the network",
    "HF_HOME": "engines read the cache sem manages",
    "HF_HUB_CACHE": "engines read the cache sem manages",
    "PYTHONUNBUFFERED": "sem reads the engine's log as it is written",
    "VLLM_NO_USAGE_STATS": "sem turns usage reporting off",
    "VLLM_DO_NOT_TRACK": "sem turns usage reporting off",
    "PATH": "sem passes its own; a per-model PATH could run other programs",
    # Code injection: each loads code the engine did not ship with, into a process that holds
    # the GPUs and the model, from a spec that the admin API also accepts.
    "LD_PRELOAD": "it loads arbitrary code into the engine",
    "LD_AUDIT": "it loads arbitrary code into the engine",
    "LD_LIBRARY_PATH": "sem passes its own (the CUDA libraries); another could swap them",
    "PYTHONPATH": "it loads arbitrary Python code into the engine",
    "PYTHONHOME": "it swaps the engine's Python installation",
}

_FLAG_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def fenced_flag(key: str) -> str | None:
    """The fenced vLLM flag that argparse would read `--key` as, or None."""
    name = key.split("=", 1)[0].split(".", 1)[0].lower().replace("_", "-").lstrip("-")
    if not name:
        return None
    if name in FENCED_FLAGS:
        return name
    matches = sorted(flag for flag in FENCED_FLAGS if flag.startswith(name))
    return matches[0] if matches else None


def check_engine_args(args: Mapping[str, EngineArg]) -> None:
    """ValueError naming the first key sem owns or cannot pass on as one flag."""
    for key, value in args.items():
        if flag := fenced_flag(key):
            raise ValueError(f"engine_args.{key} is set by sem (--{flag}): {FENCED_FLAGS[flag]}")
        if not _FLAG_KEY.match(key):
            raise ValueError(
                f"engine_args.{key}: a key is a vLLM flag name such as enable_prefix_caching"
                " (write {flag: value}, without dashes or '=')"
            )
        if isinstance(value, str) and value.startswith("-"):
            raise ValueError(f"engine_args.{key}: a value may not start with '-'")


def check_env(env: Mapping[str, str]) -> None:
    """ValueError naming the first key sem owns or that is not an environment variable name."""
    for key, value in env.items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"env.{key}: not a variable name (letters, digits, _)")
        if key in FENCED_ENV:
            raise ValueError(f"env.{key} is set by sem: {FENCED_ENV[key]}")
        if "\x00" in value:
            raise ValueError(f"env.{key}: a value may not contain a NUL byte")
