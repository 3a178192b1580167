"""`sem chaos`: fault scenarios against a running sem, under a load it generates.

Run it on your own box before trusting sem with it. First a baseline phase without a fault, then
per scenario: load from concurrent clients (completions and chat, streamed and not, every answer
checked for exactly --max-tokens tokens), the fault, the time until the model is ready again and
a request succeeds, and the engine processes left behind. The tool never leaves a process stopped:
whatever it stopped is continued at the end, Ctrl-C included.

Scenarios (default: all; those that cannot apply say "n/a"):
  kill-worker      kill -9 of a child of the engine (vLLM: VLLM::Worker or EngineCore)
  kill-engine      kill -9 of the engine's API process
  stop-engine      SIGSTOP of the engine's process group, never continued by the tool
  wedge-engine     alive, /health 200, no progress (vLLM: SIGSTOP of EngineCore only;
                   the stand-in engine: SIGUSR1)
  wedge-idle-engine  the same wedge between two batches: the fault first, then the load
                   (no stream producing, the engine's own figures frozen at nothing running)
  slow-engine      SIGSTOP of the engine for --slow-seconds, then SIGCONT
  kill-supervisor  kill -9 of the process listening on the admin port (`sem run` restarts it)
  kill-gateway     kill -9 of the process listening on the gateway port

Exit code 1 if a request failed (baseline included), or a scenario left an orphan or did
not recover.
See docs/chaos.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import fields

from contract import defaults
from sem.chaos.faults import Ledger, Scenario
from sem.chaos.report import render
from sem.chaos.runner import ChaosError, ChaosOptions, run_chaos

DEFAULT_GATEWAY = os.environ.get(
    "SEM_GATEWAY_URL", f"http://{defaults.HOST}:{defaults.GATEWAY_PORT}"
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway URL")
    p.add_argument("--scenario", action="append", choices=[s.value for s in Scenario],
                   help="run this scenario (repeatable; default: all)")  # fmt: skip
    p.add_argument("--model", help="the model whose engine is hit (default: the first ready)")
    p.add_argument("--clients", type=_positive(int), default=8, help="concurrent clients")
    p.add_argument("--max-tokens", type=_positive(int), default=32, help="tokens per request")
    for flag, default, what in (
        ("--baseline", 5.0, "seconds of load without a fault, first"),
        ("--warmup", 2.0, "seconds of load before each fault"),
        ("--settle", 2.0, "seconds of load after each recovery"),
        ("--recover-timeout", 90.0, "seconds a fault gets to be recovered from"),
        ("--slow-seconds", 3.0, "slow-engine: seconds the engine stays stopped"),
        ("--request-timeout", 300.0, "seconds one request may take (past a 180 s replay)"),
    ):
        p.add_argument(flag, type=_positive(float), default=default, help=what)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _positive(kind: type[int] | type[float]) -> type[int] | type[float]:
    """argparse type: a number > 0 (the name shows in argparse's error message)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse  # type: ignore[return-value]


def options(args: argparse.Namespace) -> ChaosOptions:
    """The options named like a flag come from it (`--max-tokens` -> max_tokens)."""
    chosen = args.scenario or [s.value for s in Scenario]
    given = {f.name: getattr(args, f.name) for f in fields(ChaosOptions) if f.name in vars(args)}
    return ChaosOptions(**given | {
        "admin": args.admin.rstrip("/"),
        "gateway": args.gateway.rstrip("/"),
        "scenarios": tuple(Scenario(name) for name in dict.fromkeys(chosen)),
    })  # fmt: skip


def run(args: argparse.Namespace) -> int:
    ledger = Ledger()
    try:
        report = asyncio.run(run_chaos(options(args), ledger))
    except ChaosError as exc:
        print(f"sem chaos: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sem chaos: interrupted", file=sys.stderr)
        return 130
    finally:
        for what in ledger.release_all():  # a last safety net: nothing stays stopped
            print(f"sem chaos: on the way out: {what}", file=sys.stderr)
    print(json.dumps(report.to_json(), indent=2) if args.json else render(report))
    return 0 if report.clean else 1
