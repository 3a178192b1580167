"""One local Ray cluster (a head and a worker, each with two declared 24 GiB GPUs) per module,
and a supervisor-side connection to it; at the end every node process and engine is gone."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from supervisor.cluster.backend import RayCluster
from tests.cluster.local_ray import LocalRay


@pytest.fixture(scope="module")
def local_ray() -> Iterator[LocalRay]:
    # Short: Ray's unix sockets live under the temp dir (a socket path has ~107 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="semray-", dir="/tmp"))
    cluster = LocalRay(root)
    try:
        cluster.start(["head", "a"])
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"processes left behind by the Ray cluster: {left}"


@pytest.fixture(scope="module")
def ray_cluster(local_ray: LocalRay) -> Iterator[RayCluster]:
    cluster = RayCluster(local_ray.address, poll_interval=0.5)
    cluster.connect()
    yield cluster
    import ray

    ray.shutdown()
