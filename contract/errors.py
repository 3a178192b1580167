"""The one JSON error shape of both APIs: {"error": {"type", "message", "param", "code"}}.

It is also OpenAI's shape (`message`, `type`, `param`, `code`), so one body serves the gateway's
/generate, its /v1 routes and the supervisor's admin API.
"""

from __future__ import annotations

from typing import Any


def error_body(type_: str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """The body of an error answer; `code` repeats the HTTP status for clients that log bodies."""
    return {"error": {"type": type_, "message": message, "param": param, "code": status}}
