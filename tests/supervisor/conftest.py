"""The loopback hub the cache tests share (one per session: building its repos takes a second)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hubrepos import GATED, Hub, build_test_hub


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = build_test_hub(tmp_path_factory.mktemp("hub"))
    server = Hub(root, gated=[GATED]).start()
    try:
        yield server
    finally:
        server.stop()
