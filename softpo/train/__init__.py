"""The loop: `softpo train`, `python -m softpo.train` and `torchrun --nproc-per-node N -m softpo.train`.

loop.py reads top to bottom (collect, update, record); beside it: flags.py (the one parser), policy.py
(build, sample, score), checkpoint.py (checkpoint and run directory), collectives.py (every decision that
depends on the number of processes), fsdp.py (FSDP2), samples.py (off-policy data), routing.py (MoE routing
replay), tasks.py (the built-in task) and compare.py (`softpo compare`).
"""

from softpo.train.loop import main

__all__ = ["main"]
