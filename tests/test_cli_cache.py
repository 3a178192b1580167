"""`sem cache` progress display: tqdm bars on a terminal, lines elsewhere."""

from __future__ import annotations

import pytest

from sem import cachecmd


def job(done: int, state: str = "downloading", finished: float | None = None) -> dict[str, object]:
    return {"id": 1, "source": "hf://org/m", "state": state, "total": 4 << 20, "done": done,
            "percent": round(100 * done / (4 << 20), 1), "rate": 1 << 20, "eta": 2.0,
            "finished": finished, "path": "/c/snap", "error": None}  # fmt: skip


def test_bars_show_bytes_rate_and_state(capsys: pytest.CaptureFixture[str]):
    bars = cachecmd._Bars()
    bars.show([job(1 << 20)])
    bars.show([job(4 << 20, "done", finished=1.0)])
    bars.close()
    err = capsys.readouterr().err
    assert "hf://org/m" in err and "4.00M/4.00M" in err and "done" in err


def test_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]):
    lines = cachecmd._Lines()
    lines.show([job(1 << 20)])
    lines.show([job(2 << 20)])  # same state, within 5 s: no new line
    lines.show([job(4 << 20, "done", finished=1.0)])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "hf://org/m  downloading   25.0%  1.00 MiB / 4.00 MiB  1.00 MiB/s  ETA 2s",
        "hf://org/m  done  100.0%  4.00 MiB / 4.00 MiB  1.00 MiB/s  ETA 2s",
    ]
    assert cachecmd._summary(job(4 << 20, "done", 1.0)) == "hf://org/m: cached, 4.00 MiB in /c/snap"
