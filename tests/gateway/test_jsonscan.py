"""An answer's finish reasons and token count, read by searching for their keys
(gateway.jsonscan), are what a regex over the whole answer finds: the regexes the searches
replaced are the reference, on answers and stream tails of every shape (any spacing, several
choices and usage objects, null values, generated text that spells the keys out)."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ending import ends_stream, finish_reasons
from gateway.usage import completion_tokens

# What the gateway read these with before (the reference).
_FINISH = re.compile(rb'"finish_reason":\s*"(\w+)"')
_COMPLETION_TOKENS = re.compile(rb'"usage":\s*\{[^}]*?"completion_tokens":\s*(\d+)')


def reference_reasons(tail: bytes) -> list[str]:
    return [m.decode() for m in _FINISH.findall(tail)]


def reference_tokens(body: bytes) -> int | None:
    found = _COMPLETION_TOKENS.findall(body)
    return int(found[-1]) if found else None


# Text that spells the keys out: inside a JSON string its quotes are escaped.
texts = st.sampled_from(
    ["x", "", 'a "usage": {"completion_tokens": 9}', '"finish_reason": "stop"', "é ü 中 🙂", "}"]
)
reasons = st.sampled_from(["stop", "length", "abort", "tool_calls", None])
usages = st.none() | st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 10**6),
        "total_tokens": st.integers(0, 10**6),
        "completion_tokens": st.integers(0, 10**6),
    },
    optional={"prompt_tokens_details": st.none() | st.just({"cached_tokens": 0})},
).flatmap(lambda usage: st.permutations(list(usage.items())).map(dict))  # keys in any order
choices = st.lists(
    st.fixed_dictionaries({"index": st.integers(0, 3),
                           "delta": st.fixed_dictionaries({"content": texts}),
                           "finish_reason": reasons}),
    max_size=3,
)  # fmt: skip
chunks = st.fixed_dictionaries(
    {"id": st.just("chatcmpl-1"), "object": st.just("chat.completion.chunk"), "choices": choices},
    optional={"usage": usages},
)
separators = st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :  ")])


def event(chunk: dict[str, Any], spacing: tuple[str, str]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=spacing, ensure_ascii=False).encode() + b"\n\n"


@settings(max_examples=400, deadline=None)
@given(st.lists(chunks, max_size=4), separators, st.booleans())
def test_reads_by_key_find_what_the_regexes_found(
    events: list[dict[str, Any]], spacing: tuple[str, str], done: bool
) -> None:
    tail = b"".join(event(chunk, spacing) for chunk in events) + (b"data: [DONE]\n\n" * done)
    assert finish_reasons(tail) == reference_reasons(tail)
    assert completion_tokens(tail) == reference_tokens(tail)
    view = tail.decode("latin-1")
    assert ends_stream(view) == (bool(reference_reasons(tail)) or done)


def test_a_whole_answer_and_the_edges() -> None:
    answer = json.dumps({
        "choices": [{"index": 0, "message": {"content": 'say "usage": {"completion_tokens": 1}'},
                     "finish_reason": "length"},
                    {"index": 1, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 32, "total_tokens": 37},
    }).encode()  # fmt: skip
    assert finish_reasons(answer) == ["length", "stop"]
    assert completion_tokens(answer) == 32
    assert completion_tokens(b'{"usage": null}') is None
    assert completion_tokens(b'{"usage": {"completion_tokens": null}}') is None
    assert completion_tokens(b'{"usage": {"completion_tokens":') is None  # cut short
    assert finish_reasons(b'{"finish_reason": null, "x": "finish_reason"}') == []
    assert finish_reasons(b'{"finish_reason": "') == []  # cut short
