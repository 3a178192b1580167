"""What the gateway app holds: the route watcher, the upstream client, admission control, the
retry budget, the metrics, the front door, and what runs each request's journey through them."""

from __future__ import annotations

from aiohttp import web

from gateway.admission import Admission
from gateway.frontdoor import FrontDoor
from gateway.journey import Journeys
from gateway.metrics import GatewayMetrics
from gateway.retry import RetryBudget
from gateway.routes import RouteWatcher
from gateway.upstream import UpstreamPool

WATCHER = web.AppKey("watcher", RouteWatcher)
UPSTREAM = web.AppKey("upstream", UpstreamPool)
ADMISSION = web.AppKey("admission", Admission)
METRICS = web.AppKey("metrics", GatewayMetrics)
RETRY = web.AppKey("retry", RetryBudget)
JOURNEYS = web.AppKey("journeys", Journeys)
DOOR = web.AppKey("door", FrontDoor)
