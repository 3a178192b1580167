"""What an operator looks at: GET /metrics (Prometheus), GET /throughput, and the status page.

All reads, no token needed. The page (status_page.html beside this module) is one file with
inline CSS and JS; it reads /models, /resources, /throughput and the /events stream itself.
Its Content-Security-Policy allows nothing from elsewhere, so an external asset could not load.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from supervisor.metrics import CONTENT_TYPE, SupervisorMetrics

PAGE = Path(__file__).with_name("status_page.html")
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
    " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


class _Page:
    """The page's text, read from disk once (in a worker thread) on the first request."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._text: str | None = None

    async def text(self) -> str:
        if self._text is None:
            self._text = await asyncio.to_thread(self._path.read_text, encoding="utf-8")
        return self._text


def metrics_router(metrics: SupervisorMetrics, page: Path = PAGE) -> APIRouter:
    router = APIRouter()
    status_page = _Page(page)

    @router.get("/metrics", response_class=Response)
    async def get_metrics() -> Response:
        """Prometheus text: the supervisor's state and every ready engine's `vllm:` metrics."""
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/throughput")
    async def throughput() -> dict[str, Any]:
        """Finished requests and generated tokens per second per model, from the engines'
        counters over the last `window_s` seconds of scrapes."""
        rates = await metrics.rates()
        return {
            "window_s": metrics.throughput.window,
            "models": {name: rate.to_json() for name, rate in sorted(rates.items())},
        }

    @router.get("/status", response_class=HTMLResponse)
    async def status() -> HTMLResponse:
        return HTMLResponse(
            await status_page.text(),
            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"},
        )

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/status")

    return router
