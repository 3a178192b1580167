"""Property-based fuzzing of both APIs from their OpenAPI specs (schemathesis): the gateway over
a stand-in engine, and the supervisor's admin API (with its token) over stand-in engines.

Every answer must be clean: no 5xx but the documented 502/503/504 (engines unavailable or
failing), and every error a JSON body in the one error shape. Bounded: `MAX_EXAMPLES` cases per
operation, each call with a timeout, the whole run well under two minutes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from gateway.openapi import build_spec

REPO = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = 50
TOKEN = "fuzz-token"
ENGINES_UNAVAILABLE = {502, 503, 504}  # documented: the engines failed, are away, or too slow
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases every run: a CI failure reproduces
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
        )  # fmt: skip


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up:\n{log.read_text()}")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A stand-in engine, a gateway over it, and a supervisor that runs stand-in engines."""
    tmp = tmp_path_factory.mktemp("fuzz")
    engine, gateway, supervisor = free_port(), free_port(), free_port()
    procs = []
    try:
        for name, argv, env, health in [
            ("engine", ["-m", "tests.fake_engine", "--model", str(tmp), "--served-model-name",
                        "m", "--port", str(engine)], None, f"http://127.0.0.1:{engine}/health"),
            ("gateway", ["-m", "gateway", "--port", str(gateway), "--route",
                         f"m=http://127.0.0.1:{engine}", "--queue-timeout", "2",
                         "--upstream-timeout", "5"], None, f"http://127.0.0.1:{gateway}/health"),
            ("supervisor", ["-m", "supervisor", "--port", str(supervisor), "--token", TOKEN,
                            "--state-dir", str(tmp / "state"), "--cache-dir", str(tmp / "cache"),
                            "--engine-python", sys.executable, "--engine-module",
                            "tests.fake_engine", "--start-timeout", "20"],
             {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"},
             f"http://127.0.0.1:{supervisor}/health"),
        ]:  # fmt: skip
            log = tmp / f"{name}.log"
            procs.append(start(argv, log, env))
            wait_up(health, procs[-1], log)
        yield {
            "gateway": f"http://127.0.0.1:{gateway}",
            "supervisor": f"http://127.0.0.1:{supervisor}",
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def assert_clean(response: Any) -> None:
    """No server error but the documented ones; every error a JSON body in the error shape."""
    status = response.status_code
    assert status < 500 or status in ENGINES_UNAVAILABLE, f"{status}: {response.text[:300]}"
    if status >= 400:
        media = response.headers.get("content-type") or [""]  # schemathesis: a list per header
        assert media[0].startswith("application/json"), f"{status} {media}: {response.text[:300]}"
        error = response.json().get("error")
        assert isinstance(error, dict) and isinstance(error.get("message"), str), response.text


def tame(case: Any) -> None:
    """Answers that last by design are cut short: an event stream that follows (`follow`) is
    endless, and a long-poll or a drain (`timeout`) may last minutes; other values stay."""
    query = case.query
    if not isinstance(query, dict):
        return
    if "follow" in query:
        query["follow"] = "false"
    timeout = query.get("timeout")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        query["timeout"] = min(timeout, 0.5)


def fuzz(schema: Any, base_url: str, headers: dict[str, str] | None = None) -> None:
    """`MAX_EXAMPLES` cases per operation of `schema`, each answer checked by assert_clean.
    (schemathesis's pytest plugin does not run on pytest 9: hypothesis drives it here.)"""
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(case=operation.as_strategy())
        def one_operation(case: Any) -> None:
            tame(case)
            assert_clean(case.call(base_url=base_url, headers=headers, timeout=15))

        one_operation()


def test_gateway_answers_every_input_cleanly(services: dict[str, str]) -> None:
    served = httpx.get(f"{services['gateway']}/openapi.json", timeout=5).json()
    assert served == build_spec()
    fuzz(schemathesis.openapi.from_dict(served), services["gateway"])


def test_supervisor_answers_every_input_cleanly(services: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{services['supervisor']}/openapi.json")
    fuzz(schema, services["supervisor"], {"Authorization": f"Bearer {TOKEN}"})
