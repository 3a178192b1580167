"""API keys at the front door: who may call /generate and /v1/*, which models, how often.

Keys are off by default (the loopback demo); they are on as soon as the route table carries one
(created with `sem keys create`), or always with `--require-keys`. The table carries each key's
sha256, never the key: the presented `Authorization: Bearer <key>` is hashed and looked up by
hash (a dict lookup by hash leaks nothing that matters: the hashes are not secret, and finding a
key from timing the lookup of its hash would mean inverting sha256).

Each key may have two token buckets: requests per minute, taken one per request before it is
served; and tokens per minute, charged after the answer with the completion tokens it cost
(the journey's `obs.tokens`), so a key over its budget is refused (429 with Retry-After) until
the bucket refills.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from contract.report import KeyUsage
from contract.routes import KeyRoute, key_hash
from gateway.errors import InvalidApiKey, KeyRateLimited, ModelNotAllowed
from gateway.routes import RouteWatcher

Clock = Callable[[], float]


class Bucket:
    """A token bucket of `per_minute`, full at the start, refilled continuously."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self.level = float(per_minute)
        self._at = now

    def _refill(self, now: float) -> None:
        rate = self.per_minute / 60.0
        self.level = min(float(self.per_minute), self.level + (now - self._at) * rate)
        self._at = now

    def wait(self, now: float) -> float:
        """Seconds until the bucket holds one whole token (0: it does now)."""
        self._refill(now)
        return 0.0 if self.level >= 1 else (1 - self.level) * 60.0 / self.per_minute

    def take(self, amount: float, now: float) -> None:
        """Take `amount`, into debt if need be (tokens are charged after they were spent)."""
        self._refill(now)
        self.level -= amount


@dataclass
class _Account:
    """One key's buckets and usage (kept across route tables while its limits stay)."""

    route: KeyRoute
    requests: Bucket | None
    tokens: Bucket | None
    used_requests: int = 0
    used_tokens: int = 0
    last_used: float = 0.0


class KeyGate:
    """Checks each request's API key against the route table's keys (see the module doc)."""

    def __init__(
        self, watcher: RouteWatcher, require: bool = False, clock: Clock = time.monotonic
    ) -> None:
        self._watcher = watcher
        self._require = require
        self._clock = clock
        self._by_hash: dict[str, KeyRoute] = {}
        self._accounts: dict[str, _Account] = {}
        watcher.subscribe(self._table_changed)
        self._table_changed()

    @property
    def on(self) -> bool:
        return self._require or bool(self._by_hash)

    def identify(self, authorization: str | None) -> KeyRoute | None:
        """The key presented in `authorization`; None when keys are off; InvalidApiKey (401)
        when it is missing or unknown."""
        if not self.on:
            return None
        scheme, _, presented = (authorization or "").partition(" ")
        key = self._by_hash.get(key_hash(presented.strip())) if scheme.lower() == "bearer" else None
        if key is None:
            raise InvalidApiKey(
                "missing or unknown API key (send it as Authorization: Bearer <key>)"
            )
        return key

    def admit(self, authorization: str | None, model: str) -> str | None:
        """The id of the key a request for `model` may go with (None: keys are off); raises
        InvalidApiKey (401), ModelNotAllowed (403) or KeyRateLimited (429)."""
        key = self.identify(authorization)
        if key is None:
            return None
        if key.models is not None and model not in key.models:
            raise ModelNotAllowed(f"this API key may not use model {model!r}", param="model")
        account = self._account(key)
        now = self._clock()
        for bucket, what in ((account.tokens, "tokens"), (account.requests, "requests")):
            if bucket is not None and (wait := bucket.wait(now)) > 0:
                raise KeyRateLimited(
                    f"this API key is over its {what} per minute ({bucket.per_minute})",
                    retry_after=wait,
                )
        if account.requests is not None:
            account.requests.take(1, now)
        account.used_requests += 1
        account.last_used = time.time()
        return key.id

    def charge(self, key_id: str, tokens: int) -> None:
        """A request of key `key_id` was answered with `tokens` completion tokens."""
        account = self._accounts.get(key_id)
        if account is None:
            return  # revoked while the request ran
        account.used_tokens += tokens
        if account.tokens is not None:
            account.tokens.take(tokens, self._clock())

    def usage(self) -> dict[str, KeyUsage]:
        """Per key id: requests and tokens since the gateway started, when last used."""
        return {
            kid: KeyUsage(a.used_requests, a.used_tokens, a.last_used)
            for kid, a in self._accounts.items()
        }

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_KeyCollector(self))

    def _account(self, key: KeyRoute) -> _Account:
        account = self._accounts.get(key.id)
        if account is None or account.route != key:  # new, or its limits changed
            now = self._clock()
            rpm, tpm = key.requests_per_minute, key.tokens_per_minute
            fresh = _Account(
                key, Bucket(rpm, now) if rpm else None, Bucket(tpm, now) if tpm else None
            )
            if account is not None:
                fresh.used_requests, fresh.used_tokens = account.used_requests, account.used_tokens
                fresh.last_used = account.last_used
            account = self._accounts[key.id] = fresh
        return account

    def _table_changed(self) -> None:
        keys = self._watcher.table.keys
        self._by_hash = {k.hash: k for k in keys}
        ids = {k.id for k in keys}
        for gone in set(self._accounts) - ids:  # revoked: its usage goes with it
            del self._accounts[gone]


class _KeyCollector(Collector):
    """sem_gateway_key_requests_total and sem_gateway_key_tokens_total, by key id."""

    def __init__(self, gate: KeyGate) -> None:
        self._gate = gate

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "sem_gateway_key_requests", "Requests admitted per API key", labels=["key"]
        )
        tokens = CounterMetricFamily(
            "sem_gateway_key_tokens", "Completion tokens charged per API key", labels=["key"]
        )
        for kid, usage in sorted(self._gate.usage().items()):
            requests.add_metric([kid], usage.requests)
            tokens.add_metric([kid], usage.tokens)
        yield requests
        yield tokens
