"""The benchmark harness: `softpo bench` / `python -m softpo.bench`.

cases.py (what is measured: cases, sets, inputs, the provider interface), providers.py and peers.py (who
measures it: softpo, torch, the other libraries), harness.py (timers, memory probes, ceilings, one result),
report.py (the table, the plots, the JSON), command.py (the command line), vocab_parallel.py (the
vocab-parallel sweep over gloo processes).
"""

from .command import main

__all__ = ["main"]
