"""Extra peak CPU memory of one SAPO forward + backward from hidden states: softpo's chunked torch path
against torch's own chunked `F.linear_cross_entropy` (its log-prob, then the same objective), recorded.

    python bench/memory_cpu.py                      # N=512, H=256, V=151936, fp32
    python bench/memory_cpu.py --N 1024 --V 32000 --out /tmp

Each provider runs in a fresh process, measured as `softpo bench` measures CPU memory: glibc returns every
allocation of 64 KiB or more to the kernel on free, the peak RSS (VmHWM) is reset by /proc/self/clear_refs
just before the measured call and read after it, minus the RSS at the reset. The inputs (and the gradients
of earlier calls, cleared first) are not counted; the d hidden and d weight the call leaves are. One warm-up
call, then the measured call, then timed calls (median). Writes <out>/cpu-memory-<date>-torch<release>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MIB = 1 << 20
PROVIDERS = {
    "softpo": "softpo.policy_loss(SAPO, hidden=..., weight=..., impl='torch')",
    "torch-linear-ce": "-F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()) as logp, "
                       "then softpo.objectives.policy_objective(SAPO)",
    # torch's default, options=None: its reference path, the one a call without options takes.
    "torch-linear-ce-default": "-F.linear_cross_entropy(reduction='none') as logp (options=None), "
                               "then softpo.objectives.policy_objective(SAPO)",
}
MARK = "MEMORY_CPU_RESULT "


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _return_freed_memory() -> None:
    # glibc would otherwise raise its mmap threshold after large frees and keep freed blocks in the heap.
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def _inputs(N: int, H: int, V: int, dtype: torch.dtype) -> dict:
    import softpo

    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (1, N), generator=gen)
    hidden = torch.randn(1, N, H, generator=gen, dtype=dtype).requires_grad_()
    # Logits with a standard deviation near 2, as a trained lm_head gives.
    weight = (torch.randn(V, H, generator=gen, dtype=dtype) * (2 / H**0.5)).requires_grad_()
    with torch.no_grad():
        logp = softpo.token_logprobs(targets, hidden=hidden, weight=weight, impl="torch")
    return dict(targets=targets, hidden=hidden, weight=weight, mask=torch.ones(1, N, dtype=torch.bool),
                advantages=torch.randn(1, generator=gen), old_logp=logp + 0.05 * torch.randn(1, N, generator=gen))


def _step(provider: str, x: dict):
    import softpo
    from softpo import objectives

    def step():
        if provider == "softpo":
            loss = softpo.policy_loss(softpo.SAPO, x["targets"], x["mask"], x["advantages"], hidden=x["hidden"],
                                      weight=x["weight"], old_logp=x["old_logp"], impl="torch").loss
        else:
            H = x["hidden"].shape[-1]
            neg_ce = torch.nn.functional.linear_cross_entropy(
                x["hidden"].reshape(-1, H), x["weight"], x["targets"].reshape(-1), reduction="none",
                options=torch.nn.LinearCrossEntropyOptions() if provider == "torch-linear-ce" else None)
            logp = -neg_ce.float().view(x["targets"].shape)
            loss, _ = objectives.policy_objective(softpo.SAPO, logp, x["mask"], x["advantages"],
                                                  old_logp=x["old_logp"])
        loss.backward()

    return step


def worker(provider: str, N: int, H: int, V: int, dtype: str, samples: int) -> dict:
    _return_freed_memory()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    x = _inputs(N, H, V, getattr(torch, dtype))
    step = _step(provider, x)

    def clear():
        x["hidden"].grad = x["weight"].grad = None
        gc.collect()

    step()  # warm-up
    clear()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    step()
    times = [time.perf_counter() - t0]
    peak = _status_kib("VmHWM") * 1024 - base
    for _ in range(samples - 1):
        clear()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"provider": provider, "label": PROVIDERS[provider], "peak_bytes": peak, "peak_mib": round(peak / MIB, 1),
            "time_median_s": statistics.median(times), "times_s": times, "loadavg_1m": os.getloadavg()[0]}


def run_isolated(provider: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--worker", provider, "--N", str(args.N), "--H", str(args.H), "--V", str(args.V),
           "--dtype", args.dtype, "--samples", str(args.samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{provider} worker failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=512)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--V", type=int, default=151936)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--samples", type=int, default=5, help="timed calls per provider (the first is measured)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", choices=list(PROVIDERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(args.worker, args.N, args.H, args.V, args.dtype, args.samples)), flush=True)
        return 0

    import softpo

    results = [run_isolated(p, args) for p in args.providers]
    by_name = {r["provider"]: r for r in results}
    today = dt.date.today().isoformat()
    doc = {
        "device": {"type": "cpu", "name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "softpo": getattr(softpo, "__version__", None)},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/memory_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "case": {"objective": "sapo", "mode": "forward+backward", "path": "hidden", "N": args.N, "H": args.H,
                 "V": args.V, "dtype": args.dtype, "mask": "all valid"},
        "memory_method": "peak RSS (VmHWM, reset by /proc/self/clear_refs) above the RSS before the call, one fresh "
                         "process per provider, glibc mmap threshold 64 KiB; inputs not counted, the gradients the "
                         "call leaves counted",
        "timing_method": "perf_counter, median of the measured call and the calls after it (warm-up excluded)",
        "results": results,
    }
    if "softpo" in by_name:
        doc["softpo_over_native_peak"] = {
            name: round(by_name["softpo"]["peak_bytes"] / r["peak_bytes"], 3)
            for name, r in by_name.items() if name != "softpo"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch_release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    path = out / f"cpu-memory-{today}-torch{torch_release}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    for r in results:
        print(f"{r['provider']:>23}: peak {r['peak_mib']:.1f} MiB, median {r['time_median_s'] * 1e3:.1f} ms")
    for name, ratio in doc.get("softpo_over_native_peak", {}).items():
        print(f"softpo / {name} peak: {ratio:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
