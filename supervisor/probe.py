"""Talking to a running engine over HTTP: is it healthy, is it idle, what does it serve."""

from __future__ import annotations

import re

import httpx

from supervisor.liveness import Counters, parse_counters

_GAUGE = re.compile(r"^vllm:num_requests_(running|waiting)\{[^}]*\}\s+([0-9.eE+-]+)$", re.M)


class EngineProbe:
    """One shared HTTP client for all engines (owned here, closed by `aclose`)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._client = httpx.AsyncClient(timeout=timeout, trust_env=False)

    async def healthy(self, base_url: str) -> bool:
        """True on `/health` 200. Connection refused while the engine loads is just False."""
        try:
            response = await self._client.get(f"{base_url}/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _metrics(self, base_url: str) -> str | None:
        """The engine's /metrics text; None if it does not answer with one."""
        try:
            response = await self._client.get(f"{base_url}/metrics")
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    async def outstanding(self, base_url: str) -> int | None:
        """Requests running + waiting in the engine, from its /metrics; None if unknown."""
        text = await self._metrics(base_url)
        values = [float(v) for _, v in _GAUGE.findall(text or "")]
        return int(sum(values)) if values else None

    async def counters(self, base_url: str) -> Counters | None:
        """Its token counter and running requests (liveness.py); None if unknown."""
        text = await self._metrics(base_url)
        return None if text is None else parse_counters(text)

    async def served_models(self, base_url: str) -> list[str]:
        """The model names the engine serves (its /v1/models); empty if it does not answer."""
        try:
            response = await self._client.get(f"{base_url}/v1/models")
            data = response.json() if response.status_code == 200 else {}
            return [str(m["id"]) for m in data.get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return []

    async def aclose(self) -> None:
        await self._client.aclose()
