"""The gateway's exception tree, mapped to HTTP in one place (`error_response`).

Bodies are {"error": {"type", "message", ...}}: sem's shape, which is also OpenAI's
(`message`, `type`, `param`, `code`), so one body serves /generate and the /v1 routes.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from contract.errors import error_body as wire_error


class GatewayError(Exception):
    status = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.param = param
        self.retry_after = retry_after


class InvalidRequest(GatewayError):
    """A request the gateway cannot route (no such path, wrong method ...)."""

    type = "invalid_request_error"


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidField(GatewayError):
    status = 422
    type = "invalid_request_error"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class BodyTimeout(GatewayError):
    """The client stopped sending its request body (see gateway.limits)."""

    status = 408
    type = "request_timeout"


class Overloaded(GatewayError):
    """The gateway holds as many request bodies as it may (see gateway.body): try again soon."""

    status = 503
    type = "overloaded"


class ModelNotFound(GatewayError):
    status = 404
    type = "model_not_found"


class ModelNotReady(GatewayError):
    status = 503
    type = "model_not_ready"


class ModelFailed(GatewayError):
    """Every replica of the model gave up (crash loop): waiting would not help."""

    status = 503
    type = "model_failed"


class RequestQuarantined(GatewayError):
    """The same request exhausted its retries recently: it is not sent to an engine again."""

    status = 422
    type = "request_quarantined"


class QueueFull(GatewayError):
    status = 429
    type = "queue_full"


class QueueTimeout(GatewayError):
    status = 503
    type = "queue_timeout"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_timeout"


def error_body(exc: GatewayError) -> dict[str, Any]:
    return wire_error(exc.type, exc.message, exc.status, exc.param)


def error_response(exc: GatewayError) -> web.Response:
    body = error_body(exc)
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.Response(
        status=exc.status, text=json.dumps(body), content_type="application/json", headers=headers
    )
