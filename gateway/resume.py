"""Going on with a stream whose engine died: what the client has seen, and what to ask next.

While a stream is relayed, `StreamLog` keeps the bytes of the complete SSE events the client has
received (nothing is parsed on the way: a failure is rare, so its cost is paid only then). When
the engine dies mid-stream, `Partial.of` reads those events back, `continuation` builds the
request that goes on from there, and `Splice` rewrites the new stream's events so that the
client sees one stream: the same id and creation time, no second role delta, and usage that
counts the tokens of both parts.

- completions: the prompt plus the text sent so far, `max_tokens` less the tokens sent, no echo;
- chat: the messages plus the partial assistant message, `continue_final_message: true`,
  `add_generation_prompt: false`, `max_tokens`/`max_completion_tokens` less the tokens sent.

With temperature 0 the continuation is the text an uninterrupted run gives whenever the text sent
so far tokenizes back into the tokens that produced it (true of ordinary text; a model that emits
unusual token splits, e.g. random weights, may take another path from there). Requests with
several choices (`n` > 1) or a non-text prompt are not resumed (they are replayed only while
nothing has reached the client; after that their stream ends with an error event).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.sse import events

DONE = b"[DONE]"
VLLM_DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions without max_tokens


class StreamLog:
    """The complete SSE events relayed so far; `complete(chunk)` holds back a partial event.

    The pieces are kept as they are (no copy on the hot path); `sent` joins them when needed."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self._tail = b""

    @property
    def sent(self) -> bytes:
        return b"".join(self.parts)

    def complete(self, chunk: bytes) -> bytes:
        """The part of `tail + chunk` that ends an event: safe to forward; it is logged."""
        if not self._tail and chunk.endswith(b"\n\n"):  # the usual case: whole events
            self.parts.append(chunk)
            return chunk
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n\n") + 2
        if end == 1:  # no event boundary yet
            self._tail = data
            return b""
        ready, self._tail = data[:end], data[end:]
        self.parts.append(ready)
        return ready

    def drop_ending(self, held: bytes) -> None:
        """The last pieces, `held` (a stream's end that was not the model's), reached the
        client as `unfinished(held)`."""
        size = 0
        while size < len(held) and self.parts:
            size += len(self.parts.pop())
        self.parts.append(unfinished(held))

    def unsend(self, size: int) -> None:
        """The last `size` bytes logged never went to the client (they may span pieces: the
        relay logs each read as it comes, and hands the task what it cannot write, joined)."""
        while size > 0 and self.parts:
            last = self.parts.pop()
            if len(last) > size:
                self.parts.append(last[:-size])
            size -= len(last)


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in one chunk (completions' `text`, chat's `delta.content`)."""
    text = ""
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


@dataclass
class Partial:
    """What a client has received of a stream."""

    id: str | None = None
    created: int | None = None
    text: str = ""
    # The engine's count (`usage.completion_tokens` of the last chunk that had one: the gateway
    # asks for it in every chunk); without usage, one per chunk that carried text.
    tokens: int = 0
    finished: bool = False  # a finish_reason was sent: only usage and [DONE] may be missing
    done: bool = False  # [DONE] was sent

    @classmethod
    def of(cls, raw: bytes) -> Partial:
        """What the events in `raw` (one attempt's, as the engine sent them) gave the client."""
        partial = cls()
        counted: int | None = None
        for data in events(raw):
            if data == DONE:
                partial.done = True
                continue
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                continue
            if not isinstance(chunk, dict) or "error" in chunk:
                continue
            partial.id = partial.id or chunk.get("id")
            partial.created = partial.created or chunk.get("created")
            if text := chunk_text(chunk):
                partial.text += text
                partial.tokens += 1
            usage = chunk.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                counted = usage["completion_tokens"]
            if any(c.get("finish_reason") for c in chunk.get("choices") or []):
                partial.finished = True
        if counted is not None:
            partial.tokens = counted
        return partial

    def then(self, later: Partial) -> Partial:
        """This, followed by what a later attempt (a continuation) sent."""
        return Partial(
            self.id or later.id, self.created or later.created, self.text + later.text,
            self.tokens + later.tokens, later.finished, later.done,
        )  # fmt: skip


def not_resumable(path: str, body: dict[str, Any]) -> str | None:
    """Why a stream of `body` cannot be resumed once it started; None if it can."""
    if (body.get("n") or 1) > 1 or (body.get("best_of") or 1) > 1:
        return "a stream with several choices (n > 1) cannot be resumed"
    if path.endswith("/chat/completions"):
        if not isinstance(body.get("messages"), list):
            return "a chat stream without a message list cannot be resumed"
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return "a stream whose prompt is not one text (token ids, several) cannot be resumed"
    return None


def continuation(path: str, body: dict[str, Any], partial: Partial) -> dict[str, Any] | None:
    """The request that continues `body` after `partial`; None if it cannot be resumed (see
    `not_resumable`) or nothing is left to generate."""
    if not_resumable(path, body) is not None:
        return None
    follow = dict(body)
    if path.endswith("/chat/completions"):
        messages = body["messages"]
        follow["messages"] = [*messages, {"role": "assistant", "content": partial.text}]
        follow["continue_final_message"] = True
        follow["add_generation_prompt"] = False
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                follow[key] = body[key] - partial.tokens
    else:
        prompt = body["prompt"]
        prompt = prompt if isinstance(prompt, str) else prompt[0]
        follow["prompt"] = prompt + partial.text
        follow["echo"] = False
        follow["max_tokens"] = (body.get("max_tokens") or VLLM_DEFAULT_MAX_TOKENS) - partial.tokens
    if any(
        isinstance(follow.get(k), int) and follow[k] < 1
        for k in ("max_tokens", "max_completion_tokens")
    ):
        return None  # everything asked for was sent: nothing to continue
    return follow


def unfinished(held: bytes) -> bytes:
    """A stream's end without its end: the text it carried stays, its finish_reason, its
    usage-only event and its [DONE] go (the stream is resumed from there)."""
    out = []
    for data in events(held):
        if data == DONE:
            continue
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            continue
        if not isinstance(chunk, dict) or not chunk.get("choices"):
            continue
        for choice in chunk["choices"]:
            choice["finish_reason"] = None
            choice.pop("stop_reason", None)
        if chunk_text(chunk) or chunk.get("usage"):
            out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    return b"".join(out)


@dataclass
class Splice:
    """Rewrites a continuation's events into the stream the client already has."""

    partial: Partial
    chat: bool
    _first: bool = field(default=True)

    def event(self, data: bytes) -> bytes | None:
        """The event to send for `data` (a `data:` payload), or None to drop it."""
        if data == DONE:
            return b"data: [DONE]\n\n"
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            return None
        if self.partial.id is not None:
            chunk["id"] = self.partial.id
        if self.partial.created is not None:
            chunk["created"] = self.partial.created
        if self.chat and self._first:
            for choice in chunk.get("choices") or []:
                (choice.get("delta") or {}).pop("role", None)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            sent = self.partial.tokens
            usage["prompt_tokens"] = max(0, int(usage.get("prompt_tokens") or 0) - sent)
            usage["completion_tokens"] = int(usage["completion_tokens"]) + sent
        opening = (
            self._first
            and chunk.get("choices")
            and not chunk_text(chunk)
            and not any(c.get("finish_reason") for c in chunk["choices"])
        )
        if opening:
            return None  # the continuation's opening (role-only) chunk: already sent once
        self._first = False
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def finish_events(partial: Partial, chat: bool) -> bytes:
    """What ends a stream that had sent all the tokens it asked for when the engine died (its
    finish, if the engine did not send it: "length" is then the truth)."""
    if partial.finished or partial.done:
        return b"" if partial.done else b"data: [DONE]\n\n"
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if chat:
        choice["delta"] = {}
    else:
        choice["text"] = ""
    chunk = {"id": partial.id, "created": partial.created, "choices": [choice],
             "object": "chat.completion.chunk" if chat else "text_completion"}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
