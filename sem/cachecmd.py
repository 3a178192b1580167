"""`sem cache`: fetch models into the supervisor's cache with progress bars, list it, free it.

sem cache SOURCE [SOURCE ...] [--no-wait]   fetch (in parallel), progress until done
sem cache ls [--json]                       cached models and download jobs
sem cache rm SOURCE [SOURCE ...]            free a model's files (refused while in use)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from supervisor.units import human

Request = Callable[..., Any]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="+", metavar="SOURCE",
                   help="hf://org/name[@revision] or path:/dir; or `ls`; or `rm SOURCE...`",
                   )  # fmt: skip
    p.add_argument("--no-wait", action="store_true", help="start the downloads and return")
    p.add_argument("--json", action="store_true", help="ls: print JSON")


def run(args: argparse.Namespace, request: Request) -> int:
    first, rest = args.items[0], args.items[1:]
    if first in ("ls", "list"):
        return _list(args, request)
    if first == "rm":
        if not rest:
            print("sem cache rm: name the SOURCE(s) to free", file=sys.stderr)
            return 2
        return _remove(args, request, rest)
    return _fetch(args, request, args.items)


def _fetch(args: argparse.Namespace, request: Request, sources: list[str]) -> int:
    jobs = request(args, "POST", "/cache", json={"models": sources})["jobs"]
    if args.no_wait:
        for job in jobs:
            print(_line(job))
        return 0
    ids = {job["id"] for job in jobs}
    display = _Bars() if sys.stderr.isatty() else _Lines()
    try:
        while True:
            display.show(jobs)
            if all(job["finished"] is not None for job in jobs):
                break
            listed = request(args, "GET", "/cache", params={"wait": 1})["jobs"]
            jobs = [job for job in listed if job["id"] in ids]
    finally:
        display.close()
    for job in jobs:
        print(_summary(job))
    return 1 if any(job["state"] != "done" for job in jobs) else 0


def _list(args: argparse.Namespace, request: Request) -> int:
    body = request(args, "GET", "/cache")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"cache: {body['cache_dir']}")
    print(f"{'SOURCE':48} {'SIZE':>11} {'LAST USED':16} PATH")
    for model in body["models"]:
        used = model["last_used"]
        when = datetime.fromtimestamp(used).strftime("%Y-%m-%d %H:%M") if used else "-"
        print(f"{model['source']:48} {human(model['size']):>11} {when:16} {model['path']}")
    running = [job for job in body["jobs"] if job["finished"] is None]
    if running:
        print("\ndownloading:")
        for job in running:
            print(f"  {_line(job)}")
    return 0


def _remove(args: argparse.Namespace, request: Request, sources: list[str]) -> int:
    for source in sources:
        freed = request(args, "DELETE", f"/cache/{quote(source, safe='')}")
        print(f"{source}: freed {human(freed['freed'])} (commit {freed['commit'][:12]})")
    return 0


def _line(job: dict[str, Any]) -> str:
    eta = f"  ETA {job['eta']:.0f}s" if job.get("eta") is not None else ""
    return (
        f"{job['source']}  {job['state']}  {job['percent']:5.1f}%"
        f"  {human(job['done'])} / {human(job['total'])}  {human(job['rate'])}/s{eta}"
    )


def _summary(job: dict[str, Any]) -> str:
    if job["state"] == "done":
        note = f" ({job['note']})" if job.get("note") else ""
        return f"{job['source']}: cached, {human(job['total'])} in {job['path']}{note}"
    if job["error"]:
        error = job["error"]
        return f"{job['source']}: failed ({error['status']} {error['type']}): {error['message']}"
    return f"{job['source']}: {job['state']}"


class _Lines:
    """Not a terminal: a line per job when its state changes, and every 5 s while it runs."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[str, float]] = {}

    def show(self, jobs: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for job in jobs:
            state, at = self._last.get(job["id"], ("", 0.0))
            if job["state"] != state or (job["finished"] is None and now - at >= 5):
                print(_line(job), flush=True)
                self._last[job["id"]] = (job["state"], now)

    def close(self) -> None:
        pass


class _Bars:
    """A terminal: one tqdm bar per model (bytes, rate, ETA)."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[int, Any] = {}

    def show(self, jobs: list[dict[str, Any]]) -> None:
        size = shutil.get_terminal_size((100, 24))  # a terminal that says 0x0: 100x24
        for position, job in enumerate(jobs):
            bar = self._bars.get(job["id"])
            if bar is None:
                bar = self._bars[job["id"]] = self._tqdm(
                    desc=job["source"], total=job["total"] or None, unit="B", unit_scale=True,
                    unit_divisor=1024, position=position, leave=True,
                    ncols=size.columns, nrows=size.lines,
                    initial=job["done"],  # already there (resumed): not part of the rate
                )  # fmt: skip
            if job["total"] and bar.total != job["total"]:
                bar.total = job["total"]
            bar.update(job["done"] - bar.n)
            bar.set_postfix_str(job["state"], refresh=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
