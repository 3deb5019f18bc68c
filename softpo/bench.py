"""`softpo bench`: the microbenchmarks against the peers, side by side in one run, recorded.

Every case of a set (bench/providers.py) runs with every provider: softpo's Triton and chunked torch
paths, torch eager and torch.compile on materialized logits, Liger-Kernel's two GRPO losses, and TRL's
chunked log-prob with TRL's loss formula. A provider that cannot run a case is recorded as skipped,
with the reason. Each result holds the median and spread of the time (warm-up excluded), the peak
memory above the inputs, and the fraction of a ceiling measured in the same run: the matmul rate for
the hidden path (FLOPs), the device-to-device copy bandwidth for the logits path (bytes).

    softpo bench --device cuda                       # the GPU set: H=4096, V in {128256, 151936}, bf16
    softpo bench --device cuda --resume --time-limit 540   # the same, in pieces under a time limit
    softpo bench --quick --device cpu                # small CPU shapes plus the core memory case
    softpo bench --device cuda --round2              # issue 15's targets with their peers (bench/gpu_round2.sh)

Writes <out>/<device>-<date>[-<set>].json (out defaults to ./bench/results), a markdown table next to it and
one PNG per family of cases (time and peak memory against N, one line per provider).

Memory: on CUDA, torch.cuda.max_memory_allocated above what is allocated before the measured call. On
CPU, each (case, provider) runs in a fresh process with glibc told to return every allocation of 64 KiB
or more to the kernel on free; the process's peak RSS (VmHWM) is reset just before the measured call
(/proc/self/clear_refs) and read after it, minus the RSS at the reset.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

WORKER_MARK = "@@softpo-bench-result@@"
MIB = 2**20


# ---------------------------------------------------------------- locating bench/providers.py


def find_bench_dir(explicit: str | None = None) -> Path:
    """bench/ of the source checkout: --bench-dir, next to this package (editable install), or ./bench."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parents[1] / "bench", Path.cwd() / "bench"]
    for candidate in candidates:
        if (candidate / "providers.py").is_file():
            return candidate.resolve()
    # A regular (non-editable) install has no bench/: the cases and providers live in the source tree.
    raise ValueError(
        f"the benchmark cases (bench/providers.py) are not in {' or '.join(str(c) for c in candidates)}: run "
        "`softpo bench` inside a softpo source checkout, or pass --bench-dir PATH/TO/softpo/bench"
    )


def load_providers(bench_dir: Path):
    name = "softpo_bench_providers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, bench_dir / "providers.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves annotations through sys.modules, so register before executing.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- timing and memory


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Seconds of one call: CUDA events on GPU (after a sync, so the launch queue is empty), perf_counter on CPU."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn) -> float:
        synchronize(self.device)
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1))


