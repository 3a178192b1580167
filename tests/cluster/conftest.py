"""One local Ray cluster (a head and a worker, each with two declared 24 GiB GPUs) per module,
and a supervisor-side connection to it; at the end every node process and engine is gone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("ray")

from supervisor.cluster.backend import RayCluster
from tests.cluster.local_ray import LocalRay, local_cluster


@pytest.fixture(scope="module")
def local_ray() -> Iterator[LocalRay]:
    with local_cluster(["head", "a"]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ray_cluster(local_ray: LocalRay) -> Iterator[RayCluster]:
    cluster = RayCluster(local_ray.address, poll_interval=0.5)
    cluster.connect()
    yield cluster
    import ray

    ray.shutdown()
