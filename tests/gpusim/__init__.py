"""A simulated GPU box for tests, on the CPU: a memory ledger shared by processes (ledger.py),
an NVML stand-in over it (nvml.py) and an engine that takes memory as vLLM does (engine.py)."""
