"""Where does the gateway's time go? A py-spy profile summed by part of the request's path.

Reads py-spy's raw (collapsed) output and gives each sample to the deepest frame that names a
part (sem's upstream client, admission, aiohttp's server, the event loop...), so a table of
shares, and microseconds when given the CPU per request or stream that bench/gateway_overhead.py
measured. Time spent in C under a Python frame (httptools, uvloop's socket calls) counts for
that frame's part.

    py-spy record --pid GATEWAY_PID -r 250 -d 15 --format raw -o ns64.raw --nonblocking
    .venv/bin/python bench/profile_summary.py ns64.raw --cpu-us 435
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

LOOP = "event loop (uvloop: epoll, socket reads, callbacks)"
SERVER = "aiohttp server: parse, dispatch, request objects"
WRITING = "aiohttp server: response writing (socket writes included)"
JOURNEY = "journey bookkeeping (progress, stalls, ending)"
ADMISSION = "admission + replica choice"
METRICS = "metrics (prometheus_client)"
PARTS = [  # (substring of a frame, part); the deepest frame that matches decides
    ("prometheus_client", METRICS), ("gateway/metrics", METRICS),
    ("json/", "JSON (request body, answer inspection)"),
    ("gateway/upstream.py", "upstream client (gateway/upstream.py)"),
    ("gateway/admission.py", ADMISSION), ("contract/routes.py", ADMISSION),
    ("gateway/progress", JOURNEY), ("gateway/ending", JOURNEY), ("gateway/journey", JOURNEY),
    ("gateway/usage.py", "usage stripping/counting (gateway/usage.py)"),
    ("gateway/proxy.py", "relay (gateway/proxy.py)"),
    ("aiohttp/http_writer", WRITING), ("aiohttp/web_response", WRITING), ("aiohttp/", SERVER),
    ("gateway/", "handler (gateway/app.py and the rest)"),
    ("asyncio/", LOOP), ("uvloop", LOOP),
]  # fmt: skip


def part_of(stack: str) -> str:
    """The part a sample's stack (frames joined by `;`, outermost first) belongs to."""
    for frame in reversed(stack.split(";")):
        for needle, part in PARTS:
            if needle in frame:
                return part
    return "other (no Python frame: GC, native)"


def summarize(lines: list[str]) -> tuple[Counter[str], int]:
    """Samples per part, and the total."""
    parts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if count.isdigit():
            parts[part_of(stack)] += int(count)
    return parts, sum(parts.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--cpu-us", type=float, help="CPU per request or stream, microseconds")
    args = parser.parse_args()
    parts, total = summarize(args.raw.read_text().splitlines())
    print(f"| part | share of {total} samples |" + (" us |" if args.cpu_us else ""))
    print("|---|---|" + ("---|" if args.cpu_us else ""))
    for part, samples in parts.most_common():
        share = samples / total
        us = f" {share * args.cpu_us:.0f} |" if args.cpu_us else ""
        print(f"| {part} | {share:.0%} |{us}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
