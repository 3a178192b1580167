"""Why an engine failed to start, read from its exit code and the tail of its log.

Three kinds, each with its own cure:
- `OUT_OF_MEMORY`: vLLM found too little memory at start (its free-memory check, no room for
  the KV cache, a KV cache too small for max_model_len, CUDA's own out-of-memory). Retrying on
  the same GPU with the same budget fails the same way: the replica goes back to pending and is
  placed again with a raised need (measure.py), on another GPU if one fits.
- `BAD_CONFIG`: bad engine arguments or a model vLLM cannot serve. No retry can help: the
  replica fails at once, with the engine's own error line as the reason.
- `OTHER`: anything else (a crash, a signal): the restart backoff as before.

`classify` is pure: a table of vLLM's own texts (quoted from vLLM 0.32's source, the same texts
tests/gpusim/engine.py prints) matched against the log's lines, the last match winning (the
error a traceback ends with is the one that ended the engine).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.engine import EngineHandle

TAIL_BYTES = 64 * 1024  # a vLLM traceback ends well within this


class FailureKind(StrEnum):
    OUT_OF_MEMORY = "out_of_memory"
    BAD_CONFIG = "bad_config"
    OTHER = "other"


@dataclass(frozen=True)
class StartFailure:
    kind: FailureKind
    line: str  # the engine's own error line ("" if none matched)
    kv_available: int | None = None  # bytes, from vLLM's "Available KV cache memory" line

    def describe(self, exit_code: int | None) -> str:
        what = {
            FailureKind.OUT_OF_MEMORY: "out of memory at start",
            FailureKind.BAD_CONFIG: "engine refused its configuration",
            FailureKind.OTHER: f"engine exited with code {exit_code} while starting",
        }[self.kind]
        return f"{what}: {self.line}" if self.line else what


# (kind, pattern): vLLM's and torch's texts, and argparse's.
_PATTERNS: list[tuple[FailureKind, re.Pattern[str]]] = [
    (FailureKind.OUT_OF_MEMORY, re.compile(p))
    for p in (
        # vllm/v1/worker/utils.py request_memory
        r"Free memory on device .* is less than desired GPU memory utilization",
        # vllm/v1/core/kv_cache_utils.py check_enough_kv_cache_memory
        r"No available memory for the cache blocks",
        r"To serve at least one request with the model's max seq len",
        r"KV cache is needed, which is larger than the available KV cache memory",
        # torch (torch.OutOfMemoryError / RuntimeError from the CUDA caching allocator)
        r"CUDA out of memory",
        r"torch\.OutOfMemoryError",
    )
] + [
    (FailureKind.BAD_CONFIG, re.compile(p))
    for p in (
        r"error: unrecognized arguments",  # argparse
        r"error: argument ",  # argparse: a bad value or a missing one
        r"error: the following arguments are required",
        r"is not supported",  # vLLM: "... is not supported for ..."/ unsupported architectures
        r"Unsupported CPU attention configuration",  # the head_dim one (engine-notes.md)
        r"Model architectures \[.*\] are not supported",
        r"validation error for (?:Model|Engine|Vllm|Cache|Parallel|Scheduler)Config",  # pydantic
        r"User-specified max_model_len .* is greater than the derived max_model_len",
    )
]

_KV_LINE = re.compile(r"Available KV cache memory: (-?[0-9.]+) GiB")


def classify(exit_code: int | None, log_tail: str) -> StartFailure:
    """What ended an engine that exited while starting (pure)."""
    kind, line = FailureKind.OTHER, ""
    for text in log_tail.splitlines():
        stripped = text.strip()
        for candidate, pattern in _PATTERNS:
            if pattern.search(stripped):
                kind, line = candidate, stripped[:600]
                break
    if exit_code is not None and exit_code < 0:  # killed by a signal: not the engine's verdict
        kind, line = FailureKind.OTHER, ""
    return StartFailure(kind, line, kv_available(log_tail))


def kv_available(log_tail: str, ranks: int = 1) -> int | None:
    """Bytes vLLM found for its KV cache at its last start: the smallest of the last `ranks`
    "Available KV cache memory" lines (one a rank; the log is appended to across starts)."""
    found = _KV_LINE.findall(log_tail)[-ranks:]
    return int(min(float(v) for v in found) * 1024**3) if found else None


def read_tail(path: Path, size: int = TAIL_BYTES) -> str:
    """The last `size` bytes of a log, as text ("" if it cannot be read). Small and local:
    cheap enough to read on the event loop."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def log_tail(process: EngineHandle, lines: int = 3) -> str:
    """The last lines of the engine's log, joined: the reason a start failed is usually there."""
    text = read_tail(process.log_path, 4096)
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])[-400:]
