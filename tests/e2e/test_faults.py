"""Faults under `sem run` on the stand-in engine: a wedged engine (SIGUSR1: /health 200, no
progress) is restarted by its counters, and signalled only once no request can reach it; a
gateway killed under load is replaced with its socket kept open, so no client is refused."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.e2e.answers import answer_problem
from tests.e2e.conftest import StartSem
from tests.e2e.helpers import Load, SemRun, poll, posting
from tests.gateway.test_failover import stream_text
from tests.gateway.test_faults import json_events

BODY = {"model": "a", "prompt": "one two three", "max_tokens": 8}


def restart_reasons(supervisor: str, replica: str) -> list[str]:
    """The reasons of the replica's transitions to restarting, oldest first."""
    events = httpx.get(f"{supervisor}/events", params={"subject": replica}, timeout=5).json()
    return [
        str(e["data"]["reason"])
        for e in events["events"]
        if e["kind"] == "transition" and e["data"]["new"] == "restarting"
    ]


def requests_after_sigterm(log: str, pid: int) -> int:
    """How many requests engine `pid` logged after it logged its SIGTERM."""
    lines = re.findall(rf"^fake engine {pid}: (request|SIGTERM)$", log, re.M)
    assert "SIGTERM" in lines, f"engine {pid} never got SIGTERM"
    return len(lines) - 1 - lines.index("SIGTERM")


def test_a_wedged_engine_is_restarted_by_its_counters_and_signalled_once_unrouted(
    start_sem: StartSem, model_dir: Path
):
    env = '{FAKE_TOKEN_DELAY: "0.01", FAKE_SIGTERM_ABORT: "1", FAKE_LOG_REQUESTS: "1"}'
    run = start_sem(
        f"models:\n  - name: a\n    source: path:{model_dir}\n    replicas: 2\n    env: {env}\n",
        ready=["a"],
    )
    load = Load(run.gateway, posting(BODY), workers=4, timeout=60).start()
    try:
        load.wait_for(20)
        pid = run.engine_pids()["a-0"]
        wedged = time.monotonic()
        os.kill(pid, signal.SIGUSR1)  # /health stays 200, no token comes out any more
        seconds = poll(lambda: bool(restart_reasons(run.supervisor, "a-0")), 30, "a-0 restart")
        (reason,) = restart_reasons(run.supervisor, "a-0")
        print(f"wedged engine restarted {seconds:.1f}s after the wedge: {reason}")
        assert "(engine counters)" in reason or "(gateway report)" in reason, reason
        assert time.monotonic() - wedged < 15, "the target: restarted within 15 s"
        poll(lambda: run.engine_pids().get("a-0") not in (None, pid), 30, "a new a-0 engine")
        log = (run.state_dir / "logs" / "a-0.log").read_text()
        assert requests_after_sigterm(log, pid) == 0, "a request reached it after SIGTERM"
    finally:
        load.stop()


def streamed_text(gateway: str, body: dict[str, Any]) -> str:
    """The text of one streamed completion, which must be whole (`answer_problem`)."""
    response = httpx.post(f"{gateway}/v1/completions", json=body, timeout=120)
    assert (problem := answer_problem("/v1/completions", body, response)) is None, problem
    return stream_text(json_events(response.content))


def test_an_engine_wedged_while_idle_is_restarted_on_the_gateways_report_and_nothing_is_lost(
    start_sem: StartSem, model_dir: Path
):
    """Wedged between two batches, an engine's counters freeze at no request running (vLLM's
    API process serves what its stopped EngineCore last sent): only the gateway, whose requests
    get no byte from it, can tell the supervisor (the chaos run's lost request, 2026-12-07)."""
    env = '{FAKE_TOKEN_DELAY: "0.01"}'
    run = start_sem(
        f"models:\n  - name: a\n    source: path:{model_dir}\n    env: {env}\n", ready=["a"]
    )
    pid = run.engine_pids()["a-0"]
    os.kill(pid, signal.SIGUSR1)  # idle: no stream producing, nothing running in its figures
    body = {"model": "a", "prompt": "count 0", "max_tokens": 8, "stream": True}
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: streamed_text(run.gateway, body), range(4)))
    assert texts == ["".join(f" {i}" for i in range(1, 9))] * 4, "every answer whole"
    (reason,) = restart_reasons(run.supervisor, "a-0")
    assert "(gateway report)" in reason, reason
    assert run.engine_pids()["a-0"] != pid


def gateway_pid(run: SemRun) -> int | None:
    """The gateway child's pid; None while there is none (between a death and a restart)."""
    try:
        return run.child_pid("gateway")
    except (AssertionError, psutil.Error):  # none yet, or the dead one not reaped yet
        return None


def test_a_killed_gateway_is_replaced_and_no_client_is_refused(
    start_sem: StartSem, model_dir: Path
):
    env = '{FAKE_TOKEN_DELAY: "0.005"}'
    run = start_sem(
        f"models:\n  - name: a\n    source: path:{model_dir}\n    env: {env}\n", ready=["a"]
    )
    send = posting(BODY)
    errors: list[tuple[float, str]] = []  # (when, what) of every connection-level error
    lock = threading.Lock()

    def recording(client: httpx.Client, worker: int, n: int) -> str | None:
        try:
            return send(client, worker, n)
        except httpx.TransportError as exc:
            with lock:
                errors.append((time.monotonic(), type(exc).__name__))
            raise

    load = Load(run.gateway, recording, workers=4, timeout=30).start()
    try:
        load.wait_for(20)
        old = run.child_pid("gateway")
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        poll(lambda: gateway_pid(run) not in (None, old), 30, "a new gateway")
        before = load.ok
        poll(lambda: load.ok >= before + 20, 30, "answers from the new gateway")
    finally:
        load.stop()
    window = (errors[-1][0] - errors[0][0]) if errors else 0.0
    refused = [what for _, what in errors if what == "ConnectError"]
    print(f"gateway kill -9: {len(errors)} connection errors ({len(refused)} refused) over"
          f" {window:.2f}s; {len(load.failures)} of {load.sent} requests failed")  # fmt: skip
    assert refused == [], "the socket stays open while the gateway restarts: nobody is refused"
    assert all(when - killed < 10 for when, _ in errors), "errors only around the kill"
    assert len(load.failures) <= 4, "at most the requests the dead gateway held"
