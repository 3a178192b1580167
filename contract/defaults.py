"""Defaults shared by the daemons and the CLI, each defined once."""

from __future__ import annotations

HOST = "127.0.0.1"
GATEWAY_PORT = 8000
SUPERVISOR_PORT = 8001
SUPERVISOR_URL = f"http://{HOST}:{SUPERVISOR_PORT}"

QUEUE_TIMEOUT = 60.0  # s a request waits in the gateway's queue for a ready replica
MAX_QUEUE = 1024  # requests queued per model before 429
REPLAY_TIMEOUT = 180.0  # s a retry waits for a ready replica (covers an engine restart)
UPSTREAM_TIMEOUT = 600.0  # s an engine call may take, end to end
DRAIN_TIMEOUT = 30.0  # s in-flight requests get when a model is removed (`sem rm`)
SHUTDOWN_DRAIN = 10.0  # s per model when the supervisor stops every engine
QUARANTINE = 600.0  # s a request that exhausted its retries is refused
STALL_AFTER = 3.0  # s without a byte from an engine whose streams are producing: stalled
