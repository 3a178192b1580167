"""Generated tokens, read from engine answers without parsing them as JSON (the hot path relays
bytes; a full parse per answer or per streamed chunk would cost more than the relaying)."""

from __future__ import annotations

import json
import re
from typing import Final

from gateway.jsonscan import int_at, value_at

_USAGE_KEY: Final = '"usage":'
_TOKENS_KEY: Final = '"completion_tokens":'


def completion_tokens(body: bytes) -> int | None:
    """`usage.completion_tokens` of an OpenAI answer: its last usage object's (in a stream's
    tail, the last chunk's), searched from the end, where usage is (gateway.jsonscan)."""
    view = body.decode("latin-1")
    at = view.rfind(_USAGE_KEY)
    while at >= 0:
        start = value_at(view, at + len(_USAGE_KEY))
        if view[start : start + 1] == "{":  # not null; vLLM's usage nests no object before it
            end = view.find("}", start)
            key = view.find(_TOKENS_KEY, start, end if end >= 0 else len(view))
            if key >= 0 and (count := int_at(view, key + len(_TOKENS_KEY))) is not None:
                return count
        at = view.rfind(_USAGE_KEY, 0, at)
    return None


def stream_tokens(events: list[bytes]) -> int:
    """Tokens of a relayed stream, from its complete events (pieces as relayed, in order): the
    last usage's count if the engine sent one, else one per event (vLLM: one token per chunk).
    Counted once at the end, in C: an event ends with a blank line, and JSON data cannot hold
    a raw newline."""
    tail = b"".join(events[-2:])
    usage = completion_tokens(tail)
    if usage is not None:
        return usage
    return sum(piece.count(b"\n\n") for piece in events) - (b"data: [DONE]" in tail)


# What the gateway asks of every engine stream: usage in every chunk (vLLM's
# `continuous_usage_stats`, which needs `include_usage`), so that a resume and the judgment of a
# stream's end use the engine's own token counts (chunks may carry several tokens, or none).
ENGINE_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
_OPTIONS_TAIL = b',"stream_options":{"include_usage":true,"continuous_usage_stats":true}}'

# A chunk's usage object (vLLM's per-chunk usage has no nested object), and a usage-only event
# (`"choices":[]`). Quotes inside generated text are escaped, so text cannot match either.
_CHUNK_USAGE = re.compile(rb',\s*"usage":\s*\{[^{}]*\}')
_USAGE_ONLY = re.compile(rb'data: \{[^\n]*"choices":\s*\[\][^\n]*\n\n')


def with_engine_usage(raw: bytes, body: dict[str, object]) -> bytes:
    """A stream request's bytes, asking the engine for usage in every chunk. Byte-level when the
    client set no stream options (the usual case): the request is not serialized again."""
    if "stream_options" not in body:
        return raw[: raw.rstrip().rfind(b"}")] + _OPTIONS_TAIL
    options = body["stream_options"]
    merged = {**(options if isinstance(options, dict) else {}), **ENGINE_STREAM_OPTIONS}
    return json.dumps({**body, "stream_options": merged}).encode()


class UsageFilter:
    """Strips from engine events the usage the client did not ask for: per-chunk usage unless it
    asked `continuous_usage_stats`, the final usage-only event unless it asked `include_usage`.
    Byte-level, on every streamed piece: one scan of its bytes (a piece without usage, or vLLM's
    compact form; a scan is most of what a piece costs), a regex only for other forms and for
    the final usage-only event."""

    __slots__ = ("continuous", "final")

    def __init__(self, body: dict[str, object]) -> None:
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        self.final = bool(options.get("include_usage"))
        self.continuous = self.final and bool(options.get("continuous_usage_stats"))

    def strip(self, out: bytes, view: str | None = None) -> bytes:
        """`out` (complete events) as the client gets them; `view`: `out` as latin-1, when the
        caller has it (the scans run on it: see gateway.ending.ends_stream)."""
        if self.continuous:
            return out
        if view is None:
            view = out.decode("latin-1")
        at = view.find('"usage"')
        if at < 0:
            return out
        # vLLM's compact chunk: its usage right after a non-empty choices list, cut by hand;
        # anything else (the usage-only event's `"choices":[]`, other JSON) to the regexes
        end = view.find("}", at) + 1
        if not end or view[at - 3 : at + 9] != '}],"usage":{':
            return self._other(out)
        if view.find('"usage"', end) < 0:  # the usual piece: one event
            return out[: at - 1] + out[end:]
        return out[: at - 1] + self.strip(out[end:])

    def _other(self, out: bytes) -> bytes:
        """Any form: the final usage-only event (`"choices":[]`) dropped or kept, per-chunk
        usage cut by a regex."""
        final = _USAGE_ONLY.search(out)
        if final is not None:
            keep = out[final.start() : final.end()] if self.final else b""
            return self.strip(out[: final.start()]) + keep + self.strip(out[final.end() :])
        return _CHUNK_USAGE.sub(b"", out)
