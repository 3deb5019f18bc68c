"""Where one softpo loss step spends its time, kernel by kernel: `python -m softpo.bench.profile_step`.

Runs softpo-triton (softpo-torch on CPU) on one benchmark case under torch.profiler and writes a JSON record:
the device time of each kind of kernel per step (the matmul library's GEMMs, softpo's sweep kernels, the
elementwise and reduction kernels of the objective and the fp32 accumulator, copies), the largest kernels,
the step's wall time, and the share of it the device was busy (the rest is host time the GPU waited for).

    python -m softpo.bench.profile_step --out bench/results [--path hidden] [--objective sapo] [--N 16384]
        [--H 4096] [--V 151936] [--dtype bf16] [--memory default]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

import torch

from .cases import DTYPES, OBJECTIVES, Case, make_inputs, rows_of
from .providers import SoftpoProvider

# Kernel names to the part of the step they do, first match wins. cuBLAS/CUTLASS GEMMs go by several names.
KINDS = (
    ("sweep", re.compile(r"_logits_(fwd|bwd)_kernel|_token_terms_kernel|_scale_kernel")),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|aten::(mm|addmm_?|matmul|bmm)$", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|aten::(to|_to_copy|copy_|clone|contiguous|fill_|zero_)$", re.I)),
    ("reduction", re.compile(r"reduce|aten::(sum|mean|amax|amin|max|min|argsort|sort|cumsum|all|any)$", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|aten::", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def profile(case: Case, device: str, memory: str, steps: int) -> dict:
    provider = SoftpoProvider("triton" if device == "cuda" else "torch", memory=memory)
    inputs = make_inputs(case, device)
    run = provider.build(case, inputs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # compile the kernels, warm the allocator
        run()
        for leaf in inputs["leaves"]:
            leaf.grad = None
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
            for leaf in inputs["leaves"]:
                leaf.grad = None
        sync()
        wall = (time.perf_counter() - start) / steps
    kernels = {}
    for event in prof.key_averages():
        # On CUDA the device kernels carry the time; on CPU the aten ops with self time are the work.
        spent = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if spent <= 0 or (device == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        if device != "cuda" and not event.key.startswith("aten::"):
            continue
        kernels[event.key] = {"ms_per_step": spent / 1e3 / steps, "calls_per_step": event.count / steps,
                              "kind": kind_of(event.key)}
    by_kind: dict[str, float] = {}
    for stats in kernels.values():
        by_kind[stats["kind"]] = by_kind.get(stats["kind"], 0.0) + stats["ms_per_step"]
    busy = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda item: -item[1]["ms_per_step"])[:20]
    return {
        "wall_ms_per_step": wall * 1e3,
        "device_busy_ms_per_step": busy,
        "device_busy_fraction": busy / (wall * 1e3) if wall > 0 else None,
        "ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "launches_per_step": sum(s["calls_per_step"] for s in kernels.values()),
        "top_kernels": [dict(name=name, **stats) for name, stats in top],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--path", choices=("hidden", "logits"), default="hidden")
    parser.add_argument("--objective", choices=OBJECTIVES, default="sapo")
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--H", type=int, default=4096)
    parser.add_argument("--V", type=int, default=151936)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--memory", choices=("default", "flat"), default="default")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    B, T = rows_of(args.N, args.T)
    case = Case(args.path, "fwdbwd", args.objective, False, B, T, args.V,
                          H=args.H if args.path == "hidden" else 0, dtype=args.dtype)
    result = profile(case, args.device, args.memory, args.steps)
    import triton

    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    doc = {
        "what": "one loss step (forward and backward) under torch.profiler",
        "device": {"type": args.device, "name": name},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case": case.to_dict(), "memory": args.memory, "steps": args.steps, **result,
    }
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = os.path.join(args.out, f"{args.device}-{slug}-{doc['date'][:10]}-profile-{case.id}-{args.memory}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=1)
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in result["ms_per_step_by_kind"].items())
    print(f"{path}: {result['wall_ms_per_step']:.2f} ms per step, device busy "
          f"{result['device_busy_ms_per_step']:.2f} ms; by kind {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
