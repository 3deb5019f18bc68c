"""Spawning real process groups on gloo for tests, with a deadline so a stuck collective fails instead of hanging."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A collective that one rank never joins raises on the others after this long (gloo's own timeout).
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        worker(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(worker, world: int, *args, timeout_s: float = 300.0) -> None:
    """Run worker(rank, world, *args) in `world` spawned processes on gloo; raise if any fails or the group
    outlives `timeout_s`."""
    spawn_with_deadline(_entry, world, lambda: (world, free_port(), worker, args), timeout_s)


def spawn_with_deadline(entry, nprocs: int, make_args, timeout_s: float, before_retry=None) -> None:
    """entry(rank, *make_args()) in `nprocs` spawned processes, killed past `timeout_s`.

    Gloo's TCP transport occasionally aborts a rank with SIGABRT early in a run (pytorch/pytorch#188266):
    such a run is started again (after `before_retry()`), up to three times; any other failure fails the
    caller.
    """
    for attempt in range(3):
        context = mp.start_processes(entry, args=make_args(), nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.5, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        process.kill()
                    raise TimeoutError(f"process group of {nprocs} still running after {timeout_s:.0f} s")
            return
        except mp.ProcessExitedException as error:
            if error.signal_name != "SIGABRT" or attempt == 2:
                raise
            if before_retry is not None:
                before_retry()
