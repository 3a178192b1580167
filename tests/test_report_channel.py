"""The gateway's demand report reaches the supervisor's board: at once when a request finds no
ready replica, with the admin token, and a malformed or unauthenticated report is refused."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
from aiohttp import web
from aiohttp.test_utils import TestServer

from contract.report import GatewayReport, ModelDemand, ReplicaLoad
from contract.routes import ModelRoute, RouteTable
from gateway.admission import Admission
from gateway.reporter import Reporter
from gateway.routes import RouteWatcher
from supervisor.api import create_app
from tests.conftest import ManagerFactory


def test_report_round_trips_through_its_wire_form():
    report = GatewayReport(
        time=12.5,
        models={"m": ModelDemand(queued=2, in_flight=1, last_request=11.0, oldest_wait=3.5)},
        replicas={"m-0": ReplicaLoad(in_flight=1, stalled_for=0.4), "m-1": ReplicaLoad()},
        queue_timeout=90.0,
    )
    assert GatewayReport.from_json(report.to_json()) == report
    older = report.to_json()  # from a gateway of the first wave: no wait, no bound
    del older["queue_timeout"], older["models"]["m"]["oldest_wait"]
    assert GatewayReport.from_json(older).queue_timeout is None


async def test_a_request_for_a_model_without_ready_replica_is_reported_at_once():
    received: asyncio.Queue[tuple[str | None, dict[str, object]]] = asyncio.Queue()

    async def post(request: web.Request) -> web.Response:
        await received.put((request.headers.get("Authorization"), await request.json()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/gateway/report", post)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        watcher = RouteWatcher("http://unused", session)
        watcher.update(RouteTable(version=1, models={"m": ModelRoute("m", "pending", "waits")}))
        admission = Admission(watcher, queue_timeout=5)
        reporter = Reporter(str(server.make_url("")), session, admission, token="t0k",
                            interval=3600)  # fmt: skip
        task = asyncio.create_task(reporter.run())
        waiting = asyncio.create_task(admission.acquire("m"))
        try:
            auth, body = await asyncio.wait_for(received.get(), timeout=5)
        finally:
            for t in (task, waiting):
                t.cancel()
            await asyncio.gather(task, waiting, return_exceptions=True)
    assert auth == "Bearer t0k"
    report = GatewayReport.from_json(body)
    demand = report.models["m"]
    assert demand.queued == 1 and demand.in_flight == 0 and demand.last_request > 0
    assert 0 <= demand.oldest_wait < 5 and report.queue_timeout == 5  # what a swap is weighed by


async def test_the_supervisor_takes_a_report_only_with_its_token(make_manager: ManagerFactory):
    manager = make_manager()
    app = create_app(manager, manager.events, token="s3cret", demand=manager.demand)
    report = GatewayReport(time=1e12, models={"m": ModelDemand(queued=3)})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        refused = await c.post("/gateway/report", json=report.to_json())
        malformed = await c.post("/gateway/report", json={"models": {"m": {"queued": "x"}}},
                                 headers={"Authorization": "Bearer s3cret"})  # fmt: skip
        taken = await c.post("/gateway/report", json=report.to_json(),
                             headers={"Authorization": "Bearer s3cret"})  # fmt: skip
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    assert malformed.status_code == 422 and "malformed gateway report" in malformed.text
    assert taken.status_code == 204
    assert manager.demand.model("m") == ModelDemand(queued=3)
