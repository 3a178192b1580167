"""Server-sent events, the little the gateway needs of them: write one event, read the `data:`
payloads back (for a resume and for /generate's own stream format; the hot path parses nothing)."""

from __future__ import annotations

import json
from typing import Any


def sse(data: dict[str, Any] | str) -> bytes:
    """One event: `data` as JSON (a string as it is, e.g. `[DONE]`)."""
    body = data if isinstance(data, str) else json.dumps(data)
    return f"data: {body}\n\n".encode()


def events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE byte string, in order."""
    out = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out
