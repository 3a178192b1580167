"""`sem run`'s flags reach the processes it starts."""

from __future__ import annotations

from sem.cli import build_parser, run_options
from sem.launcher import gateway_argv, supervisor_argv


def argv_of(*flags: str) -> tuple[list[str], list[str]]:
    opts = run_options(build_parser().parse_args(["run", *flags]))
    return supervisor_argv(opts), gateway_argv(opts, listen_fd=7)


def test_a_cluster_address_goes_to_the_supervisor_only():
    supervisor, gateway = argv_of("--cluster-address", "head.example:6379")
    at = supervisor.index("--cluster-address")
    assert supervisor[at + 1] == "head.example:6379"
    assert "--cluster-address" not in gateway


def test_without_one_the_supervisor_stays_on_this_machine():
    supervisor, _ = argv_of()
    assert "--cluster-address" not in supervisor


def test_the_gateways_waits_go_to_the_gateway():
    _, gateway = argv_of("--queue-timeout", "90", "--replay-timeout", "600")
    assert gateway[gateway.index("--queue-timeout") + 1] == "90"
    assert gateway[gateway.index("--replay-timeout") + 1] == "600"
