"""The control plane answers kept-alive requests without a delayed-ACK stall (the figures:
bench/control_plane.py).

A response written as headers then body on a socket without TCP_NODELAY waits for the client's
delayed ACK: ~40 ms per request on a kept-alive connection against ~1 ms on a new one (whose
first segments the kernel ACKs at once). A ratio, not an absolute time: the machine is shared.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.control_plane import gateway, measure, supervisor

MAX_RATIO = 4  # kept-alive median over new-connection median: ~0.5 healthy, a stall ~10-40


@pytest.fixture(scope="module")
def supervisor_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with supervisor(tmp_path_factory.mktemp("supervisor")) as port:
        yield port


@pytest.mark.parametrize("path", ["/health", "/models"])
def test_supervisor_admin_api_kept_alive_is_not_stalled(supervisor_port: int, path: str):
    got = measure(supervisor_port, path, requests=20)
    assert got.ratio < MAX_RATIO, (
        f"kept-alive p50 {statistics.median(got.kept) * 1000:.1f} ms against new-connection"
        f" p50 {statistics.median(got.new) * 1000:.1f} ms"
    )


def test_gateway_health_kept_alive_is_not_stalled(tmp_path: Path):
    with gateway(tmp_path) as port:
        got = measure(port, "/health", requests=20)
    assert got.ratio < MAX_RATIO, (
        f"kept-alive p50 {statistics.median(got.kept) * 1000:.1f} ms against new-connection"
        f" p50 {statistics.median(got.new) * 1000:.1f} ms"
    )
