"""Repositories for the loopback hub (tests/hub_server.py), and the hub as a subprocess.

`synthetic_repo` writes a model repository of any size: a small Llama config and tokenizer
files, safetensors shards of pseudo-random bytes (seeded: the same bytes every time), and the
files sem must *not* fetch (`.bin`, `.pth`, `.gguf`, `original/`, README).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from supervisor.cache import CacheSettings, ModelCache
from supervisor.source import Source

REPO = Path(__file__).resolve().parent.parent
UNWANTED = ["pytorch_model.bin", "consolidated.pth", "model-q4.gguf",
            "original/consolidated.00.pth", "README.md"]  # fmt: skip


def _random_file(path: Path, size: int, seed: int, prefix: bytes = b"") -> None:
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.write(prefix)
        left = size - len(prefix)
        while left > 0:
            n = min(left, 8 << 20)
            f.write(rng.randbytes(n))
            left -= n


def synthetic_repo(folder: Path, shard_sizes: list[int], seed: int = 0) -> Path:
    """A model repo whose safetensors shards hold about `shard_sizes` bytes each."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 256, "vocab_size": 1024, "torch_dtype": "float16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    count = len(shard_sizes)
    weight_map = {}
    for n, size in enumerate(shard_sizes):
        name = f"model-{n + 1:05d}-of-{count:05d}.safetensors"
        tensor = f"blob.{n}"
        header = json.dumps({tensor: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
        prefix = struct.pack("<Q", len(header)) + header.encode()
        _random_file(folder / name, len(prefix) + size, seed + n, prefix)
        weight_map[tensor] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for n, name in enumerate(UNWANTED):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        _random_file(folder / name, 64 << 10, seed + 1000 + n)
    return folder


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest


@dataclass
class Hub:
    """`python -m tests.hub_server` in a subprocess; `url` is its HF_ENDPOINT."""

    root: Path
    gated: list[str] = field(default_factory=list)
    token: str = "hf_test_token"
    proc: subprocess.Popen[str] | None = None
    url: str = ""

    def start(self) -> Hub:
        argv = [sys.executable, "-m", "tests.hub_server", "--root", str(self.root),
                "--token", self.token]  # fmt: skip
        for repo in self.gated:
            argv += ["--gated", repo]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"hub server did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    def admin(self, method: str, path: str, **params: Any) -> Any:
        response = httpx.request(method, f"{self.url}/_admin/{path}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def throttle(self, bps: int) -> None:
        self.admin("POST", "throttle", bps=bps)

    def requests(self) -> list[dict[str, Any]]:
        return self.admin("GET", "requests")  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


# The repositories the cache tests use (sizes kept small: 2 cores, a fast suite).
TWO_A = "synth/two-a"  # 6 MiB + 3 MiB of safetensors
TWO_B = "synth/two-b"  # 4 MiB
BIG = "synth/big"  # 48 MiB + 32 MiB: slow enough, throttled, to kill half-way
TINY = "demo/tiny"  # a fake-engine checkpoint (config + safetensors headers)
GATED = "gated/model"


def build_test_hub(root: Path) -> Path:
    from tests.checkpoints import tiny_llama

    synthetic_repo(root / TWO_A, [6 << 20, 3 << 20], seed=1)
    synthetic_repo(root / TWO_B, [4 << 20], seed=2)
    synthetic_repo(root / BIG, [48 << 20, 32 << 20], seed=3)
    tiny_llama(root / TINY)
    tiny_llama(root / GATED)
    return root


async def cached_here(hub: Hub, folder: Path) -> Path:
    """TINY in a cache folder, as the supervisor's sizing leaves it; its snapshot folder."""
    cache = ModelCache(CacheSettings(cache_dir=folder, endpoint=hub.url))
    try:
        located = await cache.prepare(Source.parse(f"hf://{TINY}"))
        return located if isinstance(located, Path) else await located.wait()
    finally:
        await cache.aclose()
