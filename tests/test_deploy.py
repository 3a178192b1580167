"""deploy/*.service: `systemd-analyze verify` finds nothing to say, the settings that keep engines
alive across a supervisor restart are there, and the command lines parse with the daemons' own
argument parsers."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.daemon import parse_args as gateway_args
from supervisor.daemon import parse_args as supervisor_args
from tests.apt import apt_install
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
UNITS = ("sem-supervisor.service", "sem-gateway.service")
INSTALL_ROOT = "/opt/sem/"  # where the units expect the checkout (README)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value given (systemd allows repeats); `\\` continues a line."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
    return unit


def last(unit: Unit, section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def exec_args(unit: Unit, key: str = "ExecStart") -> list[str]:
    value = last(unit, "Service", key)
    assert value, f"no {key}="
    return shlex.split(value)


def seconds(value: str | None) -> float:
    assert value, "no TimeoutStopSec="
    return float(value.removesuffix("s"))


def test_supervisor_unit_keeps_engines_across_restarts_and_reloads_on_hup() -> None:
    unit = parse_unit(DEPLOY / "sem-supervisor.service")
    service = unit["Service"]
    assert last(unit, "Service", "Restart") == "on-failure"
    # Only the supervisor gets signals from systemd; it stops its engines itself on SIGTERM.
    assert last(unit, "Service", "KillMode") == "process"
    assert last(unit, "Service", "KillSignal") in (None, "SIGTERM")
    assert exec_args(unit, "ExecReload")[1:] == ["-HUP", "$MAINPID"]
    # An engine killed by the OOM killer must not take the whole unit (and every model) down.
    assert last(unit, "Service", "OOMPolicy") == "continue"
    assert last(unit, "Service", "User") == "sem"
    for setting in ("DynamicUser", "PrivateTmp", "PrivateDevices", "NoNewPrivileges"):
        assert last(unit, "Service", setting) in (None, "no"), f"{setting}= breaks engines"
    assert "/etc/sem/sem.env" in " ".join(service.get("EnvironmentFile", []))

    argv = exec_args(unit)
    assert argv[:3] == ["/opt/sem/.venv/bin/python", "-m", "supervisor"]
    args = supervisor_args(argv[3:])
    assert str(args.state_dir) == "/var/lib/" + (last(unit, "Service", "StateDirectory") or "")
    assert str(args.config) == "/etc/sem/models.yaml"
    assert args.engine_python == "/opt/sem/.venv-engine/bin/python"
    # Models drain in parallel, then each engine gets its grace: all of it before the SIGKILL.
    assert seconds(last(unit, "Service", "TimeoutStopSec")) > args.drain_timeout + args.stop_grace


def test_gateway_unit_outlives_supervisor_restarts() -> None:
    unit = parse_unit(DEPLOY / "sem-gateway.service")
    assert last(unit, "Service", "Restart") == "on-failure"
    deps = unit["Unit"]
    assert "sem-supervisor.service" in " ".join(deps.get("Wants", []))
    assert "sem-supervisor.service" in " ".join(deps.get("After", []))
    for binding in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert "sem-supervisor" not in " ".join(deps.get(binding, [])), binding
    argv = exec_args(unit)
    assert argv[:3] == ["/opt/sem/.venv/bin/python", "-m", "gateway"]
    args = gateway_args(argv[3:])
    assert args.supervisor == "http://127.0.0.1:8001"
    assert seconds(last(unit, "Service", "TimeoutStopSec")) > args.shutdown_timeout


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """`systemd-analyze` (Debian's systemd package), installed once per session if missing.

    Verifying unit files needs neither systemd as PID 1 nor a D-Bus: it works in a container.
    """
    missing = [] if shutil.which("systemd-analyze") else ["systemd"]
    if not Path("/bin/kill").exists():  # ExecReload's command must exist for verify
        missing.append("procps")
    if missing:
        started = time.monotonic()
        why_not = apt_install(missing)
        if why_not is not None:
            pytest.skip(f"cannot verify the systemd units: {why_not}")
        print(f"installed {' '.join(missing)} in {time.monotonic() - started:.0f} s")
    found = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(found).exists():
        pytest.skip("cannot verify the systemd units: systemd installed but no systemd-analyze")
    return found


def verify(systemd_analyze: str, folder: Path) -> list[str]:
    """The lines `systemd-analyze verify` prints about the units in `folder`.

    verify exits 0 on many mistakes (an unknown key, a bad value: "ignoring"), so its output is
    what counts. Lines that name none of our units (e.g. about the host's own units) are not
    ours to fix; in a container without systemd as PID 1 it prints none at all.
    """
    paths = [str(folder / name) for name in UNITS]
    done = subprocess.run(
        [systemd_analyze, "verify", "--man=no", *paths],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = (done.stdout + done.stderr).splitlines()
    ours = [line for line in lines if any(name in line for name in UNITS)]
    if done.returncode != 0 and not ours:
        ours = lines or [f"exit code {done.returncode}"]
    return ours


def installed_copy(folder: Path) -> Path:
    """The units as they would be installed, with /opt/sem/ pointing at this checkout's Python.

    verify checks that every Exec command exists and is executable; the venv paths are the
    only ones that are not on this machine.
    """
    opt = folder / "opt-sem"
    for venv in (".venv", ".venv-engine"):
        (opt / venv / "bin").mkdir(parents=True)
        (opt / venv / "bin" / "python").symlink_to(sys.executable)
    units = folder / "units"
    units.mkdir()
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        assert INSTALL_ROOT in text
        (units / name).write_text(text.replace(INSTALL_ROOT, f"{opt}/"))
    return units


@pytest.mark.timeout(900)  # a first run may apt-get install systemd
def test_systemd_analyze_verify_is_silent(systemd_analyze: str, tmp_path: Path) -> None:
    units = installed_copy(tmp_path)
    assert verify(systemd_analyze, units) == []

    # The check itself: a typo must show up (verify only warns, exit code 0).
    broken = units / "sem-supervisor.service"
    broken.write_text(broken.read_text().replace("KillMode=process", "KillMode=proces"))
    complaints = verify(systemd_analyze, units)
    assert any("kill mode" in line and "proces" in line for line in complaints), complaints