def cpu_memory_setup() -> bool:
    """Make freed CPU memory leave the process, so that peak RSS follows live allocations.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large frees, after which freed
    blocks stay in the heap and RSS overstates or, after a warm-up, understates what a call needs.
    A fixed threshold turns the dynamic adjustment off."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one call above what was allocated when `reset` ran."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0

    def reset(self) -> None:
        gc.collect()
        synchronize(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        synchronize(self.device)
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def cache_bytes(device: str) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * MIB))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    except (OSError, ValueError):
        return 32 * MIB


def grad_bytes(leaves) -> int:
    """Bytes of the gradients a call left on its inputs, not counting one written into the input's own
    storage (Liger's in-place backward)."""
    return sum(
        leaf.grad.nbytes for leaf in leaves
        if leaf.grad is not None and leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()
    )


def _quantile(values, q):
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def measure(providers, case, provider, device: str, *, target_s: float, min_samples: int, max_samples: int) -> dict:
    """Run one (case, provider) in this process: warm-up, one call under the memory probe, then timed calls."""
    result = {"case": case.id, "provider": provider.name, "status": "ok", "reason": None}
    # Small inputs would sit in L2 (L3 on CPU) and flatter every provider; rotate enough input sets to spill it.
    n_sets = max(1, min(8, math.ceil(4 * cache_bytes(device) / max(case.input_bytes(), 1))))
    sets = [providers.make_inputs(case, device, seed=i, extra_position=provider.extra_position) for i in range(n_sets)]
    fns = [provider.build(case, inputs) for inputs in sets]
    timer, probe = Timer(device), MemoryProbe(device)

    def clear_grads(inputs):
        for leaf in inputs["leaves"]:
            leaf.grad = None

    clear_grads(sets[0])
    result["first_call_s"] = timer(fns[0])  # includes compilation and autotuning
    for inputs, fn in zip(sets[1:], fns[1:]):
        clear_grads(inputs)
        fn()
    for inputs in sets:
        clear_grads(inputs)
    probe.reset()
    samples = [timer(fns[0])]
    result["peak_mem_bytes"] = probe.peak()
    result["grad_bytes"] = grad_bytes(sets[0]["leaves"])
    n = max(min_samples, min(max_samples, int(target_s / max(samples[0], 1e-9))))
    for i in range(1, n):
        inputs = sets[i % n_sets]
        clear_grads(inputs)
        samples.append(timer(fns[i % n_sets]))
    result.update(
        time_median_s=statistics.median(samples),
        time_q25_s=_quantile(samples, 0.25),
        time_q75_s=_quantile(samples, 0.75),
        time_min_s=min(samples),
        time_max_s=max(samples),
        n_samples=len(samples),
        n_input_sets=n_sets,
        # Other work on the machine inflates CPU times; the load says how much there was.
        loadavg_1m=os.getloadavg()[0],
        input_bytes=sum(t.nbytes for k, t in sets[0].items() if isinstance(t, torch.Tensor)),
    )
    return result


def measure_safely(providers, case, provider, device, **kwargs) -> dict:
    try:
        return measure(providers, case, provider, device, **kwargs)
    except torch.OutOfMemoryError as error:
        reason = f"out of memory: {str(error).splitlines()[0][:200]}"
    except Exception as error:  # a peer failing on a case is a result to record, not a crash
        last = traceback.extract_tb(error.__traceback__)[-1]
        reason = f"error: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''} " \
                 f"({Path(last.filename).name}:{last.lineno})"
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"case": case.id, "provider": provider.name, "status": "error", "reason": reason}


def _worker(spec: dict) -> dict:
    torch.manual_seed(0)
    providers = load_providers(Path(spec["bench_dir"]))
    case = providers.Case.from_dict(spec["case"])
    provider = providers.PROVIDERS[spec["provider"]]
    return measure_safely(providers, case, provider, spec["device"], **spec["measure"])


