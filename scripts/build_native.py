"""Compile the gateway's hot path with mypyc (gateway.native says which modules and why) into
build/native/, with the manifest the gateway checks before it uses them. Run by `make install`.

Without a C compiler or Python's headers it says so and stops (exit 0): the gateway then runs as
pure Python. A failed compile with both is an error.

    .venv/bin/python scripts/build_native.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway import native  # noqa: E402  (this checkout's, whatever is installed)


def missing() -> str | None:
    """What compiling needs and this machine lacks: a C compiler, Python's headers."""
    cc = os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc.split()[0]) is None:
        return f"no C compiler ({cc.split()[0]})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Debian: python3-dev)"
    return None


def main() -> int:
    if (lacking := missing()) is not None:
        print(f"==> {lacking}: the gateway runs as pure Python (slower; see gateway/native.py)")
        return 0
    from mypyc.build import mypycify
    from setuptools import setup

    os.chdir(REPO)  # mypy's configuration (pyproject.toml) and the modules' names
    out, temp = native.BUILD, REPO / "build" / "native-c"
    shutil.rmtree(out, ignore_errors=True)  # no manifest while it builds: pure Python meanwhile
    sources = [f"gateway/{name}.py" for name in native.MODULES]
    print(f"==> compiling the gateway's hot path with mypyc ({len(sources)} modules, ~1-2 min)",
          flush=True)  # fmt: skip
    started = time.monotonic()
    warnings.simplefilter("ignore")  # setuptools' notes on pyproject.toml, not ours to act on
    extensions = mypycify(sources, group_name="gateway.native_lib", target_dir=str(temp))
    setup(
        name="sem-gateway-native",
        ext_modules=extensions,
        script_args=["--quiet", "build_ext", "--build-lib", str(out), "--build-temp", str(temp)],
    )
    (out / native.MANIFEST).write_text(json.dumps(native.fingerprint(), indent=1))
    print(f"==> compiled in {time.monotonic() - started:.0f} s into {out.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
