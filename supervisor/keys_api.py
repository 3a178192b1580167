"""/keys: the gateway's API keys (supervisor.api_keys), all behind the admin token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, params

from supervisor.api_keys import KeyRing, KeySpec, key_json
from supervisor.demand import DemandBoard


def keys_router(ring: KeyRing, board: DemandBoard, mutating: list[params.Depends]) -> APIRouter:
    """The routes; listing needs the token too (names and limits are the operator's business)."""
    router = APIRouter(dependencies=mutating)

    @router.post("/keys", status_code=201)
    async def create_key(spec: KeySpec) -> dict[str, Any]:
        """A new key: the answer is the only place the key is ever shown."""
        record, key = ring.create(spec)
        return {**key_json(record, None), "key": key}

    @router.get("/keys")
    async def list_keys() -> dict[str, Any]:
        """The keys (no secrets), with their use as the gateway last reported it."""
        usage = board.key_usage
        return {"keys": [key_json(r, usage.get(r.id)) for r in ring.records()]}

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        record = ring.revoke(key_id)
        return key_json(record, board.key_usage.get(record.id))

    return router
