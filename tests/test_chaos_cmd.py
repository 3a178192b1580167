"""`sem chaos`: the completeness checker, the recovery rule and the ledger on their own, then the
command against a real `sem run` over stand-in engines (kill -9 of an engine's API process,
SIGSTOP of an engine, kill -9 of the supervisor), its JSON report read as a user's script would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from sem.chaos import procs
from sem.chaos.check import KINDS, Route, check_answer, check_stream
from sem.chaos.faults import Injection, Ledger, Recovery, Undo
from sem.chaos.runner import Replica, recovered
from tests.checkpoints import tiny_llama
from tests.conftest import REPO
from tests.e2e.helpers import SemRun, poll

STREAM = next(k for k in KINDS if k.stream and k.route is Route.COMPLETIONS)
WHOLE = next(k for k in KINDS if not k.stream and k.route is Route.CHAT)


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


def token(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def usage(tokens: int) -> dict[str, Any]:
    return {"choices": [], "usage": {"completion_tokens": tokens}}


def test_truncated_stream_with_finish_and_done_is_failed():
    # What vLLM sends when stopped in mode=abort: a proper-looking end after 2 of 4 tokens.
    body = sse(token(" 1"), token(" 2"), token("", "length"), usage(2), "[DONE]")
    assert check_answer(STREAM, 200, body, max_tokens=4) == "2 of 4 tokens, finish 'length'"
    without_usage = sse(token(" 1"), token(" 2", "length"), "[DONE]")
    assert check_stream(without_usage, max_tokens=4) == "2 of 4 tokens, finish 'length'"


def test_complete_stream_passes_by_usage_and_by_counting_events():
    tokens = [token(f" {n}") for n in range(3)] + [token(" 3", "length")]
    assert check_stream(sse(*tokens, usage(4), "[DONE]"), max_tokens=4) is None
    assert check_stream(sse(*tokens, "[DONE]"), max_tokens=4) is None


def test_error_event_missing_done_and_non_2xx_are_failed():
    error = {"error": {"message": "EngineCore encountered an issue", "code": 500}}
    assert "error event" in str(check_stream(sse(token(" 1"), error, "[DONE]"), 1))
    assert check_stream(sse(token(" 1", "length")), 1) == "stream not ended by one [DONE]"
    assert check_answer(STREAM, 503, b'{"error": {}}', 1) == 'HTTP 503: {"error": {}}'


def test_whole_answer_short_of_max_tokens_is_failed():
    choice = {"message": {"content": " 1 2"}, "finish_reason": "length"}
    answer = {"choices": [choice], "usage": {"completion_tokens": 2}}

    def check() -> str | None:
        return check_answer(WHOLE, 200, json.dumps(answer).encode(), max_tokens=4)

    assert check() == "2 of 4 tokens, finish 'length'"
    answer["usage"] = {"completion_tokens": 4}
    assert check() is None
    choice["finish_reason"] = "abort"
    assert check() == "4 of 4 tokens, finish 'abort'"


def test_recovered_after_kill_needs_a_new_ready_engine():
    killed = Injection("kill -9", Recovery.ENGINE_REPLACED, victim_pid=100)
    assert not recovered(killed, [Replica("a-0", "ready", 100)], None, victim_alive=False)
    assert not recovered(killed, [Replica("a-0", "starting", 101)], None, victim_alive=False)
    assert recovered(killed, [Replica("a-0", "ready", 101)], None, victim_alive=False)


def test_recovered_after_daemon_kill_needs_another_listener():
    killed = Injection("kill -9", Recovery.DAEMON_BACK, victim_pid=7, port=8001)
    ready = [Replica("a-0", "ready", 100)]
    assert not recovered(killed, ready, listener=None, victim_alive=False)
    assert not recovered(killed, ready, listener=7, victim_alive=True)
    assert recovered(killed, ready, listener=8, victim_alive=False)


def test_ledger_continues_what_it_stopped_and_reports_it():
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ledger = Ledger()
        ledger.hold(Undo("SIGCONT sleep", proc.pid, signal.SIGCONT, group=True))
        proc.send_signal(signal.SIGSTOP)
        poll(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, 5, "stopped")
        assert ledger.release_all() == ["SIGCONT sleep"]
        poll(lambda: psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED, 5, "continued")
        assert ledger.release_all() == [], "released once"
    finally:
        proc.kill()
        proc.wait()


# Model a stops like vLLM 0.32 (streams cut short but ended "normally" on SIGTERM); b is plain.
CONFIG = """\
models:
  - name: a
    source: path:{model}
    env: {{FAKE_TOKEN_DELAY: "0.01", FAKE_SIGTERM_ABORT: "1"}}
  - name: b
    source: path:{model}
    env: {{FAKE_TOKEN_DELAY: "0.01"}}
