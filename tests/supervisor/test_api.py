"""The admin API over a manager running stand-in engines: status codes and error bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from supervisor.api import create_app
from supervisor.manager import Manager
from tests.conftest import ManagerFactory, wait_until


@pytest.fixture
async def api(make_manager: ManagerFactory) -> AsyncIterator[tuple[httpx.AsyncClient, Manager]]:
    manager = make_manager()
    app = create_app(manager, manager.events, token="s3cret")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sem") as client:
        client.headers["Authorization"] = "Bearer s3cret"
        yield client, manager


async def test_add_model_is_202_then_ready_and_listed(api, model_dir: Path):
    client, manager = api
    response = await client.post("/models", json={"name": "m", "source": f"path:{model_dir}"})
    assert response.status_code == 202
    assert response.json()["state"] in {"pending", "starting"}
    await wait_until(lambda: manager.get("m").state.value == "ready")
    listed = (await client.get("/models")).json()["models"]
    assert [m["name"] for m in listed] == ["m"]
    replica = (await client.get("/models/m")).json()["replicas"][0]
    assert replica["state"] == "ready" and replica["pid"] > 0 and replica["port"] > 0
    routes = (await client.get("/routes")).json()
    assert routes["models"]["m"]["replicas"][0]["state"] == "ready"
    events = (await client.get("/events", params={"subject": "m"})).json()["events"]
    assert any(e["kind"] == "model_added" for e in events)


async def test_models_show_estimate_vs_measured_memory(api, model_dir: Path):
    client, manager = api
    await client.post("/models", json={"name": "m", "source": f"path:{model_dir}"})
    memory = (await client.get("/models/m")).json()["memory"]
    estimate = manager.get("m").sized.estimated
    assert memory == {"estimate": estimate, "measured": None, "used_for_placement": estimate}
    await wait_until(lambda: manager.get("m").sized.measured is not None, what="measured")
    memory = (await client.get("/models/m")).json()["memory"]
    # A stand-in engine holds far less than the CPU reservation: the need is not lowered.
    assert memory == {"estimate": estimate, "measured": estimate, "used_for_placement": estimate}


async def test_duplicate_name_is_409(api, model_dir: Path):
    client, _ = api
    body = {"name": "m", "source": f"path:{model_dir}"}
    assert (await client.post("/models", json=body)).status_code == 202
    response = await client.post("/models", json=body)
    assert response.status_code == 409
    assert "already exists" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"source": "path:/x"}, "body.name"),
        ({"name": "m", "source": "path:/x", "replicas": -1}, "body.replicas"),
        ({"name": "m", "source": "nope"}, "body.source"),
        ({"name": "bad name!", "source": "path:/x"}, "body.name"),
        ({"name": "m", "source": "path:/x", "colour": "red"}, "body.colour"),
    ],
)
async def test_malformed_spec_is_422_naming_the_field(api, body, field):
    client, manager = api
    response = await client.post("/models", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["message"].startswith(field)
    assert manager.entries() == []


async def test_missing_source_folder_is_422(api):
    client, _ = api
    response = await client.post("/models", json={"name": "m", "source": "path:/no/such/dir"})
    assert response.status_code == 422
    assert "no config.json" in response.json()["error"]["message"]


async def test_unknown_model_is_404_json(api):
    client, _ = api
    for response in (await client.get("/models/x"), await client.delete("/models/x")):
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "model_not_found"


async def test_mutating_calls_need_the_token(api, model_dir: Path):
    client, manager = api
    response = await client.post(
        "/models", json={"name": "m", "source": f"path:{model_dir}"},
        headers={"Authorization": "Bearer wrong"},
    )  # fmt: skip
    assert response.status_code == 401
    assert manager.entries() == []
    assert (await client.get("/models", headers={"Authorization": ""})).status_code == 200


async def test_delete_is_202_and_the_model_goes(api, model_dir: Path):
    client, manager = api
    await client.post("/models", json={"name": "m", "source": f"path:{model_dir}"})
    await wait_until(lambda: manager.get("m").state.value == "ready")
    response = await client.delete("/models/m", params={"timeout": 1})
    assert response.status_code == 202
    assert response.json()["state"] == "draining"
    await wait_until(lambda: manager.entries() == [], what="model gone")
    assert (await client.get("/models/m")).status_code == 404
