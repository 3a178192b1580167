"""An engine on a cluster node, as its replica sees it: the EngineHandle of a node agent's engine.

Its exit is one long-running call on the agent, made once and shared by every `wait()`: the
replica polls `wait()` with timeouts, and a fresh remote call each time would pile up on the
agent. When the node dies the call fails: to the replica, the engine has exited.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.exceptions import RayError


@dataclass
class RayEngine:
    port: int
    log_path: Path  # on the engine's node; `log()` reads it there
    pid: int  # on the engine's node
    replica_id: str
    agent: Any  # the node agent's ActorHandle
    api_key: str | None = None  # the one it demands (re-adoption carries it to the gateway)
    _returncode: int | None = None
    _exit: asyncio.Future[Any] | None = field(default=None, repr=False)

    @property
    def pgid(self) -> int:
        return self.pid  # its own group, as on one box (on its node, not ours)

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        """Until the engine exits, or its node is lost (-1)."""
        if self._exit is None:
            self._exit = asyncio.wrap_future(self.agent.wait.remote(self.replica_id).future())
            # Read at once, so an answer that comes after every waiter gave up is not reported.
            self._exit.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self._returncode is None:
            try:
                self._returncode = int(await asyncio.shield(self._exit))
            except RayError:
                self._returncode = -1  # the agent, and the node with it, is gone
        return self._returncode

    async def stop(self, grace: float) -> bool:
        """Stop the engine's group on its node; True if it had to be killed. A lost node has
        nothing left to stop."""
        try:
            killed = bool(await self.agent.stop.remote(self.replica_id, grace))
        except RayError:
            killed = False
        if self._returncode is None:
            self._returncode = -1
        return killed

    async def log(self, lines: int = 20) -> str:
        """The engine log's last lines, read on its node ("" if the node is gone)."""
        try:
            return str(await self.agent.log_tail.remote(self.replica_id, lines))
        except RayError:
            return ""
