"""What a replica may ask of the gateway's side: its load, and whether it is routed to still.

The replica decides (liveness, drain, when to signal its engine); this view answers from the
gateway's report (demand.py) and its long-polls of the route table (route_table.py). A replica
without one (tests, `sem plan`) goes by the engine alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from contract.report import ReplicaLoad
from supervisor.demand import DemandBoard

if TYPE_CHECKING:  # route_table imports the models, which import the replicas, which import us
    from supervisor.route_table import RoutePublisher


@dataclass(frozen=True)
class GatewayView:
    board: DemandBoard
    routes: RoutePublisher
    route_wait: float = 2.0  # the longest an engine's signal waits for the gateway's table

    def load(self, replica_id: str) -> ReplicaLoad | None:
        """The gateway's view of the replica; None without a fresh report."""
        return self.board.replica(replica_id)

    async def unrouted(self) -> bool:
        """Until the gateway holds the route table as it is now (published after the replica
        left it), at most `route_wait` s; False if that did not happen in time."""
        return await self.routes.gateway_holds(self.routes.table.version, self.route_wait)
