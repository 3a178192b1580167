"""The event loop an object lives on, looked up once.

On Python 3.11 every `asyncio.get_running_loop()` (and `asyncio.current_task()` without a loop)
makes a getpid system call: on the gateway's hot path they were ~3% of a request's CPU (py-spy,
native frames). An object that serves one loop for its life (the engine pool, the progress board)
keeps it instead.
"""

from __future__ import annotations

import asyncio


class OnLoop:
    """Mixin: `self.loop`, the running loop at first use."""

    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop
