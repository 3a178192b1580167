"""The OpenAI request bodies, as far as sem reads them: checked at the door (a bad field is a
422 naming it, not an engine failure) and described in the gateway's OpenAPI spec
(gateway.openapi). Every other field is a sampling parameter passed to the engine as it came
(the raw bytes are forwarded, not these models).

`validate` checks a body against these models. Building pydantic's model of every request was
~6% of the gateway's CPU per request under load (py-spy), so a body whose fields have exactly
the expected types is accepted by plain checks first (gateway.plain_requests: they accept
nothing the models refuse, tests/gateway/test_openai_requests.py); any other body is the models'
to judge and to word the error for.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway.plain_requests import plainly_valid


class Message(BaseModel):
    """One chat message: a role and its content (text, or a list of parts)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class OpenAIRequest(BaseModel):
    """What both OpenAI routes read."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="a model sem serves (GET /v1/models)")
    stream: StrictBool | None = Field(default=None, description="server-sent events if true")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)


REQUESTS: dict[str, type[OpenAIRequest]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}


def validate(path: str, body: dict[str, Any]) -> None:
    """Raise pydantic's ValidationError if `body` is not a valid request for `path`."""
    if not plainly_valid(path, body):
        REQUESTS[path].model_validate(body)
