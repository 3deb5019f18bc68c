"""The cost of the sampler's options on `token_logprobs` (forward + backward), each against the plain call.

    python bench/bench_sampling.py [--impl torch] [--N 512 --H 256 --V 8192] [--out bench/results/FILE.json]

Wall time of the forward and backward (median and fastest of a few rounds, the options interleaved round by
round), and, each option in a fresh process, the growth of the process's peak RSS over two calls (the call's
peak extra memory), next to the plain call's. On CPU this
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


def make_call(option: str, impl: str, N: int, H: int, V: int):
    """A function running one forward + backward of `option`."""
    import softpo

    g = torch.Generator().manual_seed(0)
    B = 4
    hidden = torch.randn(B, N // B, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2 / H ** 0.5)
    targets = torch.randint(0, V, (B, N // B), generator=g)
    settings = dict(OPTIONS[option])
    if settings.get("temperature") == "per-sequence":
        settings["temperature"] = 0.7 + 0.6 * torch.rand(B, generator=g)

    def call():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = softpo.token_logprobs(targets, hidden=h, weight=w, impl=impl, **settings)
        logp.masked_fill(logp == float("-inf"), 0.0).sum().backward()

    return call


def peak_memory(option: str, impl: str, N: int, H: int, V: int) -> dict:
    """The growth of this (fresh) process's peak RSS over two calls: the call's peak extra memory."""
    call = make_call(option, impl, N, H, V)
    # Linux reports ru_maxrss in KiB; the peak before the first call leaves out the interpreter, torch and inputs.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    call()
    return {"call_peak_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def timings(impl: str, N: int, H: int, V: int, rounds: int) -> dict:
    """Each option's times, the options interleaved round by round so that a busy neighbour slows them all."""
    calls = {option: make_call(option, impl, N, H, V) for option in OPTIONS}
    for call in calls.values():
        call()  # warm-up
    times = {option: [] for option in OPTIONS}
    for _ in range(rounds):
        for option, call in calls.items():
            start = time.perf_counter()
            call()
            times[option].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="torch", choices=["torch", "triton"])
    parser.add_argument("--N", type=int, default=512)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--V", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(peak_memory(args.child, args.impl, args.N, args.H, args.V)))
        return
    results = {}
    for option in OPTIONS:
        command = [sys.executable, __file__, "--child", option, "--impl", args.impl, "--N", str(args.N),
                   "--H", str(args.H), "--V", str(args.V)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[option] = json.loads(done.stdout.strip().splitlines()[-1])
    for option, times in timings(args.impl, args.N, args.H, args.V, args.rounds).items():
        results[option].update(median_s=statistics.median(times), min_s=min(times), times_s=times)
    plain = results["plain"]
    for value in results.values():
        value["time_vs_plain"] = value["median_s"] / plain["median_s"]
        value["call_peak_rss_vs_plain"] = value["call_peak_rss_mib"] / max(plain["call_peak_rss_mib"], 1e-9)
    record = {
        "what": "token_logprobs forward + backward, hidden path, each sampler option against the plain call",
        "command": " ".join(["python", "bench/bench_sampling.py"] + sys.argv[1:]),
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "impl": args.impl,
        "note": "CPU timings of the chunked torch path; they are not a measure of GPU cost (the Triton path "
                "searches thresholds on the tile it holds, with no extra matmul)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "shapes": {"N": args.N, "H": args.H, "V": args.V, "dtype": "float32", "rounds": args.rounds},
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    for name, value in results.items():
        print(f"{name:26s} time x{value['time_vs_plain']:.2f}  peak memory x{value['call_peak_rss_vs_plain']:.2f}")


if __name__ == "__main__":
    main()
