"""The cost of the sampler's options, each against the plain call, on CPU or on a GPU.

    python bench/bench_sampling.py [--impl torch] [--N 512 --H 256 --V 8192] [--out bench/results/FILE.json]
    python bench/bench_sampling.py --device cuda --impl triton --dtype bfloat16 --N 16384 --H 4096 --V 151936 \\
        --out bench/results/FILE.json

Each option is `token_logprobs` forward + backward on the hidden path; the `loss-*` options are SAPO's
`policy_loss` (token-mean) forward + backward, plain and with top-k, whose route (`softpo.routes`) is recorded.
Wall time: median and fastest of a few rounds, the options interleaved round by round. Memory: on CPU each
option in a fresh process, the peak RSS during two calls above the RSS before them; on CUDA the peak of
torch.cuda.max_memory_allocated above the inputs during one call. On CUDA the record also holds the bf16
matmul rate measured in the same run (the ceiling: each option's ideal time counts 8NHV for log-probs, 6NHV
for the loss), and whether `batch_invariant=True` gives the same bits for 64 rows alone and inside the batch.
On CPU this measures the chunked torch path (or the Triton interpreter, which says nothing about GPU cost).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
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
    "loss-plain": {"loss": True},
    "loss-top-k-50": {"loss": True, "top_k": 50},
}
# Rows per sequence: the per-sequence temperature and the loss's advantages take one value per row of B.
SEQUENCES = 4


def inputs(N: int, H: int, V: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQUENCES, N // SEQUENCES, H, generator=g).to(device, dtype)
    # Logits with a standard deviation near 2, as a trained lm_head gives.
    weight = (torch.randn(V, H, generator=g) * (2 / H ** 0.5)).to(device, dtype)
    # Targets drawn from the model itself, as a sampler's are: most lie inside any truncated kept set.
    rows = hidden.reshape(-1, H)
    targets = torch.empty(rows.shape[0], dtype=torch.long, device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for r0 in range(0, rows.shape[0], 64):  # small blocks: the peak RSS before a call stays low
            probs = torch.softmax((rows[r0:r0 + 64] @ weight.T).float(), -1)
            targets[r0:r0 + 64] = torch.multinomial(probs, 1)[:, 0]
    return hidden, weight, targets.view(SEQUENCES, -1), g


def make_call(option: str, impl: str, N: int, H: int, V: int, device: str = "cpu", dtype=torch.float32):
    """(a function running one forward + backward of `option`, a function giving the route it took)."""
    import softpo

    hidden, weight, targets, g = inputs(N, H, V, device, dtype)
    settings = dict(OPTIONS[option])
    loss = settings.pop("loss", False)
    if settings.get("temperature") == "per-sequence":
        settings["temperature"] = (0.7 + 0.6 * torch.rand(SEQUENCES, generator=g)).to(device)
    mask = torch.ones(targets.shape, dtype=torch.bool, device=device)
    advantages = torch.randn(SEQUENCES, generator=g).to(device)

    def call():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if loss:
            config = softpo.SAPO.replace(loss_aggregation="token-mean")
            out = softpo.policy_loss(config, targets, mask, advantages, hidden=h, weight=w, impl=impl, **settings)
            out.loss.backward()
        else:
            logp = softpo.token_logprobs(targets, hidden=h, weight=w, impl=impl, **settings)
            logp.masked_fill(logp == float("-inf"), 0.0).sum().backward()

    def route():
        if not loss:
            return "log-probs"
        chosen = []
        choose = softpo.routes.choose

        def recording(*args, **kwargs):
            decision = choose(*args, **kwargs)
            chosen.append(decision[0])
            return decision

        softpo.routes.choose = recording
        try:
            call()
        finally:
            softpo.routes.choose = choose
        return chosen[0]

    return call, route


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def peak_rss(option: str, impl: str, N: int, H: int, V: int) -> dict:
    """This (fresh) process's peak RSS during two calls, after a warm-up, above its RSS before them: the call's
    peak extra memory."""
    call, _ = make_call(option, impl, N, H, V)
    call()  # warm-up: a first call also imports and initializes what the op's dispatch needs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS
    before = _status_kib("VmRSS")
    call()
    call()
    return {"call_peak_mib": (_status_kib("VmHWM") - before) / 1024}


def peak_cuda(call) -> dict:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return {"call_peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


def timings(calls: dict, rounds: int, device: str) -> dict:
    """Each option's times, the options interleaved round by round so that a busy neighbour slows them all."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for call in calls.values():
        call()  # warm-up (and, on a GPU, the kernels' compilation and autotuning)
    times = {option: [] for option in calls}
    for _ in range(rounds):
        for option, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[option].append(time.perf_counter() - start)
    return times


