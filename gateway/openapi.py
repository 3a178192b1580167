"""The gateway's OpenAPI spec (GET /openapi.json) and a page that shows it (GET /docs).

The spec is generated from the request models the gateway validates with (gateway.generate,
gateway.openai_requests), so it cannot drift from them; answers and errors are described by
hand, once. /docs is a small self-contained HTML page (no script, no CDN asset: sem's machines
and many users' boxes are offline) that lists each route with its request schema, its answers
and its error codes: readable, not interactive (curl or the OpenAI SDK are the way to try it).
"""

from __future__ import annotations

import html
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway.generate import GenerateRequest
from gateway.openai_requests import ChatCompletionRequest, CompletionRequest

ERROR = {
    "type": "object",
    "description": "sem's and OpenAI's error shape",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
            "required": ["type", "message"],
        }
    },
    "required": ["error"],
}
ERRORS = {
    "400": "invalid JSON (too deep, NaN/Infinity, not an object); the engine refused the request",
    "404": "no such model",
    "408": "the request body stopped coming (--body-timeout)",
    "413": "request body over --max-body",
    "422": "a field is invalid (named by `param`), or the request is quarantined",
    "429": "the model's queue is full",
    "502": "the engines failed the request",
    "503": "no slot in time, the model is not ready or failed, or bodies fill --max-body-memory",
    "504": "the engine did not answer within --upstream-timeout",
}
ANY_OBJECT = {"type": "object", "additionalProperties": True}


class _Spec:
    """Builds the spec: request models become components, routes refer to them."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {"Error": ERROR}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        self.schemas.update(schema.pop("$defs", {}))
        self.schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def post(self, summary: str, model: type[BaseModel], stream: str) -> dict[str, Any]:
        errors = {
            code: {"description": why, "content": {"application/json": {"schema": _error_ref()}}}
            for code, why in ERRORS.items()
        }
        ok = {
            "description": f"the answer (JSON), or with `stream: true` {stream}",
            "content": {
                "application/json": {"schema": ANY_OBJECT},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
        return {
            "post": {
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": self.ref(model)}},
                },
                "responses": {"200": ok} | errors,
            }
        }


def _error_ref() -> dict[str, str]:
    return {"$ref": "#/components/schemas/Error"}


def _get(summary: str, media: str = "application/json") -> dict[str, Any]:
    schema = ANY_OBJECT if media == "application/json" else {"type": "string"}
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": summary, "content": {media: {"schema": schema}}}},
        }
    }


def build_spec() -> dict[str, Any]:
    spec = _Spec()
    paths = {
        "/generate": spec.post(
            "sem's simple completion: {model, text, finish_reason, usage}",
            GenerateRequest,
            '`data: {"text": ...}` events, then `[DONE]`',
        ),
        "/v1/completions": spec.post(
            "OpenAI completions (passed to the engine)", CompletionRequest, "OpenAI's chunks"
        ),
        "/v1/chat/completions": spec.post(
            "OpenAI chat completions (passed to the engine)",
            ChatCompletionRequest,
            "OpenAI's chunks",
        ),
        "/v1/models": _get("the models the gateway knows, with their state"),
        "/health": _get("the gateway's status and its ready models"),
        "/metrics": _get("Prometheus metrics", "text/plain"),
        "/openapi.json": _get("this spec"),
        "/docs": _get("this spec as a page", "text/html"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sem gateway", "version": "1"},
        "paths": paths,
        "components": {"schemas": spec.schemas},
    }


def render_page(spec: dict[str, Any]) -> str:
    """The spec as one readable HTML page: each route, its request schema, its answers."""
    parts = [
        "<!doctype html><meta charset=utf-8><title>sem gateway API</title>",
        "<style>body{font:15px sans-serif;max-width:60em;margin:2em auto}"
        "pre{background:#f4f4f4;padding:.6em;overflow:auto}</style>",
        "<h1>sem gateway API</h1><p>The machine-readable spec: <a href=/openapi.json>"
        '/openapi.json</a>. Errors are <code>{"error": {type, message, param, code}}</code>.',
    ]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2>{method.upper()} {html.escape(path)}</h2>")
            parts.append(f"<p>{html.escape(op['summary'])}</p>")
            body = op.get("requestBody")
            if body is not None:
                name = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                schema = json.dumps(spec["components"]["schemas"][name], indent=2)
                parts.append(f"<h3>Request: {name}</h3><pre>{html.escape(schema)}</pre>")
            answers = "".join(
                f"<li><b>{code}</b> {html.escape(r['description'])}"
                for code, r in op["responses"].items()
            )
            parts.append(f"<ul>{answers}</ul>")
    return "\n".join(parts)


def add_routes(app: web.Application) -> None:
    """GET /openapi.json and /docs, both built once."""
    spec = build_spec()
    spec_body = json.dumps(spec).encode()
    page = render_page(spec)

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=spec_body, content_type="application/json")

    async def docs(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
