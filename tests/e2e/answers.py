"""Is an answer whole? Every e2e request is checked here, streamed or not, on every route.

An answer is whole when it carries exactly the completion tokens asked for (`max_tokens`, ended
by `length`), or fewer ended by a `stop` the model chose (not possible with `ignore_eos`). A
stream must also end with one finish and one `[DONE]` and carry no error event: a stream that
finishes early, or says `abort`, is a failed request even under HTTP 200.

Tokens are counted from `usage` when the answer has it (non-streamed answers; /generate streams'
last event; OpenAI streams asked with `stream_options: {include_usage: true}`), else one per token
event, which only the stand-in engine makes true: a busy vLLM merges tokens into one chunk.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

Body = dict[str, Any]


def answer_problem(path: str, body: Body, response: httpx.Response) -> str | None:
    """None if `response` is a whole answer to `body` sent to `path`, else what is wrong with it
    (starting with the HTTP status when that is not 200)."""
    if response.status_code != 200:
        return f"{response.status_code} {response.text[:300]}"
    if body.get("stream"):
        return _stream_problem(path, body, response.text)
    data = response.json()
    choice = data if path == "/generate" else (data.get("choices") or [{}])[0]
    tokens = (data.get("usage") or {}).get("completion_tokens")
    problem = _count_problem(body, choice.get("finish_reason"), tokens)
    return problem and f"{problem}: {str(data)[:300]}"


def _stream_problem(path: str, body: Body, text: str) -> str | None:
    events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        return f"stream not ended by one [DONE]: {text[-300:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {text[-300:]}"
    if path == "/generate":
        choices = chunks  # /generate's own events: {"text": delta[, "finish_reason": ...]}
    else:
        choices = [ch for c in chunks for ch in c.get("choices") or []]
    finishes = [ch["finish_reason"] for ch in choices if ch.get("finish_reason")]
    if len(finishes) != 1:
        return f"{len(finishes)} finishes in the stream: {text[-300:]}"
    usages = [c["usage"] for c in chunks if c.get("usage")]
    if usages:
        tokens = usages[-1].get("completion_tokens")
    elif (body.get("stream_options") or {}).get("include_usage"):
        return f"stream without the usage asked for: {text[-300:]}"
    else:
        tokens = sum(1 for ch in choices if _carries_token(ch))
    problem = _count_problem(body, finishes[0], tokens)
    return problem and f"{problem}: {text[-300:]}"


def _carries_token(choice: dict[str, Any]) -> bool:
    """A token event: completions and /generate carry `text`; chat a delta that is not the
    opening role-only one."""
    if "text" in choice:
        return True
    delta = choice.get("delta") or {}
    return "content" in delta and "role" not in delta


def _count_problem(body: Body, finish: object, tokens: object) -> str | None:
    asked = body.get("max_tokens") or body.get("max_completion_tokens")
    if not isinstance(asked, int):
        raise ValueError("a checked request says how many tokens it wants (max_tokens)")
    if not isinstance(tokens, int):
        return f"no completion token count (finish {finish!r})"
    if finish == "length" and tokens == asked:
        return None
    if finish == "stop" and not body.get("ignore_eos") and tokens <= asked:
        return None
    return f"{tokens} of {asked} tokens, finish {finish!r}"
