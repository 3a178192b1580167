"""The compiled hot path (gateway.native) is used only when built from the sources beside it:
an edited module, another Python or SEM_GATEWAY_NATIVE=0 and the gateway runs as pure Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
import gateway.proxy
from gateway import native


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A copy of the compiled modules' sources, and a build of them (its manifest only)."""
    monkeypatch.delenv("SEM_GATEWAY_NATIVE", raising=False)
    package, build = tmp_path / "gateway", tmp_path / "build"
    package.mkdir()
    for name in native.MODULES:
        shutil.copy(native.PACKAGE / f"{name}.py", package)
    build.mkdir()
    (build / native.MANIFEST).write_text(json.dumps(native.fingerprint(package)))
    return package, build


def test_a_build_from_these_sources_goes_first_on_the_package_path(checkout) -> None:
    package, build = checkout
    path = [str(package)]
    assert native.enable(path, build, package) == f"compiled ({len(native.MODULES)} modules, mypyc)"
    assert path == [str(build / "gateway"), str(package)]


def test_one_edited_module_turns_every_compiled_one_off(checkout) -> None:
    package, build = checkout
    with (package / "proxy.py").open("a") as source:
        source.write("\n# edited after the build\n")
    path = [str(package)]
    assert "compiled from other sources" in native.enable(path, build, package)
    assert path == [str(package)]


def test_a_build_for_another_python_is_not_used(checkout) -> None:
    package, build = checkout
    manifest = json.loads((build / native.MANIFEST).read_text())
    (build / native.MANIFEST).write_text(json.dumps({**manifest, "python": "cpython-399"}))
    path = [str(package)]
    assert native.enable(path, build, package).startswith("pure Python")
    assert path == [str(package)]


def test_no_build_or_an_unreadable_one_is_pure_python_and_says_why(checkout) -> None:
    package, build = checkout
    (build / native.MANIFEST).write_text("{not json")
    assert "unreadable" in native.enable([], build, package)
    (build / native.MANIFEST).unlink()
    assert "not compiled" in native.enable([], build, package)


def test_sem_gateway_native_0_turns_it_off(checkout, monkeypatch) -> None:
    package, build = checkout
    monkeypatch.setenv("SEM_GATEWAY_NATIVE", "0")
    path = [str(package)]
    assert native.enable(path, build, package) == "pure Python (SEM_GATEWAY_NATIVE=0)"
    assert path == [str(package)]


def test_this_checkout_runs_its_compiled_build() -> None:
    """What `make install` built is what these tests ran (skipped when not built, or built from
    other sources: pytest run by hand after an edit)."""
    if not gateway.RUNS.startswith("compiled"):
        pytest.skip(gateway.RUNS)
    compiled = Path(str(gateway.proxy.__file__))
    assert compiled.is_relative_to(native.BUILD) and compiled.suffix == ".so"


def test_the_daemon_says_what_it_runs() -> None:
    """The operator's line: the gateway's start-up log says compiled or pure Python (and why)."""
    for env, runs in ((None, gateway.RUNS), ("0", "pure Python (SEM_GATEWAY_NATIVE=0)")):
        environ = {**os.environ, "SEM_GATEWAY_NATIVE": env} if env else None
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port", "0", "--route", "m=http://127.0.0.1:9"],
            stderr=subprocess.PIPE, text=True, env=environ,
        )  # fmt: skip
        try:
            assert daemon.stderr is not None
            line = ""
            while "gateway listening" not in line:  # the daemon's log, line by line
                line = daemon.stderr.readline()
                assert line, "the gateway exited before it listened"
            assert line.rstrip().endswith(f"hot path: {runs}"), line
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


def test_without_a_c_compiler_the_build_says_so_and_install_goes_on() -> None:
    script = native.PACKAGE.parent / "scripts" / "build_native.py"
    done = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "CC": "no-such-cc"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "no C compiler (no-such-cc): the gateway runs as pure Python" in done.stdout