def run_isolated(spec: dict, timeout_s: float) -> dict:
    """One (case, provider) in a fresh process, so that its peak RSS is its own."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    failed = {"case": spec["case"]["id"], "provider": spec["provider"], "status": "error"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "softpo.bench", "--worker"], input=json.dumps(spec), capture_output=True,
            text=True, env=env, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {**failed, "reason": f"error: timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK):])
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    killed = " (killed: likely out of memory)" if proc.returncode in (-9, 137) else ""
    return {**failed, "reason": f"error: worker exited with {proc.returncode}{killed}: {tail}"}


# ---------------------------------------------------------------- ceilings


def measure_ceilings(device: str, small: bool = False) -> dict:
    """The two ceilings every fraction refers to, measured now on this device (`small`: smaller, quicker
    and less exact operands, for the tiny set)."""
    timer = Timer(device)
    if device == "cuda":
        n, dtype, copy_bytes, reps = 8192, torch.bfloat16, 2**30, 20
    else:
        n, dtype, copy_bytes, reps = 2048, torch.float32, 2**28, 5
    if small:
        n, copy_bytes, reps = n // 2, copy_bytes // 4, 3

    def best_of(fn):
        for _ in range(2):
            fn()
        return statistics.median(timer(fn) for _ in range(reps))

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t_mm = best_of(lambda: torch.mm(a, b, out=c))
    del a, b, c
    src = torch.empty(copy_bytes, device=device, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    t_copy = best_of(lambda: dst.copy_(src))
    del src, dst
    if device == "cuda":
        # The caching allocator would otherwise hold the operands (2.4 GiB) away from --isolate workers.
        torch.cuda.empty_cache()
    return {
        "matmul_flops_per_s": 2 * n**3 / t_mm,
        "matmul": {"shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), "median_s": t_mm},
        # A copy reads and writes every byte once.
        "copy_bytes_per_s": 2 * copy_bytes / t_copy,
        "copy": {"bytes": copy_bytes, "median_s": t_copy},
    }


def best_ceilings(measured: list[dict]) -> dict:
    """The highest rate of each kind among the measurements of a run. Other load on the machine can
    only slow a measurement down, so the best one is the closest to the hardware's ceiling."""
    best_mm = max(measured, key=lambda m: m["matmul_flops_per_s"])
    best_copy = max(measured, key=lambda m: m["copy_bytes_per_s"])
    return {
        "matmul_flops_per_s": best_mm["matmul_flops_per_s"], "matmul": best_mm["matmul"],
        "copy_bytes_per_s": best_copy["copy_bytes_per_s"], "copy": best_copy["copy"],
    }


def recomputes_logits(provider_info: dict, case: dict) -> bool:
    """Whether the provider's backward recomputes the logits on this case: a flag, or the objectives it does so for."""
    flag = provider_info.get("recomputes_logits")
    return case["objective"] in flag if isinstance(flag, list) else bool(flag)


def add_fractions(result: dict, case: dict, provider_info: dict, ceilings: dict) -> None:
    if result.get("status") != "ok":
        return
    work = case["work"]
    rate = work["count"] / result["time_median_s"]
    if work["kind"] == "flops":
        result["ceiling"] = "matmul"
        result["ceiling_fraction"] = rate / ceilings["matmul_flops_per_s"]
        result["achieved_flops_per_s"] = rate
        if case["mode"] == "fwdbwd" and recomputes_logits(provider_info, case):
            # The logits are recomputed in backward: 8NHV executed for the 6NHV counted.
            result["executed_fraction"] = result["ceiling_fraction"] * 8 / 6
    else:
        result["ceiling"] = "copy"
        result["ceiling_fraction"] = rate / ceilings["copy_bytes_per_s"]
        result["achieved_bytes_per_s"] = rate


# ---------------------------------------------------------------- environment


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
        # Importable without install metadata (a source tree on PYTHONPATH): the module's own version.
        try:
            version = getattr(importlib.import_module(name.replace("-", "_")), "__version__", None)
        except ImportError:
            continue
        if version:
            return str(version)
    return None


def environment(device: str) -> tuple[dict, dict]:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev = {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory,
               "sm_count": props.multi_processor_count, "cuda": torch.version.cuda}
    else:
        model = platform.processor() or "cpu"
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
            model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE).group(1).strip()
        except (OSError, AttributeError):
            pass
        dev = {"type": "cpu", "name": model, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel", "liger_kernel"),
        "trl": _version("trl"),
        "transformers": _version("transformers"),
        "softpo": _version("softpo"),
    }
    return dev, versions


def device_slug(dev: dict) -> str:
    if dev["type"] == "cpu":
        return "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", dev["name"].lower()).strip("-").replace("nvidia-", "")
    return f"cuda-{name}"


# ---------------------------------------------------------------- outputs


def _fmt_time(s):
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _best_softpo(results_by_provider):
    times = [r["time_median_s"] for name, r in results_by_provider.items()
             if name.startswith("softpo") and r.get("status") == "ok"]
    return min(times) if times else None


