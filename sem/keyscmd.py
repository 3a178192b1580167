"""`sem keys`: the gateway's API keys (the supervisor's /keys).

sem keys create NAME [--model M ...] [--rpm N] [--tpm N]   prints the key, once
sem keys ls [--json]                                       keys, limits and use (no secrets)
sem keys rm ID                                             revokes the key at once
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

Request = Callable[..., Any]


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="a new key: printed once, kept only hashed")
    create.add_argument("name", help="who or what the key is for")
    create.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL",
        help="a model the key may use (repeatable; default: every model)",
    )
    create.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    create.add_argument("--tpm", type=int,
                        help="completion tokens per minute (default: no limit)")  # fmt: skip
    listing = sub.add_parser("ls", help="keys with their limits and use")
    listing.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", help="revoke a key")
    rm.add_argument("id")


def run(args: argparse.Namespace, request: Request) -> int:
    if args.keys_command == "create":
        body: dict[str, Any] = {
            "name": args.name,
            "models": args.models,
            "requests_per_minute": args.rpm,
            "tokens_per_minute": args.tpm,
        }
        key = request(args, "POST", "/keys", json=body)  # fmt: skip
        print(f"{key['id']}: {key['key']}")
        print("keep it now: sem shows it this once (clients send it as Authorization: Bearer)")
    elif args.keys_command == "ls":
        keys = request(args, "GET", "/keys")["keys"]
        if args.json:
            print(json.dumps(keys, indent=2))
        else:
            print("\n".join(table(keys)))
    else:
        key = request(args, "DELETE", f"/keys/{args.id}")
        print(f"{key['id']} ({key['name']}): revoked")
    return 0


def table(keys: list[dict[str, Any]]) -> list[str]:
    """`sem keys ls`' lines, in the style of `sem ps`."""
    lines = [f"{'ID':14} {'NAME':20} {'MODELS':24} {'RPM':6} {'TPM':8} {'REQUESTS':9}"
             f" {'TOKENS':9} LAST USED"]  # fmt: skip
    for k in keys:
        models = ",".join(k["models"]) if k["models"] else "*"
        last = k["last_used"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "-"
        lines.append(
            f"{k['id']:14} {k['name']:20} {models:24} {k['requests_per_minute'] or '-'!s:6}"
            f" {k['tokens_per_minute'] or '-'!s:8} {k['requests']!s:9} {k['tokens']!s:9} {when}"
        )
    return lines
