"""After a supervisor restart: is the engine an earlier run recorded still ours to take over?

An engine is re-adopted only when it is the very process recorded (pid and start: a reused
pid has another start), it carries the replica's marker in its environment, it was started
from the spec now desired, and, if its HTTP server answers, it serves the model's name.
"""

from __future__ import annotations

import asyncio

from supervisor.config import ModelSpec
from supervisor.engine import AdoptedEngine, replica_marker
from supervisor.probe import EngineProbe
from supervisor.process_start import same_process
from supervisor.store import EngineRecord, spec_digest


def is_our_engine(record: EngineRecord) -> bool:
    """The recorded process is alive and is the replica's engine (not a reused pid)."""
    return same_process(record.pid, record.started) and replica_marker(record.pid) == record.replica


async def why_not_adoptable(
    record: EngineRecord, spec: ModelSpec, probe: EngineProbe
) -> str | None:
    """None if the engine can be re-adopted, else the reason it cannot."""
    if not await asyncio.to_thread(is_our_engine, record):
        return f"engine pid {record.pid} is gone"
    if record.spec_digest != spec_digest(spec):
        return f"engine pid {record.pid} was started from another spec of {spec.name}"
    served = await probe.served_models(f"http://127.0.0.1:{record.port}", record.api_key)
    if served and spec.name not in served:
        return f"port {record.port} serves {', '.join(served)}, not {spec.name}"
    return None  # alive; if it does not answer yet it is still starting, and is watched as such


def adopted_engine(record: EngineRecord) -> AdoptedEngine:
    return AdoptedEngine(
        port=record.port, log_path=record.log_path, pid=record.pid, start=record.started
    )