def markdown(doc: dict) -> str:
    dev, versions, ceil = doc["device"], doc["versions"], doc["ceilings"]
    lines = [
        f"# softpo benchmarks: {dev['name']} ({dev['type']})",
        "",
        f"- date: {doc['date']}; set: `{doc['set']}`; complete: {doc['complete']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- reproduce: `{doc['command']}`",
        f"- ceilings, the best of the measurements at the start and end of the run: matmul "
        f"{ceil['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({ceil['matmul']['dtype']} "
        f"{'x'.join(map(str, ceil['matmul']['shape']))}), copy {ceil['copy_bytes_per_s'] / 1e9:.3g} GB/s "
        "(read + write); each measurement (TFLOP/s, GB/s, load average): "
        + "; ".join(f"{m['matmul_flops_per_s'] / 1e12:.3g}, {m['copy_bytes_per_s'] / 1e9:.3g}, "
                    f"{m.get('loadavg_1m', float('nan')):.1f}" for m in doc.get("ceilings_measured", [])),
        f"- time: median of {doc['timing']['method']} samples after one warm-up call, IQR in brackets; memory: "
        f"{doc['memory_method']}",
        "- % of ceiling: hidden path counts 2NHV FLOPs forward, 6NHV forward+backward against the matmul rate "
        "(providers marked * recompute the logits in backward, executing 8NHV); logits path counts "
        "N x V elements read forward, read + written backward, against the copy bandwidth.",
        "- x softpo: time / the fastest softpo provider on that case.",
    ]
    loads = [r["loadavg_1m"] for r in doc["results"] if "loadavg_1m" in r]
    if loads:
        cpus = dev.get("cpus") or dev.get("threads") or "?"
        lines.append(f"- machine load (1-minute load average) while measuring: {min(loads):.1f} to {max(loads):.1f} "
                     f"on {cpus} CPUs; other work on a shared machine slows and spreads the times")
    lines.append("")
    by_case: dict[str, dict] = {}
    for r in doc["results"]:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for case in doc["cases"]:
        rows = by_case.get(case["id"])
        if not rows:
            continue
        best = _best_softpo(rows)
        lines += [f"## {case['id']}", "",
                  "| provider | time ms [IQR] | peak MiB above inputs | same, less gradients | % of ceiling "
                  "| x softpo |", "|---|---|---|---|---|---|"]
        for name in doc["providers"]:
            r = rows.get(name)
            if r is None:
                continue
            star = "*" if recomputes_logits(doc["providers"][name], case) and case["path"] == "hidden" else ""
            if r["status"] != "ok":
                lines.append(f"| {name}{star} | {r['status']}: {r['reason']} | | | | |")
                continue
            iqr = f"[{_fmt_time(r['time_q25_s'])}, {_fmt_time(r['time_q75_s'])}]"
            ratio = f"{r['time_median_s'] / best:.2f}" if best else ""
            less_grads = (r["peak_mem_bytes"] - r.get("grad_bytes", 0)) / MIB
            lines.append(
                f"| {name}{star} | {_fmt_time(r['time_median_s'])} {iqr} | {r['peak_mem_bytes'] / MIB:.1f} | "
                f"{less_grads:.1f} | {100 * r['ceiling_fraction']:.1f} | {ratio} |"
            )
        lines.append("")
    lines += _core_memory_lines(doc, by_case)
    return "\n".join(lines) + "\n"


def _core_memory_lines(doc, by_case) -> list[str]:
    """softpo torch against materialized log_softmax(hidden @ weight.T) on the core issue's memory case."""
    out = []
    for case in doc["cases"]:
        if not (case["path"] == "hidden" and case["N"] == 4096 and case["H"] == 256 and case["V"] == 151936):
            continue
        rows = by_case.get(case["id"], {})
        ours, eager = rows.get("softpo-torch"), rows.get("torch-eager")
        if not (ours and eager and ours["status"] == eager["status"] == "ok"):
            continue
        if not out:
            out += ["## Core memory case (N=4096, H=256, V=151936, fp32): softpo torch vs materialized", "",
                    "| case | peak memory, softpo / eager | time, softpo / eager |", "|---|---|---|"]
        mem = ours["peak_mem_bytes"] / eager["peak_mem_bytes"] if eager["peak_mem_bytes"] > 0 else float("nan")
        out.append(f"| {case['id']} | {100 * mem:.1f}% | {ours['time_median_s'] / eager['time_median_s']:.2f}x |")
    return out + [""] if out else []


