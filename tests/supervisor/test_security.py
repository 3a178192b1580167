"""The admin API's access control: secrets redacted, Host header check, no open admin API beyond
loopback, a private state folder, and a reload that would remove every model confirmed first."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest

from supervisor.api import create_app
from supervisor.config import SemConfig
from supervisor.daemon import refuse_open_admin
from supervisor.engine import free_port
from supervisor.errors import ConfirmationRequired
from supervisor.hosts import allowed_hosts, host_allowed, origin_allowed
from supervisor.manager import Manager
from supervisor.reloader import Reloader
from supervisor.store import Store
from tests.conftest import REPO, ManagerFactory, wait_until


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- secrets ---------------------------------------------------------------------------------


async def test_env_values_and_secret_engine_args_are_redacted_without_a_token(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager()
    app = create_app(manager, manager.events, token="s3cret")
    spec = {
        "name": "m", "source": f"path:{model_dir}",
        "env": {"HF_TOKEN": "hf_live_value", "LOG_LEVEL": "debug"},
        "engine_args": {"hf-token": "engine-key", "max-num-batched-tokens": 512},
    }  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        added = await c.post("/models", json=spec, headers={"Authorization": "Bearer s3cret"})
        assert added.status_code == 202
        answers = [added.json(), (await c.get("/models/m")).json(),
                   (await c.get("/models")).json()["models"][0]]  # fmt: skip
    for model in answers:
        assert model["spec"]["env"] == {"HF_TOKEN": "***", "LOG_LEVEL": "***"}
        assert model["spec"]["engine_args"] == {"hf-token": "***", "max-num-batched-tokens": 512}
    assert "hf_live_value" not in str(answers) and "engine-key" not in str(answers)
    assert manager.get("m").spec.env["HF_TOKEN"] == "hf_live_value", "the engine still gets it"


def test_state_folder_and_database_are_private(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as an older sem left it
    store = Store(state / "sem.db")
    store.set_meta("k", "v")  # a write: the -wal file exists now
    try:
        assert mode(state) == 0o700
        files = [state / "sem.db", state / "sem.db-wal", state / "sem.db-shm"]
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        store.close()


# -- the Host header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1:8001", True), ("localhost:8001", True), ("[::1]:8001", True),
     ("127.0.0.2", True), ("LOCALHOST", True), ("10.0.0.5:8001", True),
     ("evil.example:8001", False), ("evil.example", False), ("10.0.0.6:8001", False),
     ("localhost.evil.example", False), (None, False), ("", False)],
)  # fmt: skip
def test_host_header_decision(host: str | None, allowed: bool):
    assert host_allowed(host, allowed_hosts("10.0.0.5")) is allowed


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [(None, True), ("http://127.0.0.1:8001", True), ("http://localhost:3000", True),
     ("https://evil.example", False), ("null", False), ("http://127.0.0.1.evil.example", False)],
)  # fmt: skip
def test_origin_header_decision(origin: str | None, allowed: bool):
    assert origin_allowed(origin, allowed_hosts("127.0.0.1")) is allowed


def test_extra_hosts_and_the_wildcard():
    assert host_allowed("sem.internal:8001", allowed_hosts("127.0.0.1", ["sem.internal"]))
    assert host_allowed("anything", allowed_hosts("127.0.0.1", ["*"]))


async def test_a_rebinding_host_or_a_foreign_origin_is_403_and_loopback_is_served(
    make_manager: ManagerFactory,
):
    manager = make_manager()
    app = create_app(manager, manager.events, allowed_hosts=allowed_hosts("127.0.0.1"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8001") as c:
        assert (await c.get("/models")).status_code == 200
        assert (await c.get("/models", headers={"Host": "localhost:8001"})).status_code == 200
        rebound = await c.post("/models", headers={"Host": "attacker.example:8001"},
                               json={"name": "m", "source": "path:/x"})  # fmt: skip
        assert rebound.status_code == 403
        error = rebound.json()["error"]
        assert error["type"] == "host_not_allowed" and "--allowed-hosts" in error["message"]
        assert "access-control-allow-origin" not in rebound.headers, "no CORS"
        forged = await c.post("/reload", headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403
        assert forged.json()["error"]["type"] == "origin_not_allowed"
    assert manager.entries() == []


# -- no open admin API beyond loopback -------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "token", "refused"),
    [("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
     ("0.0.0.0", None, True), ("::", None, True), ("10.0.0.5", "", True),
     ("0.0.0.0", "t0ken", False)],
)  # fmt: skip
def test_admin_api_beyond_loopback_needs_a_token(host: str, token: str | None, refused: bool):
    assert (refuse_open_admin(host, token) is not None) is refused


def supervisor_argv(tmp_path: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", "--config", str(tmp_path / "models.yaml"),
            "--port", str(port), "--state-dir", str(tmp_path / "state"),
            "--cache-dir", str(tmp_path / "hf"), *extra]  # fmt: skip


def test_supervisor_on_all_interfaces_without_a_token_refuses_to_start(tmp_path: Path):
    (tmp_path / "models.yaml").write_text("devices: cpu\nmodels: []\n")
    env = {k: v for k, v in os.environ.items() if k != "SEM_ADMIN_TOKEN"}
    done = subprocess.run(
        supervisor_argv(tmp_path, free_port(), "--host", "0.0.0.0"),
        cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "beyond loopback, without a token" in done.stderr and "SEM_ADMIN_TOKEN" in done.stderr
    assert not (tmp_path / "state").exists(), "nothing started"


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[str]:
    """A supervisor process whose models.yaml has one model with a source the hub rejects."""
    (tmp_path / "models.yaml").write_text(
        "devices: cpu\nmodels:\n  - name: bad\n    source: hf://org/model..v2\n"
    )
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    with (tmp_path / "supervisor.log").open("wb") as log:
        proc = subprocess.Popen(supervisor_argv(tmp_path, port), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "supervisor.log").read_text()
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "supervisor did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_supervisor_skips_a_model_with_a_bad_source_checks_host_and_keeps_state_private(
    supervisor: str, tmp_path: Path
):
    events = httpx.get(f"{supervisor}/events", params={"subject": "bad"}, timeout=5).json()
    (invalid,) = [e for e in events["events"] if e["kind"] == "model_invalid"]
    assert "models[0].source" in invalid["message"] and "Cannot have -- or .." in invalid["message"]
    assert httpx.get(f"{supervisor}/models", timeout=5).json()["models"] == []
    rebound = httpx.get(f"{supervisor}/models", headers={"Host": "evil.example"}, timeout=5)
    assert rebound.status_code == 403
    state = tmp_path / "state"
    assert mode(state) == 0o700 and mode(state / "logs") == 0o700
    assert mode(state / "sem.db") == 0o600


# -- a reload that would remove every model --------------------------------------------------


@pytest.fixture
async def reloading(
    make_manager: ManagerFactory, model_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[Manager, Reloader, Path]]:
    manager = make_manager(store=Store(None))
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {{name: m, source: 'path:{model_dir}'}}\n")
    reload = Reloader(path, manager, SemConfig(), drain_timeout=1)
    await reload()
    await wait_until(lambda: manager.get("m").state.value == "ready", what="m ready")
    path.write_text("models: []\n")  # emptied (or written half-way by an editor)
    yield manager, reload, path


async def test_reload_of_a_file_without_models_changes_nothing_unconfirmed(reloading):
    """The SIGHUP path: the daemon logs this error and goes on."""
    manager, reload, _ = reloading
    with pytest.raises(ConfirmationRequired, match=r"would drain and stop m\b"):
        await reload()
    assert [e.spec.name for e in manager.entries()] == ["m"] and not manager.get("m").leaving


async def test_reload_removing_every_model_is_409_until_confirmed(reloading):
    manager, reload, _ = reloading
    app = create_app(manager, manager.events, token="s3cret", reload=reload)
    headers = {"Authorization": "Bearer s3cret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x",
                                 headers=headers) as client:  # fmt: skip
        refused = await client.post("/reload")
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["type"] == "confirmation_required"
        assert "confirm_remove_all=true" in error["message"] and "--yes" in error["message"]
        assert not manager.get("m").leaving
        confirmed = await client.post("/reload", params={"confirm_remove_all": "true"})
        assert confirmed.status_code == 200 and confirmed.json()["removed"] == ["m"]
    await wait_until(lambda: manager.entries() == [], what="m removed")


async def test_reload_of_a_file_that_lists_models_needs_no_confirmation(reloading, model_dir: Path):
    _, reload, path = reloading
    path.write_text(f"models:\n  - {{name: n, source: 'path:{model_dir}'}}\n")
    diff = await reload()
    assert diff.removed == ["m"] and [s.name for s in diff.added] == ["n"]


def test_sem_reload_yes_sends_the_confirmation(capsys: pytest.CaptureFixture[str]):
    from sem.cli import main

    asked: list[str] = []

    class Admin(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            asked.append(self.path)
            body = b'{"added": [], "changed": [], "removed": ["m"], "unchanged": []}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        admin = f"http://127.0.0.1:{server.server_port}"
        assert main(["--admin", admin, "reload", "--yes"]) == 0
        assert main(["--admin", admin, "reload"]) == 0
    finally:
        server.shutdown()
        thread.join()
    assert asked == ["/reload?confirm_remove_all=true", "/reload"]
    assert "removed    m" in capsys.readouterr().out
