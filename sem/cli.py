"""The `sem` command line: run sem, and talk to a running supervisor's admin API."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from sem.launcher import RunOptions, run

DEFAULT_ADMIN = os.environ.get("SEM_ADMIN_URL", "http://127.0.0.1:8001")


class CliError(Exception):
    """A failure to report in one line, with exit code 1."""


def admin_request(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    headers = {}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    try:
        response = httpx.request(
            method, f"{args.admin}{path}", headers=headers, timeout=30, trust_env=False, **kwargs
        )
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the supervisor at {args.admin}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text}}
    if response.status_code >= 400:
        message = body.get("error", {}).get("message", response.text)
        raise CliError(f"{response.status_code}: {message}")
    return body


def cmd_run(args: argparse.Namespace) -> int:
    opts = RunOptions(
        config=args.config,
        host=args.host,
        gateway_port=args.gateway_port,
        supervisor_port=args.supervisor_port,
        state_dir=args.state_dir,
        engine_python=args.engine_python,
        engine_module=args.engine_module,
        token=args.token,
    )
    return asyncio.run(run(opts))


def cmd_ps(args: argparse.Namespace) -> int:
    models = admin_request(args, "GET", "/models")["models"]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"{'MODEL':24} {'REPLICA':28} {'STATE':11} {'PORT':6} {'PID':8} {'RESTARTS':8} REASON")
    for model in models:
        for r in model["replicas"] or [{}]:
            print(
                f"{model['name']:24} {r.get('id', '-'):28} {r.get('state', model['state']):11}"
                f" {r.get('port') or '-'!s:6} {r.get('pid') or '-'!s:8} {r.get('restarts', 0)!s:8}"
                f" {r.get('reason', model['reason'])}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sem", description="Serving Engine Manager")
    parser.add_argument("--admin", default=DEFAULT_ADMIN, help="supervisor admin URL")
    parser.add_argument("--token", default=os.environ.get("SEM_ADMIN_TOKEN"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run supervisor and gateway in the foreground")
    p.add_argument("--config", type=Path, default=Path("models.yaml"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--gateway-port", type=int, default=8000)
    p.add_argument("--supervisor-port", type=int, default=8001)
    p.add_argument("--state-dir", type=Path, default=Path(".sem"))
    p.add_argument("--engine-python", default=os.environ.get("SEM_ENGINE_PYTHON"))
    p.add_argument("--engine-module", default=os.environ.get("SEM_ENGINE_MODULE"))
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="models and replicas with their states")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"sem: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