def plot(doc: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {c["id"]: c for c in doc["cases"]}
    families: dict[str, list] = {}
    for r in doc["results"]:
        case = cases.get(r["case"])
        if r["status"] == "ok" and case:
            families.setdefault(case["family"], []).append((case["N"], r))
    written = []
    for family, points in sorted(families.items()):
        if len({n for n, _ in points}) < 2:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in doc["providers"]:
            mine = sorted((n, r) for n, r in points if r["provider"] == name)
            if not mine:
                continue
            ns = [n for n, _ in mine]
            ax_t.plot(ns, [r["time_median_s"] * 1e3 for _, r in mine], marker="o", label=name)
            # A log axis needs positive values; peaks under 0.1 MiB are below what RSS resolves anyway.
            ax_m.plot(ns, [max(r["peak_mem_bytes"] / MIB, 0.1) for _, r in mine], marker="o", label=name)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{family} on {doc['device']['name']} ({doc['date'][:10]})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}-{family}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def finalize_fractions(doc: dict) -> None:
    """Every fraction of the record against the best ceilings measured in the run."""
    doc["ceilings"] = best_ceilings(doc["ceilings_measured"])
    cases = {c["id"]: c for c in doc["cases"]}
    for r in doc["results"]:
        if r["case"] in cases and r["provider"] in doc["providers"]:
            add_fractions(r, cases[r["case"]], doc["providers"][r["provider"]], doc["ceilings"])


def write_json(doc: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------- command


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="softpo bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small CPU shapes plus the core memory case")
    size.add_argument("--tiny", action="store_true", help="a seconds-long set that exercises the harness")
    size.add_argument("--round2", action="store_true",
                      help="issue 15's targets (S1, S1m, S2, S3) with their peers: one GPU call")
    parser.add_argument("--out", default="bench/results", help="output directory (default ./bench/results)")
    parser.add_argument("--providers", default=None, help="comma-separated provider names (default all)")
    parser.add_argument("--only", default=None, help="regular expression: run only the cases whose id matches")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in today's file and run only what is missing")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop starting new cases after this many seconds (finish with --resume)")
    parser.add_argument("--target-seconds", type=float, default=None,
                        help="timed calls per result until about this long (default 1 on cuda, 2 on cpu)")
    parser.add_argument("--min-samples", type=int, default=3)
    parser.add_argument("--max-samples", type=int, default=25)
    isolate = parser.add_mutually_exclusive_group()
    isolate.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                         help="each (case, provider) in a fresh process (default on cpu)")
    isolate.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--case-timeout", type=float, default=1800, help="seconds per isolated (case, provider)")
    parser.add_argument("--bench-dir", default=None, help="the directory holding providers.py")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only rewrite the table and plots of a recorded JSON file, next to it")
    parser.add_argument("--vocab-parallel", type=int, metavar="P", default=None,
                        help="instead of the sets: the vocab-parallel sweep over P CPU processes against one")
    parser.add_argument("--vp-shape", default="512,256,151936", metavar="N,H,V",
                        help="shape of the --vocab-parallel case (default 512,256,151936)")
    parser.add_argument("--vp-samples", type=int, default=3, help="timed calls per process for --vocab-parallel")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _choose(args, providers) -> tuple[str, list, list[str]]:
    """The set, its cases (--only) and the providers (--providers); ValueError names a bad choice."""
    set_name = "tiny" if args.tiny else "quick" if args.quick else "round2" if args.round2 else "full"
    cases = providers.case_set(set_name)
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.id)]
    chosen = list(providers.PROVIDERS)
    if args.providers:
        chosen = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = sorted(set(chosen) - set(providers.PROVIDERS))
        if unknown:
            raise ValueError(f"providers: unknown {unknown}; choose from {sorted(providers.PROVIDERS)}")
    return set_name, cases, chosen


