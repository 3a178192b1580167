"""The gateway's hot path compiled to C by mypyc: the same modules, typed strictly for mypy,
compiled as they are (about half of sem's own work per request and per stream:
bench/hot_path.py --pure and --instructions, docs/benchmarks.md). `make install` builds them
(scripts/build_native.py) into build/native/.

Used only when built from exactly the sources beside them (a SHA-256 of each, and the Python
they were built for): otherwise the gateway runs as the pure Python it is, the same behaviour,
slower. All or nothing: compiled modules call each other directly, so one edited module turns
the compiled ones off until they are rebuilt. `SEM_GATEWAY_NATIVE=0` turns them off too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
BUILD = PACKAGE.parent / "build" / "native"
MANIFEST = "manifest.json"

# What runs per request or per streamed piece. Not compiled: errors and retry (their classes
# are read as plain Python's: class attributes, vars()), pydantic's request models (mypyc
# cannot compile a module that subclasses them), the daemon and what runs once.
MODULES = (
    "admission", "app", "body", "ending", "fastpath", "frontdoor", "journey", "jsonscan", "keys",
    "limits", "loop", "metrics", "plain_requests", "progress", "proxy", "resume", "routes",
    "sse", "state", "upstream", "usage",
)  # fmt: skip


def fingerprint(package: Path = PACKAGE) -> dict[str, str]:
    """What a build is valid for: the Python it was built for, each compiled source's SHA-256."""
    out = {"python": sys.implementation.cache_tag or "unknown"}
    for name in MODULES:
        out[name] = hashlib.sha256((package / f"{name}.py").read_bytes()).hexdigest()
    return out


def enable(path: list[str], build: Path = BUILD, package: Path = PACKAGE) -> str:
    """Put the compiled modules first on the package's `path` (its `__path__`) if they were
    built from these sources; say what the gateway runs (its daemon logs it)."""
    if os.environ.get("SEM_GATEWAY_NATIVE", "1") == "0":
        return "pure Python (SEM_GATEWAY_NATIVE=0)"
    try:
        built = json.loads((build / MANIFEST).read_text())
    except FileNotFoundError:
        return "pure Python (not compiled: `make install` compiles it)"
    except (OSError, ValueError) as exc:
        return f"pure Python ({build / MANIFEST} unreadable: {exc})"
    if built != fingerprint(package):
        return "pure Python (compiled from other sources: `make install` compiles them again)"
    path.insert(0, str(build / "gateway"))
    return f"compiled ({len(MODULES)} modules, mypyc)"