"""
SCENARIOS = ("kill-engine", "stop-engine", "wedge-idle-engine", "kill-supervisor")
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, Any], SemRun]]:
    """One `sem chaos` run over a `sem run` of two stand-in models: exit code, report, the run."""
    tmp = tmp_path_factory.mktemp("chaos")
    config = tmp / "models.yaml"
    config.write_text(CONFIG.format(model=tiny_llama(tmp / "model")))
    # Not tests/e2e's start_sem: that one is per test, and this run serves the whole module.
    run = SemRun(config=config, state_dir=tmp / "state", engine_python=sys.executable,
                 engine_module="tests.fake_engine").start()  # fmt: skip
    try:
        run.wait_ready(["a", "b"], timeout=60)
        argv = [
            sys.executable, "-m", "sem", "--admin", run.supervisor, "chaos",
            "--gateway", run.gateway, "--json", "--model", "a",
            "--clients", "6", "--max-tokens", str(MAX_TOKENS),
            "--baseline", "2", "--warmup", "1", "--settle", "1", "--recover-timeout", "60",
            *(arg for name in SCENARIOS for arg in ("--scenario", name)),
        ]  # fmt: skip
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert done.stdout.startswith("{"), done.stderr[-3000:]
        yield done.returncode, json.loads(done.stdout), run
    finally:
        run.kill_all()


def stopped(run: SemRun) -> list[int]:
    """The processes of `run` that are stopped (SIGSTOP) now."""
    return procs.stopped(run.leftovers())


def scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["scenarios"] if s["scenario"] == name)


def test_every_scenario_runs_under_load_and_recovery_is_measured(chaos):
    code, report, _ = chaos
    assert report["target"] == "a" and report["models"] == ["a", "b"]
    assert report["baseline"]["requests"] > 0 and report["baseline"]["failed"] == 0
    assert [s["scenario"] for s in report["scenarios"]] == list(SCENARIOS)
    for s in report["scenarios"]:
        assert s["applicable"], s
        assert s["load"]["requests"] > 0, s
        assert s["recovered"] and s["recovery_s"] > 0, s
        assert s["added_p99_s"] is not None, s
    assert code == (0 if report["clean"] else 1)


def test_no_orphans_and_nothing_left_stopped(chaos):
    _, report, run = chaos
    for s in report["scenarios"]:
        assert s["orphans"] == [], s
        assert s["released"] == [], "the supervisor replaced the stopped engine itself"
    assert stopped(run) == []


def test_kill_9_of_engine_and_of_supervisor_costs_no_request(chaos):
    _, report, _ = chaos
    for name in ("kill-engine", "kill-supervisor"):
        assert scenario(report, name)["load"]["failed"] == 0, scenario(report, name)


def test_sigstop_of_an_engine_costs_no_request(chaos):
    _, report, _ = chaos
    stop = scenario(report, "stop-engine")
    assert stop["load"]["failed"] == 0, stop["load"]["failures"]


def test_an_engine_wedged_between_batches_costs_no_request(chaos):
    _, report, _ = chaos
    wedged = scenario(report, "wedge-idle-engine")
    assert wedged["load"]["failed"] == 0, wedged["load"]["failures"]


def test_ctrl_c_continues_the_engine_it_stopped(chaos):
    _, _, run = chaos
    argv = [sys.executable, "-m", "sem", "--admin", run.supervisor, "chaos", "--gateway",
            run.gateway, "--model", "b", "--scenario", "stop-engine", "--baseline", "0.5",
            "--warmup", "0.5", "--recover-timeout", "60"]  # fmt: skip
    tool = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        poll(lambda: bool(stopped(run)), 30, "chaos to SIGSTOP b's engine")
        tool.send_signal(signal.SIGINT)
        assert tool.wait(timeout=30) == 130, tool.stderr.read() if tool.stderr else ""
        assert stopped(run) == []
    finally:
        tool.kill()
        tool.wait()


async def test_a_model_without_chat_template_gets_completions_only():
    """A base model answers chat with 400 (no chat template): that is no fault's cost, so the
    load sends it completions only."""
    import asyncio

    import httpx

    from sem.chaos.load import Load

    routes: list[tuple[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        routes.append((json.loads(request.content)["model"], request.url.path))
        return httpx.Response(200, json={"choices": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://g") as c:
        load = Load(c, ["base", "chat"], clients=4, max_tokens=1, no_chat=frozenset({"base"}))
        load.start()
        await asyncio.sleep(0.2)
        await load.stop()
    assert {path for model, path in routes if model == "base"} == {"/v1/completions"}
    assert {path for model, path in routes if model == "chat"} == {
        "/v1/completions",
        "/v1/chat/completions",
    }
