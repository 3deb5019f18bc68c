"""Stopping `softpo train` on SIGINT or SIGTERM: at the end of a step, with a checkpoint, on every rank."""

from __future__ import annotations

import signal
import sys

from softpo.train import collectives


class StopSignals:
    """SIGINT and SIGTERM, while the block runs, only note that the run should stop: the loop stops at the end
    of the step, with a checkpoint, rather than wherever the signal lands (in a collective, mid-update)."""

    def __init__(self):
        self.received = 0
        self.previous = {}

    def _note(self, signum, frame):
        self.received = self.received or signum

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stopped(run, step: int, signum: signal.Signals) -> int:
    """The closing line of a run stopped by a signal (checkpoint saved); 128 + the signal's number."""
    if run.main_rank:
        resume = f"softpo train --resume {run.run_dir}"
        if run.world > 1:
            resume = f"torchrun --nproc-per-node {run.world} -m softpo.train --resume {run.run_dir}"
        print(f"softpo train: stopped by {signum.name} after step {step} of {run.args.steps}; checkpoint saved in "
              f"{run.run_dir}; continue with: {resume}", file=sys.stderr)
    collectives.end_processes(run.world)
    return 128 + int(signum)
