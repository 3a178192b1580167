"""bench/hot_path.py measures what it says: the gateway's fast path answers its fed requests
whole (a stream with all its chunks), and the script prints a figure for each, compiled and
pure Python."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from bench import hot_path
from bench.fake_answers import CHUNKS

REPO = Path(__file__).resolve().parent.parent


def test_the_streams_it_measures_arrive_whole() -> None:
    answers: list[bytes] = []

    async def measured() -> float:
        write = hot_path.FakeClient.write

        def keep(self: hot_path.FakeClient, data: bytes) -> None:
            answers.append(data)
            write(self, data)

        hot_path.FakeClient.write = keep  # type: ignore[method-assign]
        try:
            return await hot_path.measure(stream=True, rounds=1)
        finally:
            hot_path.FakeClient.write = write  # type: ignore[method-assign]

    assert uvloop.run(measured()) > 0
    last = b"".join(answers).rsplit(b"HTTP/1.1 200 OK", 1)[1]  # the last stream
    assert last.count(b'"content":"x"') == CHUNKS and last.endswith(
        b"data: [DONE]\n\n\r\n0\r\n\r\n"
    )
    assert b'"usage"' not in last  # sem's own usage request, stripped


def test_the_script_prints_a_figure_per_request_and_per_stream() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hot_path.py"), "--rounds", "1", "--pure",
         "--turns", "1"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    for measured in ("this", "against"):  # the gateway as it runs, and its pure Python
        figures = re.search(measured + r" +([\d.]+) us per request, +([\d.]+) us per stream", out)
        assert figures is not None, out
        assert 0 < float(figures[1]) < float(figures[2])


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_instructions_are_counted_per_request_and_per_stream() -> None:
    """`--instructions`: valgrind's count of the same work (here 10 of each per round), the
    same on every run: a stream of 64 pieces is many times a request's work."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hot_path.py"), "--instructions", "--count", "10"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    figures = re.search(r"this +([\d,]+) instructions per request, +([\d,]+) per stream", out)
    assert figures is not None, out
    request, stream = (int(figures[n].replace(",", "")) for n in (1, 2))
    assert 10_000 < request < stream / 3, out
