"""The cost of the sampler's options on `token_logprobs` (forward + backward), each against the plain call.

    python bench/bench_sampling.py [--impl torch] [--N 512 --H 256 --V 8192] [--out bench/results/FILE.json]

Each option runs in a fresh process (so that its peak resident memory is its own): median wall time of the
forward and backward over a few repeats, and the process's peak RSS, next to the plain call's. On CPU this
measures the chunked torch path (or the Triton interpreter, which says nothing about GPU cost): the
threshold search's extra read and the per-row sweeps of batch_invariant show up as on a GPU, their ratios do not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

OPTIONS = {
    "plain": {},
    "temperature-per-sequence": {"temperature": "per-sequence"},
    "scale-softcap": {"logit_scale": 0.5, "softcap": 30.0},
    "top-k-50": {"top_k": 50},
    "top-p-0.9": {"top_p": 0.9},
    "min-p-0.05": {"min_p": 0.05},
    "top-k-top-p-min-p": {"top_k": 50, "top_p": 0.9, "min_p": 0.05},
    "batch-invariant": {"batch_invariant": True},
}


def run_one(option: str, impl: str, N: int, H: int, V: int, repeats: int) -> dict:
    import softpo

    g = torch.Generator().manual_seed(0)
    B = 4
    hidden = torch.randn(B, N // B, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2 / H ** 0.5)
    targets = torch.randint(0, V, (B, N // B), generator=g)
    settings = dict(OPTIONS[option])
    if settings.get("temperature") == "per-sequence":
        settings["temperature"] = 0.7 + 0.6 * torch.rand(B, generator=g)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        start = time.perf_counter()
        logp = softpo.token_logprobs(targets, hidden=h, weight=w, impl=impl, **settings)
        logp.masked_fill(logp == float("-inf"), 0.0).sum().backward()
        times.append(time.perf_counter() - start)
    # Linux reports ru_maxrss in KiB.
    return {"median_s": statistics.median(times[1:]), "times_s": times[1:],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="torch", choices=["torch", "triton"])
    parser.add_argument("--N", type=int, default=512)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--V", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.impl, args.N, args.H, args.V, args.repeats)))
        return
    results = {}
    for option in OPTIONS:
        command = [sys.executable, __file__, "--child", option, "--impl", args.impl, "--N", str(args.N),
                   "--H", str(args.H), "--V", str(args.V), "--repeats", str(args.repeats)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[option] = json.loads(done.stdout.strip().splitlines()[-1])
        print(option, f"{results[option]['median_s'] * 1e3:.1f} ms", f"{results[option]['peak_rss_mib']:.0f} MiB",
              flush=True)
    plain = results["plain"]
    for value in results.values():
        value["time_vs_plain"] = value["median_s"] / plain["median_s"]
        value["peak_rss_vs_plain_mib"] = value["peak_rss_mib"] - plain["peak_rss_mib"]
    record = {
        "what": "token_logprobs forward + backward, hidden path, each sampler option against the plain call",
        "command": " ".join(["python", "bench/bench_sampling.py"] + sys.argv[1:]),
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "impl": args.impl,
        "note": "CPU timings of the chunked torch path; they are not a measure of GPU cost (the Triton path "
                "searches thresholds on the tile it holds, with no extra matmul)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "shapes": {"N": args.N, "H": args.H, "V": args.V, "dtype": "float32", "repeats": args.repeats},
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    print(json.dumps({k: (v["time_vs_plain"], v["peak_rss_vs_plain_mib"]) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
