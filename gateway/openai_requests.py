"""The OpenAI request bodies, as far as sem reads them: checked at the door (a bad field is a
422 naming it, not an engine failure) and described in the gateway's OpenAPI spec
(gateway.openapi). Every other field is a sampling parameter passed to the engine as it came
(the raw bytes are forwarded, not these models).

`validate` checks a body against these models. Building pydantic's model of every request was
~6% of the gateway's CPU per request under load (py-spy), so a body whose fields have exactly
the expected types is accepted by plain checks first (`plainly_valid`: it accepts nothing the
models refuse, tests/gateway/test_openai_requests.py); any other body is the models' to judge and
to word the error for.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool


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


def plainly_valid(path: str, body: dict[str, Any]) -> bool:
    """True when `body` is certainly valid for `path`, told by exact types (no coercion);
    False says nothing: the models decide."""
    model = body.get("model")
    if type(model) is not str or not model:
        return False
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        return False
    for name in ("max_tokens", "max_completion_tokens"):
        limit = body.get(name)
        if limit is not None and (type(limit) is not int or limit < 1):
            return False
    temperature = body.get("temperature")
    if temperature is not None and (type(temperature) not in (int, float) or temperature < 0):
        return False
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        return type(messages) is list and all(_plain_message(m) for m in messages)
    prompt = body.get("prompt")
    if type(prompt) is str:
        return prompt != ""
    return type(prompt) is list and prompt != [] and all(type(p) is str for p in prompt)


def _plain_message(message: object) -> bool:
    if type(message) is not dict or type(message.get("role")) is not str:
        return False
    content = message.get("content")
    if content is None or type(content) is str:
        return True
    return type(content) is list and all(type(part) is dict for part in content)
