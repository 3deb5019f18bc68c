"""`softpo bench --vocab-parallel P`: the vocab-parallel sweep against the single-process run, per rank.

One SAPO loss, forward and backward on the hidden path, with the lm_head split over P gloo processes
(each holding V/P rows and the whole hidden states) and again in one process holding every row. Each
rank, and the single process, runs in its own fresh process with one thread, so its peak RSS is its
own and P ranks use P cores against the single run's one. Recorded per rank: the median time and the
peak memory of the call above its inputs, split into the gradients it leaves (d hidden and its d weight
shard) and the working memory on top of them.

    softpo bench --vocab-parallel 2                      # N=512, H=256, V=151936, fp32, on CPU
    softpo bench --vocab-parallel 3 --vp-shape 1024,256,151936

Writes <out>/cpu-<date>-vocab-parallel-P<P>.json and a markdown table next to it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .harness import MIB, MemoryProbe, cpu_memory_setup, environment, grad_bytes, measure_ceilings


def _rows(rank: int, world: int, V: int) -> slice:
    # Megatron's split: the first V % world ranks hold one row more.
    base, extra = divmod(V, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _rank_main(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    import softpo

    cpu_memory_setup()
    torch.set_num_threads(1)
    sharded = spec["sharded"]
    if sharded:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=300))
    N, H, V = spec["N"], spec["H"], spec["V"]
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    rows = _rows(rank, world, V) if sharded else slice(0, V)
    weight = weight[rows].clone()
    targets = torch.randint(0, V, (1, N), generator=g)
    mask = torch.ones(1, N, dtype=torch.bool)
    advantages = torch.randn(1, generator=g)
    hidden = hidden.view(1, N, H).requires_grad_()
    weight.requires_grad_()
    group = {"process_group": dist.group.WORLD} if sharded else {}

    def call():
        hidden.grad = weight.grad = None
        if sharded:
            dist.barrier()  # ranks start together: the time is the group's, not a rank's head start
        t0 = time.perf_counter()
        out = softpo.policy_loss(softpo.SAPO, targets, mask, advantages, hidden=hidden, weight=weight,
                                 impl="torch", **group)
        out.loss.backward()
        return time.perf_counter() - t0

    call()  # warm-up: first-call allocations and lazy initialization
    hidden.grad = weight.grad = None
    probe = MemoryProbe("cpu")
    probe.reset()
    samples = [call()]
    peak = probe.peak()
    grads = grad_bytes([hidden, weight])
    samples += [call() for _ in range(spec["samples"] - 1)]
    result = {
        "rank": rank, "vocab_rows": [rows.start, rows.stop], "time_median_s": statistics.median(samples),
        "time_min_s": min(samples), "time_max_s": max(samples), "n_samples": len(samples),
        "peak_mem_bytes": peak, "grad_bytes": grads, "working_bytes": peak - grads,
        "input_bytes": hidden.nbytes + weight.nbytes + targets.nbytes,
    }
    Path(out_dir, f"{'sharded' if sharded else 'single'}-rank{rank}.json").write_text(json.dumps(result))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(world: int, spec: dict, out_dir: str, timeout_s: float) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_rank_main, args=(world, port, spec, out_dir), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.5, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"vocab-parallel bench: {world} processes still running after {timeout_s:.0f} s")
    kind = "sharded" if spec["sharded"] else "single"
    return [json.loads(Path(out_dir, f"{kind}-rank{r}.json").read_text()) for r in range(world)]


def run(world: int, N: int, H: int, V: int, dtype: str = "float32", samples: int = 3,
        timeout_s: float = 1800.0) -> dict:
    """Measure both runs and return the record (device, versions, date, shape, results, ceilings)."""
    if world < 2:
        raise ValueError(f"--vocab-parallel needs at least 2 processes, got {world}")
    spec = {"N": N, "H": H, "V": V, "dtype": dtype, "samples": samples}
    dev, versions = environment("cpu")
    dev["threads_per_process"] = 1
    # Every process runs one thread, so the ceiling is one thread's too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ceilings = measure_ceilings("cpu", small=N * V < 2**20)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        single = _spawn(1, {**spec, "sharded": False}, tmp, timeout_s)[0]
        ranks = _spawn(world, {**spec, "sharded": True}, tmp, timeout_s)
    flops = 6 * N * H * V  # forward matmul, d hidden, d weight: 2NHV each (the chunked path adds a recompute)
    return {
        "schema": 1, "kind": "vocab-parallel", "device": dev, "versions": versions,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1m": os.getloadavg()[0],
        "case": {"objective": "sapo", "source": "hidden", "mode": "fwdbwd", "impl": "torch", **spec,
                 "processes": world, "work": {"kind": "flops", "count": flops}},
        "ceilings": ceilings,
        "memory_method": "peak RSS (VmHWM reset by /proc/self/clear_refs) above the RSS before the call, "
                         "one fresh single-threaded process per rank",
        "single": single,
        "ranks": ranks,
        "summary": {
            "time_ratio": max(r["time_median_s"] for r in ranks) / single["time_median_s"],
            "peak_mem_ratio": max(r["peak_mem_bytes"] for r in ranks) / max(single["peak_mem_bytes"], 1),
            "grad_ratio": max(r["grad_bytes"] for r in ranks) / max(single["grad_bytes"], 1),
            "single_fraction_of_matmul": flops / single["time_median_s"] / ceilings["matmul_flops_per_s"],
        },
    }


def markdown(doc: dict) -> str:
    case, s = doc["case"], doc["summary"]
    lines = [
        f"# softpo vocab-parallel sweep: {doc['device']['name']}, {doc['date'][:10]}",
        "",
        f"SAPO forward and backward on the hidden path, N={case['N']}, H={case['H']}, V={case['V']}, "
        f"{case['dtype']}, impl=torch; the lm_head split over {case['processes']} gloo processes against one "
        f"process holding all of it. One thread per process. Load average at the end: {doc['loadavg_1m']:.2f}.",
        f"Matmul ceiling of one thread, measured in this run: "
        f"{doc['ceilings']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(the single run reaches {100 * s['single_fraction_of_matmul']:.0f}% of it counting 6NHV).",
        "",
        "| run | vocab rows | median time | peak above inputs | of which gradients | working memory |",
        "|---|---|---|---|---|---|",
    ]

    def row(name, r):
        a, b = r["vocab_rows"]
        return (f"| {name} | {a}..{b} ({b - a}) | {r['time_median_s'] * 1e3:.0f} ms | "
                f"{r['peak_mem_bytes'] / MIB:.1f} MiB | {r['grad_bytes'] / MIB:.1f} MiB | "
                f"{r['working_bytes'] / MIB:.1f} MiB |")

    lines.append(row("single process", doc["single"]))
    lines += [row(f"rank {r['rank']}", r) for r in doc["ranks"]]
    lines += [
        "",
        f"Slowest rank / single process: {s['time_ratio']:.2f}x time; largest rank / single: "
        f"{s['peak_mem_ratio']:.2f}x peak memory, {s['grad_ratio']:.2f}x gradient memory.",
        "",
    ]
    return "\n".join(lines)


def main(world: int, shape: str, out: str, samples: int) -> int:
    try:
        N, H, V = (int(x) for x in shape.split(","))
    except ValueError:
        print(f"softpo bench: --vp-shape must be N,H,V (three integers), got {shape!r}", file=sys.stderr)
        return 2
    doc = run(world, N, H, V, samples=samples)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{doc['date'][:10]}-vocab-parallel-P{world}"
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {out_dir / stem}.json and .md")
    return 0
