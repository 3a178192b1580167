"""Is an engine's end of stream the model's, or a cut that looks like one?

vLLM stopped with SIGTERM (mode=abort, the supervisor's way to stop a frozen engine) ends every
stream in flight with a `finish_reason` and `[DONE]` under HTTP 200, after a fraction of the
tokens asked for (engine-notes.md). Relayed as it is, the client takes a truncated answer for a
complete one. So the end of a stream is judged, once per stream, from its last events:

- `finish_reason` "abort" is never the model's;
- "length" (or no finish at all) with fewer tokens than asked (`max_tokens`,
  `max_completion_tokens`) is a cut, "stop" is the model's choice (an eos or a stop string);
- an end from a replica being stopped (no longer ready in the route table) is a cut unless it is
  provably complete ("stop", or every token asked for).

Tokens are the engine's own count (`usage.completion_tokens`, which the gateway asks for in
every chunk, see gateway.usage). With several choices (`n` > 1) usage adds them up: the stream
is short when the sum is under `n` x the limit and no choice stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from gateway.jsonscan import string_at, value_at
from gateway.resume import VLLM_DEFAULT_MAX_TOKENS


def asked_tokens(path: str, body: dict[str, Any]) -> int | None:
    """The tokens a request asks for at most; None when it sets no limit (chat: the context)."""
    for key in ("max_completion_tokens", "max_tokens"):
        if isinstance(body.get(key), int):
            return int(body[key])
    return None if path.endswith("/chat/completions") else VLLM_DEFAULT_MAX_TOKENS


_LIMIT = re.compile(rb'"max(?:_completion)?_tokens":\s*(\d+)')


def asked_limit(request: bytes) -> int | None:
    """`asked_tokens` of a request's bytes, unparsed (a non-stream answer's judgment; None:
    no limit found)."""
    found = _LIMIT.findall(request)
    return min(int(n) for n in found) if found else None


# Final: compiled code has them as constants, not looked up in the module on every piece.
_FINISH_KEY: Final = '"finish_reason":'
_DONE_TAIL: Final = "[DONE]\n\n"
_DONE_EVENT: Final = "data: [DONE]\n\n"
_DONE_EVENT_UNSPACED: Final = "data:[DONE]\n\n"


def finish_reasons(tail: bytes) -> list[str]:
    """The finish reasons in `tail` (raw events, or a whole answer), in order; a null one (a
    choice not finished) is left out. Found by key (gateway.jsonscan)."""
    view = tail.decode("latin-1")
    reasons = []
    at = view.find(_FINISH_KEY)
    while at >= 0:
        at += len(_FINISH_KEY)
        reason = string_at(view, at)
        if reason is not None:
            reasons.append(reason)
        at = view.find(_FINISH_KEY, at)
    return reasons


def ends_with_done(view: str) -> bool:
    """Complete events (`view`: see `ends_stream`) end with the [DONE] event: their last event,
    not "[DONE]" written by the model (which a search of the bytes would take for the end, and
    hold the rest of the stream back until the engine closed it). No scan: the tail only."""
    if not view.endswith(_DONE_TAIL):  # the usual piece: one comparison
        return False
    return view.endswith(_DONE_EVENT) or view.endswith(_DONE_EVENT_UNSPACED)


def ends_stream(view: str, by_finish: bool = True) -> bool:
    """Complete events hold a finish or [DONE]: what is held back until the end (`by_finish`
    False: [DONE] only, as with several choices, which finish one by one). One scan whatever
    the JSON's spacing (a scan is most of the cost: this runs on every streamed piece).

    `view` is the events' bytes decoded as latin-1: the same characters at the same indexes,
    made once per piece for all its checks, because compiled code calls str's search directly
    where bytes' goes through CPython's argument parsing (twice the cost of the search)."""
    if ends_with_done(view):
        return True
    if not by_finish:
        return False
    at = view.find(_FINISH_KEY)
    while at >= 0:
        at = value_at(view, at + len(_FINISH_KEY))
        if view[at : at + 1] == '"':  # a reason, not null
            return True
        at = view.find(_FINISH_KEY, at)
    return False


@dataclass(frozen=True)
class Ending:
    """What is known of a stream's end when the engine closed it."""

    reasons: list[str]  # finish reasons seen in its last events
    tokens: int | None  # completion tokens of the whole stream, by the engine's count
    asked: int | None
    choices: int  # n
    replica_ready: bool  # the replica is still ready in the route table

    def cut(self) -> str | None:
        """Why this end is not the model's; None if it is (or cannot be told from one)."""
        if "abort" in self.reasons:
            return "ended the stream with finish_reason abort"
        wanted = -1 if self.asked is None else self.asked * self.choices
        tokens = -1 if self.tokens is None else self.tokens  # -1: not known
        known = wanted >= 0 and tokens >= 0
        complete = self.reasons == ["stop"] * self.choices or (known and tokens >= wanted)
        if not self.replica_ready and not complete:
            return "ended the stream while being stopped"
        if "stop" not in self.reasons and known and tokens < wanted:
            finish = self.reasons[0] if self.reasons else "none"
            return (f"ended the stream after {self.tokens} of {wanted} tokens"
                    f" (finish_reason {finish})")  # fmt: skip
        return None
