"""The `sem` command line: run sem, and talk to a running supervisor's admin API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from contract import defaults
from sem import cachecmd, keyscmd
from sem.chaos import command as chaoscmd
from sem.launcher import RunOptions, gateway_argv, run, supervisor_argv

if TYPE_CHECKING:
    from supervisor.store import Store

DEFAULT_ADMIN = os.environ.get("SEM_ADMIN_URL", defaults.SUPERVISOR_URL)


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
    opts = run_options(args)
    check_daemon_options(opts)
    return asyncio.run(run(opts))


def check_daemon_options(opts: RunOptions) -> None:
    """Each daemon's command line, parsed by its own parser before anything starts: a wrong
    --gateway-option or --supervisor-option is said now, not by a child that exits at once."""
    from gateway.daemon import parse_args as gateway_args
    from supervisor.daemon import parse_args as supervisor_args

    for flag, parse, argv in (
        ("--supervisor-option", supervisor_args, supervisor_argv(opts)[3:]),
        ("--gateway-option", gateway_args, gateway_argv(opts, listen_fd=0)[3:]),
    ):
        try:
            with contextlib.redirect_stderr(io.StringIO()) as said:
                parse(argv)
        except SystemExit:
            error = said.getvalue().strip().splitlines()[-1:] or ["rejected"]
            raise CliError(f"{flag}: {error[0]}") from None


def run_options(args: argparse.Namespace) -> RunOptions:
    """`sem run`'s flags, as the launcher takes them."""
    return RunOptions(
        config=args.config,
        host=args.host,
        gateway_port=args.gateway_port,
        supervisor_port=args.supervisor_port,
        state_dir=args.state_dir,
        engine_python=args.engine_python,
        engine_module=args.engine_module,
        token=args.token,
        queue_timeout=args.queue_timeout,
        replay_timeout=args.replay_timeout,
        cluster_address=args.cluster_address,
        supervisor_options=tuple(args.supervisor_option),
        gateway_options=tuple(args.gateway_option),
    )


def cmd_ps(args: argparse.Namespace) -> int:
    models = admin_request(args, "GET", "/models")["models"]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"{'MODEL':24} {'REPLICA':28} {'STATE':11} {'PORT':6} {'PID':8} {'RESTARTS':8}"
          f" {'MEMORY (EST/MEAS)':17} REASON")  # fmt: skip
    for model in models:
        memory = memory_column(model.get("memory"))
        for r in model["replicas"] or [{}]:
            print(
                f"{model['name']:24} {r.get('id', '-'):28} {r.get('state', model['state']):11}"
                f" {r.get('port') or '-'!s:6} {r.get('pid') or '-'!s:8} {r.get('restarts', 0)!s:8}"
                f" {memory:17} {r.get('reason', model['reason'])}"
            )
    return 0


def memory_column(memory: dict[str, Any] | None) -> str:
    """`sem ps`' memory: the estimate per device / the measured need ("-" until measured),
    the one placement uses marked with *."""
    if not memory:
        return "-"
    est, meas = memory["estimate"] / 2**30, memory.get("measured")
    if meas is None:
        return f"{est:.1f}G*/-"
    return f"{est:.1f}G/{meas / 2**30:.1f}G*"


