"""sem gateway: the front door. Routes requests to engines by model; never starts processes.

Its hot path runs compiled when `make install` built it from these sources (gateway.native)."""

from gateway import native

RUNS = native.enable(__path__)  # what the gateway runs: compiled, or pure Python and why
