"""Is an answer complete? The honesty bar of `sem chaos`, as pure functions over bytes.

Every request of the load asks for exactly `max_tokens` tokens (`ignore_eos`, temperature 0), so a
complete answer is: a 2xx, no error (in the body or as an in-band stream event), exactly one
finish, `length`, after exactly `max_tokens` completion tokens. A stream that stops early but
still ends with a `finish_reason` and `[DONE]` looks successful to a careless client; here it is
FAILED, because the client did not get what it asked for.

Stream tokens are the last usage's count (`stream_options.include_usage`; /generate's last event),
else one per token event, which only the stand-in engine makes true: vLLM merges tokens into one
chunk when busy (and with speculative decoding or `--stream-interval`), hence usage first.

The e2e tests judge their answers here too (tests/e2e/answers.py), with `may_stop` for requests
that let the model stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Route(Enum):
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class RequestKind:
    """One of the mixes the load sends: which route, streamed or not."""

    route: Route
    stream: bool

    @property
    def label(self) -> str:
        name = "chat" if self.route is Route.CHAT else "completions"
        return f"{name}{' stream' if self.stream else ''}"


KINDS = tuple(RequestKind(route, stream) for stream in (True, False) for route in Route)


def request_body(kind: RequestKind, model: str, max_tokens: int, n: int) -> dict[str, Any]:
    """A request that must yield exactly `max_tokens` tokens. The prompt ends in a number, so a
    stand-in engine continues it deterministically (and a resumed stream can be checked)."""
    body: dict[str, Any] = {
        "model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": kind.stream,
    }  # fmt: skip
    if kind.stream:
        body["stream_options"] = {"include_usage": True}
    text = f"Count on from here: {n}"
    if kind.route is Route.CHAT:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def check_answer(kind: RequestKind, status: int, body: bytes, max_tokens: int) -> str | None:
    """None if the answer is complete, else what is wrong with it (one line)."""
    if not 200 <= status < 300:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    if kind.stream:
        return check_stream(body, max_tokens)
    try:
        data = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200].decode(errors='replace')}"
    return check_whole(data, max_tokens)


def check_whole(data: Any, max_tokens: int, *, may_stop: bool = False) -> str | None:
    """A non-streamed answer: one choice with a finish, usage counting every token asked for.
    /generate's answer is its own one choice (`text`, `finish_reason`, `usage`)."""
    if not isinstance(data, dict):
        return f"not a JSON object: {str(data)[:200]}"
    if "error" in data:
        return f"error: {str(data['error'])[:200]}"
    choices = _choices(data)
    finish = choices[0].get("finish_reason") if choices else None
    tokens = (data.get("usage") or {}).get("completion_tokens")
    if not isinstance(tokens, int):
        return f"no usage.completion_tokens (finish {finish!r})"
    return _count_problem(tokens, max_tokens, finish, may_stop)


def check_stream(body: bytes, max_tokens: int, *, may_stop: bool = False) -> str | None:
    """A server-sent event stream: events, one `[DONE]` last, one finish, no error event, and
    `max_tokens` tokens by the last usage (or by token events when there is none). /generate's
    own events (`{"text": delta[, "finish_reason", "usage"]}`) are their one choice."""
    events = [
        line[len("data:") :].strip()
        for block in body.decode(errors="replace").split("\n\n")
        for line in block.splitlines()
        if line.startswith("data:")
    ]
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        return "stream not ended by one [DONE]"
    try:
        chunks = [json.loads(event) for event in events[:-1]]
    except ValueError:
        return "an event is not JSON"
    if not all(isinstance(c, dict) for c in chunks):
        return "an event is not a JSON object"
    if errors := [c["error"] for c in chunks if "error" in c]:
        return f"error event: {str(errors[0])[:200]}"
    choices = [ch for c in chunks for ch in _choices(c)]
    finishes = [ch["finish_reason"] for ch in choices if ch.get("finish_reason")]
    if len(finishes) != 1:
        return f"{len(finishes)} finishes in the stream (want 1)"
    usage = [c["usage"] for c in chunks if isinstance(c.get("usage"), dict)]
    if usage and isinstance(usage[-1].get("completion_tokens"), int):
        tokens = usage[-1]["completion_tokens"]
    else:  # one token an event: true of the stand-in engine, not of a busy vLLM
        tokens = sum(1 for ch in choices if _carries_token(ch))
    return _count_problem(tokens, max_tokens, finishes[0], may_stop)


def _choices(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """An OpenAI chunk's or answer's choices; a /generate event or answer is its own."""
    if "choices" not in chunk:
        return [chunk] if "text" in chunk else []
    choices = chunk["choices"]
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _carries_token(choice: dict[str, Any]) -> bool:
    """A token event: completions and /generate carry `text` (empty when a token ends
    mid-character); chat a delta with content that is not the opening role-only one."""
    if "text" in choice:
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and "content" in delta and "role" not in delta


def _count_problem(tokens: int, max_tokens: int, finish: object, may_stop: bool) -> str | None:
    """Complete: every token asked for, ended by `length`; or, with `may_stop` (no
    `ignore_eos`), fewer ended by a `stop` the model chose."""
    if tokens == max_tokens and finish == "length":
        return None
    if may_stop and finish == "stop" and tokens <= max_tokens:
        return None
    return f"{tokens} of {max_tokens} tokens, finish {finish!r}"