def cmd_add(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {
        "name": args.name,
        "source": args.source,
        "replicas": args.replicas,
        "tensor_parallel": args.tensor_parallel,
        "priority": args.priority,
    }
    for key in ("memory", "max_model_len", "max_num_seqs"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    engine_args: dict[str, Any] = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        engine_args[key] = value if value else True
    if engine_args:
        spec["engine_args"] = engine_args
    model = admin_request(args, "POST", "/models", json=spec)
    print(f"{model['name']}: {model['state']} ({model['reason']})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    model = admin_request(args, "DELETE", f"/models/{args.name}", params={"timeout": args.timeout})
    print(f"{model['name']}: {model['state']} (in-flight requests get up to {args.timeout:g}s)")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    params = {"confirm_remove_all": "true"} if args.yes else {}
    diff = admin_request(args, "POST", "/reload", params=params)
    for kind in ("added", "changed", "removed", "unchanged"):
        print(f"{kind:10} {', '.join(diff[kind]) or '-'}")
    return 0


def cmd_resources(args: argparse.Namespace) -> int:
    devices = admin_request(args, "GET", "/resources")["devices"]
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    gib = 1024**3
    print(f"{'DEVICE':8} {'NAME':28} {'TOTAL':>9} {'FREE':>9} {'RESERVED':>9}  REPLICAS")
    for d in devices:
        holders = ", ".join(f"{h['replica']} ({h['reserved'] / gib:.1f})" for h in d["replicas"])
        label = f"GPU{d['id']}" if d["kind"] == "gpu" else "CPU"
        print(f"{label:8} {d['name'][:28]:28} {d['total'] / gib:8.1f}G {d['free'] / gib:8.1f}G"
              f" {d['reserved'] / gib:8.1f}G  {holders or '-'}")  # fmt: skip
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from supervisor.config import ConfigError, load_config
    from supervisor.dryrun import dry_run
    from supervisor.resources import StaticInventory, describe, detect

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    try:
        inventory = (
            StaticInventory.parse(args.inventory)
            if args.inventory
            else detect(config.devices, config.cpu_memory_budget)
        )
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"--inventory: {exc}") from None
    devices = inventory.devices()
    store = _measured_store(args.state_dir)
    print(f"devices: {describe(devices)}")
    print(f"{'REPLICA':28} {'NEEDS':>10}  {'OUTCOME':8} WHERE / WHY")
    try:
        rows = dry_run(config, devices, store)
    finally:
        if store is not None:
            store.close()
    for row in rows:
        print(f"{row.replica:28} {row.need:>10}  {row.outcome:8} {row.detail}")
    if store is not None and any(row.need.endswith("*") for row in rows):
        print(f"* measured by an earlier engine of the same spec ({store.path})")
    return 0


def _measured_store(state_dir: Path | None) -> Store | None:
    """The state folder's sem.db, for the needs measured there; None without one."""
    from supervisor.store import Store, StoreError

    if state_dir is None:
        return None
    if not (state_dir / "sem.db").is_file():
        raise CliError(f"--state-dir: no sem.db in {state_dir}")
    try:
        return Store(state_dir / "sem.db")
    except StoreError as exc:
        raise CliError(f"--state-dir: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sem", description="Serving Engine Manager")
    parser.add_argument("--admin", default=DEFAULT_ADMIN, help="supervisor admin URL")
    parser.add_argument("--token", default=os.environ.get("SEM_ADMIN_TOKEN"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run supervisor and gateway in the foreground")
    p.add_argument("--config", type=Path, default=Path("models.yaml"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--gateway-port", type=int, default=defaults.GATEWAY_PORT)
    p.add_argument("--supervisor-port", type=int, default=defaults.SUPERVISOR_PORT)
    p.add_argument("--state-dir", type=Path, default=Path(".sem"))
    p.add_argument("--engine-python", default=os.environ.get("SEM_ENGINE_PYTHON"))
    p.add_argument("--engine-module", default=os.environ.get("SEM_ENGINE_MODULE"))
    p.add_argument(
        "--queue-timeout", type=float, default=defaults.QUEUE_TIMEOUT,
        help="seconds a request may wait for a ready replica (say, an engine restart)",
    )  # fmt: skip
    p.add_argument(
        "--replay-timeout", type=float, default=defaults.REPLAY_TIMEOUT,
        help="seconds a request whose engine failed waits for a ready replica (a restart)",
    )  # fmt: skip
    p.add_argument(
        "--cluster-address",
        help="a Ray cluster's head (host:port, or auto): place models on its nodes (overrides"
        " models.yaml's cluster.address; docs/cluster.md)",
    )
    p.add_argument(
        "--gateway-option", action="append", default=[], metavar="NAME=VALUE",
        help="one more `python -m gateway` option, e.g. max-body=16777216 (repeatable;"
        " `python -m gateway --help` lists them)",
    )  # fmt: skip
    p.add_argument(
        "--supervisor-option", action="append", default=[], metavar="NAME=VALUE",
        help="one more `python -m supervisor` option, e.g. stall-after=30 (repeatable)",
    )  # fmt: skip
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="models and replicas with their states")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("add", help="add (and run) a model")
    p.add_argument("name")
    p.add_argument("source", help="hf://org/name[@revision] or path:/some/dir")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--memory", help="per replica, e.g. 20GiB (default: estimated)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("rm", help="drain and remove a model")
    p.add_argument("name")
    p.add_argument(
        "--timeout", type=float, default=defaults.DRAIN_TIMEOUT, help="drain deadline in seconds"
    )
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("reload", help="apply models.yaml's changes (added, removed, changed)")
    p.add_argument(
        "--yes", action="store_true", help="go on if models.yaml lists no models (removes all)"
    )
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("resources", help="devices: total, free, reserved by sem")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_resources)

    p = sub.add_parser("plan", help="where each replica of CONFIG would go; starts nothing")
    p.add_argument("config", type=Path)
    p.add_argument("--inventory", help="e.g. 2x24GiB, 24GiB,16GiB, cpu:8GiB, or nodes:"
                   " 'a=2x24GiB; b=2x24GiB' (default: detect)")  # fmt: skip
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="plan specs measured there (its sem.db) with their measured need",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("cache", help="fetch models into the cache (progress), `ls`, `rm SOURCE`",
                       description=cachecmd.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    cachecmd.configure(p)
    p.set_defaults(func=lambda args: cachecmd.run(args, admin_request))

    p = sub.add_parser("keys", help="API keys of the gateway: `create`, `ls`, `rm ID`",
                       description=keyscmd.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    keyscmd.configure(p)
    p.set_defaults(func=lambda args: keyscmd.run(args, admin_request))

    p = sub.add_parser("chaos", help="fault scenarios against a running sem, under load",
                       description=chaoscmd.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    chaoscmd.configure(p)
    p.set_defaults(func=chaoscmd.run)
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
