"""What the benches' stand-in engines answer: a chat completion, and SSE chunks of a stream.

Standard library only: bench/servers.py's apps run under servers (granian) from other venvs.
"""

from __future__ import annotations

import json

CHUNKS, CHUNK_GAP = 64, 0.005  # a stream: 64 chunks, 5 ms apart
COMPLETION = json.dumps({
    "id": "cmpl-b", "object": "chat.completion", "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()  # fmt: skip
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'  # noqa: E501
DONE = b"data: [DONE]\n\n"
