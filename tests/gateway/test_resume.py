"""Resuming a broken stream, without HTTP: what was sent, what to ask next, how to splice."""

from __future__ import annotations

import json

from gateway.resume import Partial, Splice, StreamLog, continuation, finish_events
from gateway.retry import RetryBudget
from gateway.sse import events


def sse(chunk: dict[str, object] | str) -> bytes:
    return b"data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk)).encode() + b"\n\n"


def completion_chunk(text: str, finish: str | None = None) -> dict[str, object]:
    return {"id": "cmpl-1", "created": 7, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}  # fmt: skip


def chat_chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    return {"id": "chat-1", "created": 7, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


def test_the_log_forwards_whole_events_only_and_keeps_them():
    log = StreamLog()
    first = sse(completion_chunk(" a"))
    assert log.complete(first[:10]) == b""
    assert log.complete(first[10:] + sse(completion_chunk(" b"))[:5]) == first
    assert log.sent == first


def test_what_never_reached_the_client_leaves_the_log_even_across_reads():
    log = StreamLog()
    for read in (b"data: 1\n\n", b'data: 2\n\ndata: {"error": {}}\n\n', b"data: [DONE]\n\n"):
        log.complete(read)
    unsent = b'data: {"error": {}}\n\ndata: [DONE]\n\n'  # two reads, handed over joined
    log.unsend(len(unsent))
    assert log.sent == b"data: 1\n\ndata: 2\n\n"


def test_partial_reads_back_text_tokens_and_identity():
    raw = sse(completion_chunk(" one")) + sse(completion_chunk(" two"))
    partial = Partial.of(raw)
    assert (partial.id, partial.created, partial.text, partial.tokens) == (
        "cmpl-1",
        7,
        " one two",
        2,
    )
    assert not partial.finished and not partial.done
    chat = Partial.of(
        sse(chat_chunk({"role": "assistant", "content": ""})) + sse(chat_chunk({"content": "Hi"}))
    )
    assert (chat.text, chat.tokens) == ("Hi", 1)


def test_completions_continue_from_prompt_plus_text_with_fewer_tokens():
    partial = Partial(text=" one two", tokens=2)
    body = {"model": "m", "prompt": "Count:", "max_tokens": 10, "echo": True, "temperature": 0}
    follow = continuation("/v1/completions", body, partial)
    assert follow == {"model": "m", "prompt": "Count: one two", "max_tokens": 8, "echo": False,
                      "temperature": 0}  # fmt: skip
    assert continuation("/v1/completions", {"prompt": "x"}, partial)["max_tokens"] == 14  # type: ignore[index]
    assert continuation("/v1/completions", {"prompt": [1, 2, 3]}, partial) is None
    assert continuation("/v1/completions", {"prompt": "x", "n": 2}, partial) is None
    assert continuation("/v1/completions", {"prompt": "x", "max_tokens": 2}, partial) is None


def test_chat_continues_the_partial_assistant_message():
    partial = Partial(text="Hel", tokens=2)
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    follow = continuation("/v1/chat/completions", body, partial)
    assert follow is not None
    assert follow["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert follow["continue_final_message"] is True and follow["add_generation_prompt"] is False
    assert follow["max_tokens"] == 3
    assert body["messages"] == [{"role": "user", "content": "Hi"}], "the original is untouched"


def test_splice_keeps_the_stream_identity_drops_the_second_role_and_adds_up_usage():
    partial = Partial(id="chat-1", created=7, text="Hel", tokens=2)
    splice = Splice(partial, chat=True)
    opening = {
        "id": "chat-9",
        "created": 9,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    }
    assert splice.event(json.dumps(opening).encode()) is None
    out = splice.event(json.dumps(chat_chunk({"content": "lo"}) | {"id": "chat-9"}).encode())
    assert out is not None and json.loads(events(out)[0])["id"] == "chat-1"
    usage = {
        "id": "chat-9",
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    fixed = json.loads(events(splice.event(json.dumps(usage).encode()) or b"")[0])["usage"]
    assert fixed == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert splice.event(b"[DONE]") == b"data: [DONE]\n\n"


def test_a_stream_cut_after_its_last_token_is_finished_by_the_gateway():
    partial = Partial(id="cmpl-1", created=7, text=" a", tokens=1)
    tail = finish_events(partial, chat=False)
    assert [json.loads(e)["choices"][0]["finish_reason"] for e in events(tail)[:1]] == ["length"]
    assert events(tail)[-1] == b"[DONE]"
    assert finish_events(Partial(done=True), chat=False) == b""


def test_a_request_that_used_its_attempts_is_quarantined():
    budget = RetryBudget(max_attempts=3, quarantine=60)
    digest = budget.digest("m", "/v1/completions", b'{"prompt": "boom"}')
    assert budget.quarantined_until(digest) is None
    budget.exhausted(digest)
    assert budget.quarantined_until(digest) is not None
    assert budget.quarantined_until(budget.digest("m", "/v1/completions", b"{}")) is None
