"""Generated tokens, read from engine answers without parsing them as JSON (the hot path relays
bytes; a full parse per answer or per streamed chunk would cost more than the relaying)."""

from __future__ import annotations

import re

# The last usage object's completion_tokens. Inside JSON strings quotes are escaped, so generated
# text cannot fake it.
_COMPLETION_TOKENS = re.compile(rb'"usage":\s*\{[^}]*?"completion_tokens":\s*(\d+)')


def completion_tokens(body: bytes) -> int | None:
    """`usage.completion_tokens` of an OpenAI answer (the last one, in a stream's tail)."""
    found = _COMPLETION_TOKENS.findall(body)
    return int(found[-1]) if found else None


class StreamTally:
    """Counts the events of a relayed server-sent event stream, chunk by chunk, in C: an event
    ends with a blank line, and JSON data cannot hold a raw newline. At the end, tokens are the
    usage chunk's count if the engine sent one, else one per event (vLLM: one token per chunk)."""

    __slots__ = ("_ended_line", "_last", "_previous", "events")

    def __init__(self) -> None:
        self.events = 0
        self._ended_line = False
        self._previous = self._last = b""

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(b"\n\n")
        if self._ended_line and chunk[:1] == b"\n":  # a blank line split between two reads
            self.events += 1
        self._ended_line = chunk[-1:] == b"\n"
        self._previous, self._last = self._last, chunk

    def tokens(self) -> int:
        tail = self._previous + self._last
        usage = completion_tokens(tail)
        if usage is not None:
            return usage
        return self.events - (b"data: [DONE]" in tail)
