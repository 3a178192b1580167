"""POST /gateway/report: the gateway's demand and load (contract.report) onto the board."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, params

from contract.report import GatewayReport
from supervisor.demand import DemandBoard
from supervisor.errors import InvalidSpec


def report_router(board: DemandBoard, mutating: list[params.Depends]) -> APIRouter:
    """The route; it needs the admin token when one is set (a forged report could unload
    models or restart engines)."""
    router = APIRouter()

    @router.post("/gateway/report", status_code=204, dependencies=mutating)
    async def post_report(body: dict[str, Any] = Body(...)) -> None:  # noqa: B008
        try:
            report = GatewayReport.from_json(body)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidSpec(f"malformed gateway report: {exc!r}") from None
        board.post(report)

    return router
