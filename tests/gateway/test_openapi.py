"""The gateway's OpenAPI spec and its page."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from contract.routes import RouteTable
from tests.gateway.conftest import Rig


async def gateway(rig: Rig) -> TestClient:
    return await rig.gateway(RouteTable(1, {}))


async def test_the_spec_describes_every_route_and_its_request_schema(rig: Rig) -> None:
    client = await gateway(rig)
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) >= {"/generate", "/v1/completions", "/v1/chat/completions",
                                  "/v1/models", "/health", "/metrics"}  # fmt: skip
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    assert chat["properties"]["stream"]["anyOf"][0] == {"type": "boolean"}
    generate = spec["paths"]["/generate"]["post"]
    assert {"400", "413", "422", "502"} <= set(generate["responses"])


async def test_the_docs_page_is_self_contained_html(rig: Rig) -> None:
    client = await gateway(rig)
    response = await client.get("/docs")
    assert response.content_type == "text/html"
    page = await response.text()
    assert "POST /v1/chat/completions" in page and "GenerateRequest" in page
    assert "<script" not in page and "http" not in page.replace("/openapi.json", "")