def _new_record(args, argv, device, set_name, cases, chosen, providers, isolate, target_s) -> dict:
    """The record's header: device, versions, date, command, ceilings measured now, the cases and providers."""
    dev, versions = environment(device)
    today = dt.datetime.now(dt.timezone.utc)
    print(f"softpo bench: {len(cases)} cases x {len(chosen)} providers on {dev['name']} ({set_name} set)")
    ceilings = dict(measure_ceilings(device, small=args.tiny), when=today.isoformat(timespec="seconds"),
                    loadavg_1m=os.getloadavg()[0])
    print(f"  ceilings: matmul {ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, "
          f"copy {ceilings['copy_bytes_per_s'] / 1e9:.3g} GB/s")
    return {
        "schema": 1,
        "device": dev,
        "versions": versions,
        "date": today.isoformat(timespec="seconds"),
        "command": "softpo bench " + " ".join(argv),
        "set": set_name,
        "complete": False,
        "loadavg_at_start": os.getloadavg(),
        # Measured at the start and the end of every piece of the run; fractions use the best of them.
        "ceilings_measured": [ceilings],
        "ceilings": best_ceilings([ceilings]),
        "timing": {"method": "CUDA events" if device == "cuda" else "perf_counter",
                   "warmup_calls": 1, "target_seconds": target_s, "min_samples": args.min_samples},
        "memory_method": (
            "torch.cuda.max_memory_allocated above the allocation before the call" if device == "cuda" else
            ("peak RSS (VmHWM, reset by /proc/self/clear_refs) above the RSS before the call, "
             + ("one fresh process per (case, provider)" if isolate else "in process"))
        ),
        "providers": {name: providers.PROVIDERS[name].describe() for name in chosen},
        "cases": [c.to_dict() for c in cases],
        "results": [],
    }


def _resume(doc: dict, json_path: Path, providers) -> None:
    """Keep what an earlier piece of today's run recorded (same set and device) in `doc`."""
    if not json_path.exists():
        return
    old = json.loads(json_path.read_text())
    if old.get("set") != doc["set"] or old.get("device", {}).get("name") != doc["device"]["name"]:
        return
    doc["ceilings_measured"] = old.get("ceilings_measured", [old["ceilings"]]) + doc["ceilings_measured"]
    doc["ceilings"] = best_ceilings(doc["ceilings_measured"])
    doc["results"] = old["results"]
    doc["date"] = old["date"]
    # A resumed piece may select fewer cases or providers: the record keeps those of earlier pieces.
    doc["providers"] = {**old.get("providers", {}), **doc["providers"]}
    merged = {c["id"]: c for c in old.get("cases", [])} | {c["id"]: c for c in doc["cases"]}
    order = [c.id for c in providers.case_set(doc["set"])]
    doc["cases"] = [merged[i] for i in order if i in merged] + [c for i, c in merged.items() if i not in order]
    print(f"  resuming {json_path}: {len(doc['results'])} results kept")


