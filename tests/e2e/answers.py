"""Is an answer whole? Every e2e request is checked here, streamed or not, on every route, by
`sem chaos`'s own judge (sem/chaos/check.py): exactly the completion tokens asked for
(`max_tokens`, ended by `length`), or fewer ended by a `stop` the model chose (not possible with
`ignore_eos`); a stream ends with one finish and one `[DONE]` and carries no error event. A stream
that finishes early, or says `abort`, is a failed request even under HTTP 200.
"""

from __future__ import annotations

from typing import Any

import httpx

from sem.chaos.check import check_stream, check_whole

Body = dict[str, Any]


def answer_problem(path: str, body: Body, response: httpx.Response) -> str | None:
    """None if `response` is a whole answer to `body` sent to `path`, else what is wrong with it
    (starting with the HTTP status when that is not 200), with the answer's text."""
    if response.status_code != 200:
        return f"{response.status_code} {response.text[:300]}"
    asked = body.get("max_tokens") or body.get("max_completion_tokens")
    if not isinstance(asked, int):
        raise ValueError("a checked request says how many tokens it wants (max_tokens)")
    may_stop = not body.get("ignore_eos")
    if not body.get("stream"):
        problem = check_whole(response.json(), asked, may_stop=may_stop)
        return problem and f"{problem}: {response.text[:300]}"
    if (body.get("stream_options") or {}).get("include_usage") and '"usage"' not in response.text:
        problem = "stream without the usage asked for"
    else:
        problem = check_stream(response.content, asked, may_stop=may_stop)
    return problem and f"{problem}: {response.text[-300:]}"
