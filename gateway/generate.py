"""/generate, sem's own simple route over the engine's /v1/completions: its request, its answer
and its stream format. The journey and the relay are those of the OpenAI routes; only the shapes
differ.

    POST /generate {model, prompt, max_tokens?, temperature?, stream?, ...sampling parameters}
    -> {model, text, finish_reason, usage}
    -> with stream: true, `data: {"text": delta}` events (`finish_reason` and `usage` on the
       last), `[DONE]`

A stream's events may carry several tokens each, or none (vLLM merges the outputs a busy server
has not sent yet; a token that ends mid-character gives empty text): `usage` on the last event is
the count, the engine's own (across a resumed stream, the whole answer's).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway.sse import events, sse

ENGINE_PATH = "/v1/completions"  # what /generate is served by
# A stream's engine request asks usage in every chunk, kept through the relay (and adjusted by a
# resume) so that the finishing chunk carries the answer's count.
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


class GenerateRequest(BaseModel):
    """/generate's body. Unknown fields are sampling parameters, passed to the engine as is."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    stream: StrictBool = False  # a JSON boolean: the string "false" is refused, not true


class GenerateAnswer:
    """The engine's completion reshaped into /generate's answer (named after the model the
    client asked for, whatever name the engine serves it under)."""

    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, completion: dict[str, Any]) -> dict[str, Any]:
        usage = completion.get("usage") or {}
        choice = completion["choices"][0]
        return {
            "model": self.model,
            "text": choice.get("text", ""),
            "finish_reason": choice.get("finish_reason"),
            "usage": {k: usage.get(k, 0) for k in USAGE_FIELDS},
        }


def generate_events(raw: bytes) -> bytes:
    """/generate's stream format from the engine's completion events: `data: {"text": delta}`
    (with `finish_reason` and `usage` on the last), then `data: [DONE]`; error events pass as
    they are, the usage-only event goes."""
    out = []
    for data in events(raw):
        if data == b"[DONE]":
            out.append(sse("[DONE]"))
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            out.append(sse(chunk))
        for choice in chunk.get("choices", []):
            delta: dict[str, Any] = {"text": choice.get("text", "")}
            if choice.get("finish_reason"):
                delta["finish_reason"] = choice["finish_reason"]
                if usage := chunk.get("usage"):
                    delta["usage"] = {k: usage.get(k, 0) for k in USAGE_FIELDS}
            out.append(sse(delta))
    return b"".join(out)
