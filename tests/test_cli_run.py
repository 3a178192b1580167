"""`sem run`'s flags reach the processes it starts."""

from __future__ import annotations

import pytest

from sem.cli import build_parser, main, run_options
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


def test_daemon_options_reach_their_daemon():
    supervisor, gateway = argv_of(
        "--gateway-option", "max-body=1048576", "--gateway-option", "require-keys",
        "--supervisor-option", "stall-after=30",
    )  # fmt: skip
    assert gateway[gateway.index("--max-body") + 1] == "1048576"
    assert "--require-keys" in gateway and "--max-body" not in supervisor
    assert supervisor[supervisor.index("--stall-after") + 1] == "30"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (("--gateway-option", "max-bodies=1"), "--gateway-option: python -m gateway: error:"
         " unrecognized arguments: --max-bodies 1"),
        (("--supervisor-option", "stall-after=soon"), "--supervisor-option: python -m supervisor:"
         " error: argument --stall-after: invalid float value: 'soon'"),
    ],
)  # fmt: skip
def test_a_wrong_daemon_option_is_refused_before_anything_starts(
    flags: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str]
):
    assert main(["run", "--config", "/nonexistent.yaml", *flags]) == 1
    assert capsys.readouterr().err.strip() == f"sem: {said}"
