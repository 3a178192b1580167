"""`sem chaos`: fault injection against a running sem under a checked load (docs/chaos.md).

check (is an answer complete?) <- load (the clients) <- runner (phases, recovery, orphans)
-> report; faults (the scenarios and the ledger that undoes stops); procs (sem's processes).
"""
