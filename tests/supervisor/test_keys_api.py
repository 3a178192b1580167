"""/keys on the admin API (supervisor.api_keys) and `sem keys`: a key is shown once, kept and
published only as its hash, revoked at once; its use comes from the gateway's report."""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.report import GatewayReport, KeyUsage
from contract.routes import key_hash
from sem import keyscmd
from sem.cli import build_parser
from supervisor.api import create_app
from supervisor.api_keys import KeySpec
from supervisor.manager import Manager
from supervisor.store import Store
from tests.conftest import ManagerFactory

TOKEN = "s3cret"


@pytest.fixture
async def api(make_manager: ManagerFactory) -> AsyncIterator[tuple[httpx.AsyncClient, Manager]]:
    manager = make_manager()
    app = create_app(manager, manager.events, token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sem") as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client, manager


async def test_a_key_is_shown_once_and_published_only_as_its_hash(api):
    client, manager = api
    body = {"name": "ci", "models": ["m"], "requests_per_minute": 60, "tokens_per_minute": 1000}
    created = await client.post("/keys", json=body)
    assert created.status_code == 201
    made = created.json()
    key = made["key"]
    assert key.startswith("sem-") and len(key) >= 4 + 43
    listed = (await client.get("/keys")).json()["keys"]
    assert listed == [{k: v for k, v in made.items() if k != "key"}]
    assert key not in str(listed) and key_hash(key) not in str(listed)
    routes = (await client.get("/routes")).json()
    assert routes["keys"] == [{"id": made["id"], "hash": key_hash(key), "models": ["m"],
                               "requests_per_minute": 60, "tokens_per_minute": 1000}]  # fmt: skip
    assert key not in str(routes)
    assert manager.routes.keys[0].hash == key_hash(key)


async def test_a_revoked_key_leaves_the_route_table(api):
    client, manager = api
    made = (await client.post("/keys", json={"name": "ci"})).json()
    version = manager.routes.version
    assert (await client.delete(f"/keys/{made['id']}")).json()["name"] == "ci"
    assert manager.routes.keys == () and manager.routes.version > version
    missing = await client.delete(f"/keys/{made['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "key_not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body.name"),
        ({"name": "x", "requests_per_minute": 0}, "body.requests_per_minute"),
        ({"name": "x", "models": []}, "body.models"),
        ({"name": "x", "colour": "red"}, "body.colour"),
    ],
)
async def test_a_bad_key_body_is_422_naming_the_field(api, body, field):
    client, _ = api
    response = await client.post("/keys", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(field)


async def test_keys_and_the_route_table_need_the_token(api):
    client, _ = api
    del client.headers["Authorization"]
    for method, path in [("POST", "/keys"), ("GET", "/keys"), ("DELETE", "/keys/x"),
                         ("GET", "/routes")]:  # fmt: skip
        response = await client.request(method, path, json={"name": "x"})
        assert response.status_code == 401, path


async def test_without_a_token_the_loopback_route_table_is_open(make_manager: ManagerFactory):
    manager = make_manager()
    transport = httpx.ASGITransport(app=create_app(manager, manager.events))
    async with httpx.AsyncClient(transport=transport, base_url="http://sem") as client:
        assert (await client.get("/routes")).status_code == 200


async def test_usage_comes_from_the_gateways_report(api):
    client, manager = api
    made = (await client.post("/keys", json={"name": "ci"})).json()
    now = time.time()
    manager.demand.post(GatewayReport(time=now, keys={made["id"]: KeyUsage(3, 42, now)}))
    listed = (await client.get("/keys")).json()["keys"][0]
    assert (listed["requests"], listed["tokens"], listed["last_used"]) == (3, 42, now)


async def test_keys_survive_a_supervisor_restart(make_manager: ManagerFactory, tmp_path: Path):
    store = Store(tmp_path / "sem.db")
    first = make_manager(store=store)
    _, key = first.keys.create(KeySpec(name="ci"))
    again = make_manager(store=Store(tmp_path / "sem.db"))
    assert [k.hash for k in again.routes.keys] == [key_hash(key)]


def test_sem_keys_create_ls_rm(capsys: pytest.CaptureFixture[str]):
    sent: list[tuple[str, str, Any]] = []
    key = {"id": "key-1", "name": "ci", "models": ["m", "n"], "requests_per_minute": 60,
           "tokens_per_minute": None, "created": 1.0, "last_used": None, "requests": 7,
           "tokens": 70}  # fmt: skip

    def request(_: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
        sent.append((method, path, kwargs.get("json")))
        return {"GET": {"keys": [key]}, "POST": {**key, "key": "sem-abc"}, "DELETE": key}[method]

    def sem(*argv: str) -> str:
        keyscmd.run(build_parser().parse_args(["keys", *argv]), request)
        return capsys.readouterr().out

    assert sem("create", "ci", "--model", "m", "--rpm", "60").startswith("key-1: sem-abc\n")
    assert sent[-1] == ("POST", "/keys", {"name": "ci", "models": ["m"],
                        "requests_per_minute": 60, "tokens_per_minute": None})  # fmt: skip
    header, row = sem("ls").splitlines()
    assert header.split() == ["ID", "NAME", "MODELS", "RPM", "TPM", "REQUESTS", "TOKENS",
                              "LAST", "USED"]  # fmt: skip
    assert row.split() == ["key-1", "ci", "m,n", "60", "-", "7", "70", "-"]
    assert sem("rm", "key-1") == "key-1 (ci): revoked\n" and sent[-1][:2] == (
        "DELETE",
        "/keys/key-1",
    )
