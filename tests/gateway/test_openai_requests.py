"""The plain checks in front of the OpenAI request models accept nothing the models refuse, and
accept the usual requests (so that pydantic is not run on them)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.openai_requests import REQUESTS, validate
from gateway.plain_requests import plainly_valid

ROUTES = sorted(REQUESTS)
# Bodies near valid ones: each field valid or at an edge the models care about (empty, zero,
# negative, a bool or a float where an int is expected, a string where a bool is).
edges = st.sampled_from([None, True, False, 0, 1, -1, 0.0, 0.5, -0.5, 2.0, "", "x", [], {}])
message = st.fixed_dictionaries(
    {}, optional={
        "role": st.sampled_from(["user", "system"]) | edges,
        "content": st.sampled_from(["hi", None]) | st.lists(st.just({"type": "text"}) | edges,
                                                            max_size=2) | edges,
        "name": edges,
    },
) | edges  # fmt: skip
bodies = st.fixed_dictionaries(
    {}, optional={
        "model": st.just("m") | edges,
        "stream": st.booleans() | edges,
        "max_tokens": st.integers(1, 64) | edges,
        "max_completion_tokens": st.integers(1, 64) | edges,
        "temperature": st.floats(0, 2) | edges,
        "prompt": st.just("hi") | st.lists(st.sampled_from(["a", 1, [1], ""]), max_size=2) | edges,
        "messages": st.lists(message, max_size=3) | edges,
        "top_p": edges,
    },
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_a_plainly_valid_body_is_valid_for_the_models(route: str, body: dict[str, Any]) -> None:
    if plainly_valid(route, body):
        REQUESTS[route].model_validate(body)  # raises if the plain checks were wrong


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/chat/completions", {
            "model": "m", "stream": True, "max_tokens": 16, "temperature": 0.7,
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        }),
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": False}),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"], "temperature": 0}),
    ],
)  # fmt: skip
def test_the_usual_requests_are_plainly_valid(route: str, body: dict[str, Any]) -> None:
    assert plainly_valid(route, body)


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "m", "prompt": "hi", "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": "", "prompt": "hi"}, "model"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"content": "hi"}]}, "messages"),
    ],
)
def test_a_body_the_plain_checks_refuse_is_judged_by_the_models(
    route: str, body: dict[str, Any], field: str
) -> None:
    assert not plainly_valid(route, body)
    with pytest.raises(ValidationError) as raised:
        validate(route, body)
    assert raised.value.errors()[0]["loc"][0] == field