def matmul_rate(device: str, dtype, H: int, V: int) -> float:
    """FLOP/s of a [4096, H] x [H, V] matmul in `dtype`: the ceiling the sweeps' matmuls run against."""
    a = torch.randn(4096, H, device=device, dtype=dtype)
    b = torch.randn(V, H, device=device, dtype=dtype)
    for _ in range(3):
        a @ b.T
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b.T
    torch.cuda.synchronize()
    return 10 * 2 * 4096 * H * V / (time.perf_counter() - start)


def batch_invariance(impl: str, H: int, V: int, device: str, dtype) -> dict:
    """Whether the log-probs and d hidden of 64 rows are bitwise the same alone and inside a batch of 4096
    (and in reverse order), with and without batch_invariant."""
    import softpo

    hidden, weight, targets, _ = inputs(4096, H, V, device, dtype, seed=1)
    hidden, targets = hidden.reshape(-1, H), targets.reshape(-1)
    out = {}
    for invariant in (False, True):
        def rows(h, t):
            h = h.clone().requires_grad_()
            logp = softpo.token_logprobs(t, hidden=h, weight=weight, impl=impl, batch_invariant=invariant)
            logp.sum().backward()
            return logp.detach(), h.grad

        alone = rows(hidden[:64], targets[:64])
        inside = rows(hidden, targets)
        reverse = rows(hidden.flip(0), targets.flip(0))
        same = all(torch.equal(a, b[:64]) for a, b in zip(alone, inside)) and \
            all(torch.equal(a, b.flip(0)[:64]) for a, b in zip(alone, reverse))
        out["batch_invariant" if invariant else "default"] = {"bitwise_same": same}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="torch", choices=["torch", "triton"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--N", type=int, default=512)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--V", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.child:
        print(json.dumps(peak_rss(args.child, args.impl, args.N, args.H, args.V)))
        return
    import softpo

    cuda = args.device == "cuda"
    made = {option: make_call(option, args.impl, args.N, args.H, args.V, args.device, dtype) for option in args.options}
    results = {option: {"route": route()} for option, (_, route) in made.items()}
    for option in args.options:
        if cuda:
            results[option].update(peak_cuda(made[option][0]))
        else:
            command = [sys.executable, __file__, "--child", option, "--impl", args.impl, "--N", str(args.N),
                       "--H", str(args.H), "--V", str(args.V)]
            # glibc returns every allocation of 64 KiB or more to the kernel on free, so RSS follows the tensors.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            results[option].update(json.loads(done.stdout.strip().splitlines()[-1]))
    times = timings({option: call for option, (call, _) in made.items()}, args.rounds, args.device)
    for option, samples in times.items():
        results[option].update(median_s=statistics.median(samples), min_s=min(samples), times_s=samples)
    ceilings = {}
    if cuda:
        rate = matmul_rate(args.device, dtype, args.H, args.V)
        ceilings = {"matmul_flops_per_s": rate, "matmul_shape": [4096, args.H, args.V]}
        for option, value in results.items():
            flops = (6 if option.startswith("loss") else 8) * args.N * args.H * args.V
            value["fraction_of_matmul_ceiling"] = flops / rate / value["median_s"]
    for option, value in results.items():
        plain = results.get("loss-plain" if option.startswith("loss") else "plain")
        if plain is not None:
            value["time_vs_plain"] = value["median_s"] / plain["median_s"]
            value["peak_vs_plain"] = value["call_peak_mib"] / max(plain["call_peak_mib"], 1e-9)
    device = torch.cuda.get_device_name() if cuda else \
        f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    record = {
        "what": "token_logprobs forward + backward, hidden path, each sampler option against the plain call; "
                "loss-*: SAPO policy_loss (token-mean) forward + backward, plain and truncated, with its route",
        "command": " ".join(["python", "bench/bench_sampling.py"] + sys.argv[1:]),
        "device": device,
        "impl": args.impl,
        "memory": "torch.cuda.max_memory_allocated above the inputs, one call" if cuda else
                  "a fresh process's peak RSS during two calls above its RSS before them "
                  "(glibc mmap threshold 64 KiB)",
        "note": "" if cuda else "CPU timings of the chunked torch path (or the Triton interpreter); they are not a "
                                "measure of GPU cost (the Triton path searches thresholds on the tile it holds, with "
                                "no extra matmul)",
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "softpo": getattr(softpo, "__version__", None)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {"N": args.N, "H": args.H, "V": args.V, "dtype": args.dtype, "rounds": args.rounds},
        "ceilings": ceilings,
        "results": results,
    }
    if cuda:
        record["batch_invariance"] = batch_invariance(args.impl, args.H, args.V, args.device, dtype)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    for name, value in results.items():
        print(f"{name:26s} {value['route']:18s} time x{value.get('time_vs_plain', float('nan')):.2f}  "
              f"peak memory x{value.get('peak_vs_plain', float('nan')):.2f}")
    if cuda:
        print("batch invariance:", record["batch_invariance"])


if __name__ == "__main__":
    main()
