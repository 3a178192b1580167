"""Issue 7's scenario on real vLLM engines, in one `sem run` (engine starts are the cost):
while model A serves continuous load, B is added by the API and C by editing models.yaml and
reloading; the supervisor is killed with SIGKILL and comes back re-adopting every engine; C is
removed under load; SIGTERM stops everything. A never fails a request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.conftest import StartSem
from tests.e2e.helpers import Load, SemRun, poll, posting

MODEL = """\
  - name: {name}
    source: path:{path}
    max_model_len: 512
    max_num_seqs: 16
"""
BASE, CHAT = REPO / "models" / "tiny-llama-base", REPO / "models" / "tiny-llama-chat"


def wait_ready(run: SemRun, names: set[str], timeout: float) -> None:
    def ready() -> bool:
        return names <= {n for n, state in run.model_states().items() if state == "ready"}

    poll(ready, timeout, f"{names} ready:\n{run.output()[-3000:]}", interval=1)


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_add_reload_supervisor_kill_and_removal_under_load(start_sem: StartSem):
    run = start_sem("models:\n" + MODEL.format(name="a", path=BASE), engine="vllm", ready=["a"],
                    ready_timeout=400)  # fmt: skip
    body = {"model": "a", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    # Continuous but not saturating: two engines start beside A on the same 2 cores.
    load = Load(run.gateway, posting(body), workers=2, pause=0.1).start()
    load.wait_for(10)

    # B by the API, C by editing models.yaml and `sem reload`.
    added = httpx.post(
        f"{run.supervisor}/models",
        json={"name": "b", "source": f"path:{CHAT}", "max_model_len": 512, "max_num_seqs": 16},
        timeout=30,
    )
    assert added.status_code == 202, added.text
    run.config.write_text(run.config.read_text() + MODEL.format(name="c", path=CHAT))
    sem = str(Path(sys.executable).with_name("sem"))
    reload = subprocess.run(
        [sem, "--admin", run.supervisor, "reload"], capture_output=True, text=True, timeout=60
    )
    assert reload.returncode == 0, reload.stderr
    assert "added      c" in reload.stdout
    wait_ready(run, {"a", "b", "c"}, timeout=400)

    # kill -9 the supervisor: `sem run` starts it again, and it re-adopts all three engines.
    engines = run.engine_pids()
    served = load.ok
    os.kill(run.child_pid("supervisor"), signal.SIGKILL)
    time.sleep(2)
    run.wait_supervisor(timeout=60)
    wait_ready(run, {"a", "b", "c"}, timeout=60)
    assert run.engine_pids() == engines, "engines re-adopted, not restarted"
    load.wait_for(served + 20)
    assert load.ok > served, "A served while the supervisor was away and after"

    # Remove C while it serves: its in-flight requests finish, then it is gone.
    c_load = Load(run.gateway, posting(dict(body, model="c", max_tokens=64)), workers=2).start()
    c_load.wait_for(4)
    removed = httpx.delete(f"{run.supervisor}/models/c", params={"timeout": 30}, timeout=10)
    assert removed.status_code == 202
    poll(lambda: "c" not in run.model_states(), 60, "c removed", interval=0.5)
    c_load.stop()
    assert [f for f in c_load.failures if not f.startswith("404")] == []

    load.stop()
    assert load.failures == [], load.failures[:3]
    code, seconds = run.stop(timeout=60)
    assert code == 0
    assert seconds < 30
    assert run.leftovers() == []
    print(f"\nA: {load.ok} requests, 0 failed; C: {c_load.ok} ok before removal;"
          f" stop took {seconds:.1f}s")  # fmt: skip
