"""sem's download throughput against huggingface_hub's own CLI, from the same loopback hub.

A synthetic model repository (`--size-gb` of safetensors in `--shards` shards, plus configs and
files neither side fetches) is served by tests/hub_server.py. Each round downloads it twice into
empty cache folders, in alternating order:

- `hf download REPO --include '*.safetensors' '*.json' --cache-dir D1` (huggingface_hub's CLI,
  8 workers, its default), and
- `sem cache hf://REPO` against a running supervisor (`--cache-dir D2`): the CLI posts the job
  and follows its progress until done.

Both are timed as a user sees them, from the command's start to its exit (interpreter start-up
included), with the written data synced to disk between runs. Throughput = bytes fetched /
seconds; the ratio is the median over rounds of sem / hf within a round (two runs back to back
see the same load on a shared machine; target: at least 0.95), also given over the medians and
over the best runs. The supervisor's own job time (checks to manifest written) is printed too.

    .venv/bin/python bench/cache_download.py [--size-gb 1.5] [--shards 4] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from supervisor.engine import free_port  # noqa: E402
from tests.hubrepos import Hub, synthetic_repo  # noqa: E402

BIN = Path(sys.executable).parent
REPO_ID = "bench/model"


def start_supervisor(work: Path, hub: Hub, cache_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = work / "models.yaml"
    config.write_text("devices: cpu\ncache: {margin: 0}\nmodels: []\n")
    port = free_port()
    argv = [sys.executable, "-m", "supervisor", "--config", str(config), "--port", str(port),
            "--state-dir", str(work / "state"), "--cache-dir", str(cache_dir)]  # fmt: skip
    env = dict(os.environ, HF_ENDPOINT=hub.url, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(f"{url}/health", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the supervisor did not start")


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def fetched_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.glob("models--*/blobs/*"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.5)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workdir", type=Path, help="default: a temporary folder, removed after")
    args = p.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="sem-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gb * 2**30)
    began = time.perf_counter()
    synthetic_repo(work / "hub" / REPO_ID, [size // args.shards] * args.shards, seed=7)
    print(f"repository: {args.size_gb:g} GiB in {args.shards} shards, written in"
          f" {time.perf_counter() - began:.1f} s")  # fmt: skip
    hub = Hub(work / "hub").start()
    sem_cache, hf_cache = work / "sem-cache", work / "hf-cache"
    supervisor, admin = start_supervisor(work, hub, sem_cache)
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_PROGRESS_BARS="1")
    try:
        httpx.get(f"{hub.url}/api/models/{REPO_ID}", timeout=300)  # hub hashes its files once
        hf_argv = [str(BIN / "hf"), "download", REPO_ID, "--include", "*.safetensors",
                   "--include", "*.json", "--cache-dir", str(hf_cache)]  # fmt: skip
        sem_argv = [str(BIN / "sem"), "--admin", admin, "cache", f"hf://{REPO_ID}"]
        results: dict[str, list[float]] = {"hf": [], "sem": []}
        job_seconds = []
        for n in range(args.rounds):
            order = ["hf", "sem"] if n % 2 == 0 else ["sem", "hf"]
            for who in order:
                folder = hf_cache if who == "hf" else sem_cache
                shutil.rmtree(folder, ignore_errors=True)
                seconds = timed(hf_argv if who == "hf" else sem_argv, env)
                got = fetched_bytes(folder)
                results[who].append(got / seconds)
                if who == "sem":
                    job = httpx.get(f"{admin}/cache", timeout=10).json()["jobs"][-1]
                    job_seconds.append(job["finished"] - job["started"])
                print(f"round {n + 1}: {who:3} {got / 2**30:.2f} GiB in {seconds:6.2f} s"
                      f" = {got / seconds / 2**20:7.1f} MiB/s", flush=True)  # fmt: skip
                os.sync()  # no dirty pages of this run slow down the next one
        hf_rate, sem_rate = (statistics.median(results[k]) for k in ("hf", "sem"))
        print(f"\nhuggingface_hub CLI (hf download): {hf_rate / 2**20:7.1f} MiB/s (median)")
        print(f"sem cache:                         {sem_rate / 2**20:7.1f} MiB/s (median;"
              f" supervisor job {statistics.median(job_seconds):.2f} s)")  # fmt: skip
        paired = statistics.median(
            s / h for s, h in zip(results["sem"], results["hf"], strict=True)
        )
        print(f"ratio sem / hf: {paired:.3f} (median of the rounds' ratios, each of two runs"
              f" back to back; target >= 0.95)")  # fmt: skip
        print(f"  of the medians: {sem_rate / hf_rate:.3f}; of the best runs:"
              f" {max(results['sem']) / max(results['hf']):.3f}")  # fmt: skip
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
        hub.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
