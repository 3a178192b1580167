"""The retry budget: how often a request is sent again after engine failures, and which requests
are not sent again at all.

A request whose engine fails (dies, hangs, errors) is retried on another ready replica, or on
the restarted one, up to `max_attempts` engine failures. A request that used them all may be
what kills engines (a "poison" prompt): the exact same request (model, route and body bytes) is
then refused at once for `quarantine` seconds, so a client that retries it in a loop cannot take
the model down, one engine after another, into the supervisor's crash-loop limit.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from contract import defaults


@dataclass
class RetryBudget:
    max_attempts: int = 3  # engine failures one request may meet
    quarantine: float = defaults.QUARANTINE
    replay_timeout: float = (
        defaults.REPLAY_TIMEOUT
    )  # how long a retry waits for a ready replica (covers a restart)
    suspect_for: float = 10.0  # an engine that failed a request gets nothing new this long
    # s without a byte from a replica whose streams are producing: stalled (gateway.progress)
    stall_after: float = defaults.STALL_AFTER
    _quarantined: dict[bytes, float] = field(default_factory=dict)  # digest -> until

    @staticmethod
    def digest(model: str, route: str, body: bytes) -> bytes:
        return hashlib.blake2b(b"%s\0%s\0%s" % (model.encode(), route.encode(), body)).digest()

    @property
    def quarantined(self) -> bool:
        """Any request quarantined (else a request's digest need not be computed)."""
        return bool(self._quarantined)

    def quarantined_until(self, digest: bytes) -> float | None:
        """When the quarantine of this request ends; None if it is not quarantined."""
        until = self._quarantined.get(digest)
        if until is not None and until <= time.time():
            del self._quarantined[digest]
            return None
        return until

    def exhausted(self, digest: bytes) -> None:
        """The request failed `max_attempts` times: refuse it for a while."""
        now = time.time()
        self._quarantined = {d: u for d, u in self._quarantined.items() if u > now}
        self._quarantined[digest] = now + self.quarantine
