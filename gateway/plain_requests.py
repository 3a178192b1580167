"""The usual OpenAI request body, accepted by plain type checks before pydantic's models
(gateway.openai_requests) are asked: a module of its own so that it is compiled with the hot path
(gateway.native; mypyc does not compile pydantic's models)."""

from __future__ import annotations

from typing import Any


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
