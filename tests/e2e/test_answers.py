"""The answer check every e2e load uses: a short, aborted or broken answer is a failure."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e.answers import answer_problem

ASK = {"model": "m", "prompt": "hi", "max_tokens": 3}


def reply(data: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=data)


def stream(*chunks: dict[str, Any], done: bool = True) -> httpx.Response:
    events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
    return httpx.Response(200, text="".join(events))


def generate(tokens: int, finish: str = "length") -> httpx.Response:
    usage = {"completion_tokens": tokens}
    return reply({"model": "m", "text": "a b", "finish_reason": finish, "usage": usage})


def test_a_non_stream_answer_with_every_token_asked_for_is_whole():
    assert answer_problem("/generate", ASK, generate(3)) is None


@pytest.mark.parametrize(("tokens", "finish"), [(2, "length"), (3, "abort"), (2, "abort")])
def test_a_non_stream_answer_short_or_aborted_is_a_failure(tokens: int, finish: str):
    problem = answer_problem("/generate", ASK, generate(tokens, finish))
    assert problem is not None and problem.startswith(f"{tokens} of 3 tokens, finish {finish!r}")


def test_a_stop_the_model_chose_is_whole_unless_eos_was_ignored():
    assert answer_problem("/generate", ASK, generate(1, "stop")) is None
    assert answer_problem("/generate", {**ASK, "ignore_eos": True}, generate(1, "stop"))


def test_an_http_error_is_a_failure_starting_with_its_status():
    problem = answer_problem("/generate", ASK, reply({"error": {"message": "gone"}}, 404))
    assert problem is not None and problem.startswith("404 ")


def completion_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_a_stream_with_every_token_and_one_finish_is_whole():
    chunks = [completion_chunk(" a"), completion_chunk(" b"), completion_chunk(" c", "length")]
    assert answer_problem("/v1/completions", {**ASK, "stream": True}, stream(*chunks)) is None


def test_a_stream_that_finishes_after_fewer_tokens_is_a_failure():
    chunks = [completion_chunk(" a"), completion_chunk(" b", "length")]
    problem = answer_problem("/v1/completions", {**ASK, "stream": True}, stream(*chunks))
    assert problem is not None and problem.startswith("2 of 3 tokens")


def test_a_stream_counts_the_usage_the_engine_reports_when_asked_for():
    ask = {**ASK, "stream": True, "stream_options": {"include_usage": True}}
    chunks = [completion_chunk(" a"), completion_chunk("", "length")]
    usage = {"choices": [], "usage": {"completion_tokens": 3}}
    assert answer_problem("/v1/completions", ask, stream(*chunks, usage)) is None
    problem = answer_problem("/v1/completions", ask, stream(*chunks))
    assert problem is not None and problem.startswith("stream without the usage asked for")


def test_a_chat_stream_does_not_count_its_opening_role_chunk():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    tokens = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in ("a", "b")]
    last = {"choices": [{"index": 0, "delta": {"content": "c"}, "finish_reason": "length"}]}
    ask = {**ASK, "stream": True}
    assert answer_problem("/v1/chat/completions", ask, stream(role, *tokens, last)) is None
    problem = answer_problem("/v1/chat/completions", ask, stream(role, tokens[0], last))
    assert problem is not None and problem.startswith("2 of 3 tokens")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (stream({"text": " a"}, {"text": " b"}, {"text": " c", "finish_reason": "length"},
                done=False), "stream not ended by one [DONE]"),
        (stream({"text": " a"}, {"error": {"message": "EngineCore encountered an issue"}}),
         "error event"),
        (stream({"text": " a"}, {"text": " b"}, {"text": " c"}), "0 finishes in the stream"),
    ],
)  # fmt: skip
def test_a_generate_stream_cut_broken_or_unfinished_is_a_failure(
    response: httpx.Response, expected: str
):
    problem = answer_problem("/generate", {**ASK, "stream": True}, response)
    assert problem is not None and problem.startswith(expected)


def test_a_request_that_does_not_say_how_many_tokens_it_wants_cannot_be_checked():
    with pytest.raises(ValueError, match="max_tokens"):
        answer_problem("/generate", {"model": "m", "prompt": "hi"}, generate(3))