def _measure_all(doc, json_path, todo, providers, device, bench_dir, isolate, measure_kwargs, args) -> bool:
    """Run every (case, provider) of `todo`, writing the record after each; True if the time limit stopped it."""
    from tqdm import tqdm

    start = time.monotonic()
    with tqdm(total=len(todo), desc="softpo bench", unit="run", dynamic_ncols=True) as bar:
        for case, provider in todo:
            if args.time_limit and time.monotonic() - start > args.time_limit:
                tqdm.write(f"time limit reached with {len(todo) - bar.n} runs left: run the same command with --resume")
                return True
            bar.set_postfix_str(f"{case.id} {provider.name}")
            reason = provider.skip_reason(case, device)
            if reason is not None:
                result = {"case": case.id, "provider": provider.name, "status": "skipped", "reason": reason}
            elif isolate:
                spec = {"bench_dir": str(bench_dir), "case": case.to_dict(), "provider": provider.name,
                        "device": device, "measure": measure_kwargs}
                result = run_isolated(spec, args.case_timeout)
            else:
                result = measure_safely(providers, case, provider, device, **measure_kwargs)
            add_fractions(result, case.to_dict(), provider.describe(), doc["ceilings"])
            if result["status"] != "ok":
                tqdm.write(f"  {result['status']}: {case.id} {provider.name}: {result['reason']}")
            else:
                tqdm.write(f"  {case.id} {provider.name}: {result['time_median_s'] * 1e3:.3g} ms, "
                           f"{result['peak_mem_bytes'] / MIB:.1f} MiB, {100 * result['ceiling_fraction']:.1f}% "
                           f"of {result['ceiling']}")
            doc["results"].append(result)
            write_json(doc, json_path)
            bar.update(1)
    return False


def _finish(doc, json_path, device, stopped, args) -> None:
    """The end-of-piece ceilings, the fractions against the best ceilings, the table and the plots."""
    end = measure_ceilings(device, small=args.tiny)
    doc["ceilings_measured"].append(dict(end, when=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                         loadavg_1m=os.getloadavg()[0]))
    finalize_fractions(doc)
    recorded = {(r["case"], r["provider"]) for r in doc["results"]}
    doc["complete"] = not stopped and all((c["id"], p) in recorded for c in doc["cases"] for p in doc["providers"])
    write_json(doc, json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(doc))
    pngs = [] if args.no_plots else plot(doc, json_path.parent, json_path.stem)
    print(f"wrote {json_path}, {md_path}" + (f" and {len(pngs)} plots" if pngs else ""))


def _render(path: Path) -> int:
    doc = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(doc))
    pngs = plot(doc, path.parent, path.stem)
    print(f"wrote {path.with_suffix('.md')} and {len(pngs)} plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        cpu_memory_setup()
        print(WORKER_MARK + json.dumps(_worker(json.loads(sys.stdin.read()))), flush=True)
        return 0
    if args.vocab_parallel is not None:
        from . import bench_vocab_parallel

        return bench_vocab_parallel.main(args.vocab_parallel, args.vp_shape, args.out, args.vp_samples)
    if args.render:
        return _render(Path(args.render))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("softpo bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        bench_dir = find_bench_dir(args.bench_dir)
        providers = load_providers(bench_dir)
        set_name, cases, chosen = _choose(args, providers)
    except ValueError as error:
        print(f"softpo bench: {error}", file=sys.stderr)
        return 2
    isolate = device == "cpu" if args.isolate is None else args.isolate
    target_s = args.target_seconds or (1.0 if device == "cuda" else 2.0)
    measure_kwargs = {"target_s": target_s, "min_samples": args.min_samples, "max_samples": args.max_samples}
    if device == "cpu" and not isolate:
        cpu_memory_setup()

    doc = _new_record(args, argv, device, set_name, cases, chosen, providers, isolate, target_s)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The full set owns the plain name; the smaller sets never overwrite it.
    stem = f"{device_slug(doc['device'])}-{doc['date'][:10]}" + ("" if set_name == "full" else f"-{set_name}")
    json_path = out_dir / f"{stem}.json"
    if args.resume:
        _resume(doc, json_path, providers)
    done = {(r["case"], r["provider"]) for r in doc["results"]}
    todo = [(c, providers.PROVIDERS[p]) for c in cases for p in chosen if (c.id, p) not in done]
    stopped = _measure_all(doc, json_path, todo, providers, device, bench_dir, isolate, measure_kwargs, args)
    _finish(doc, json_path, device, stopped, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
