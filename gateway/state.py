"""What the gateway app holds: the route watcher, the upstream client, the balancer."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from gateway.routes import RouteWatcher
from sem.routes import ReplicaRoute


class Balancer:
    """Least outstanding requests across a model's ready replicas (ties: the first listed)."""

    def __init__(self) -> None:
        self.outstanding: dict[str, int] = {}

    def pick(self, replicas: tuple[ReplicaRoute, ...]) -> ReplicaRoute:
        return min(replicas, key=lambda r: self.outstanding.get(r.id, 0))

    def acquire(self, replica: ReplicaRoute) -> None:
        self.outstanding[replica.id] = self.outstanding.get(replica.id, 0) + 1

    def release(self, replica: ReplicaRoute) -> None:
        self.outstanding[replica.id] -= 1


WATCHER = web.AppKey("watcher", RouteWatcher)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
BALANCER = web.AppKey("balancer", Balancer)
