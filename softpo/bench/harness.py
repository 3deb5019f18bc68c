"""The measuring half of `softpo bench`: timers, memory probes, one (case, provider) measured in this
process or in a fresh one, the two ceilings every fraction refers to, and the environment of a record.

Memory: on CUDA, torch.cuda.max_memory_allocated above what is allocated before the measured call. On
CPU, each (case, provider) runs in a fresh process with glibc told to return every allocation of 64 KiB
or more to the kernel on free; the process's peak RSS (VmHWM) is reset just before the measured call
(/proc/self/clear_refs) and read after it, minus the RSS at the reset.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
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

from .cases import Case, make_inputs
from .providers import PROVIDERS

WORKER_MARK = "@@softpo-bench-result@@"
MIB = 2**20


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


def measure(case, provider, device: str, *, target_s: float, min_samples: int, max_samples: int,
            max_input_sets: int = 8) -> dict:
    """Run one (case, provider) in this process: warm-up, one call under the memory probe, then timed calls."""
    result = {"case": case.id, "provider": provider.name, "status": "ok", "reason": None}
    # Small inputs would sit in L2 (L3 on CPU) and flatter every provider; rotate enough input sets to spill it.
    n_sets = max(1, min(max_input_sets, math.ceil(4 * cache_bytes(device) / max(case.input_bytes(), 1))))
    sets = [make_inputs(case, device, seed=i, extra_position=provider.extra_position) for i in range(n_sets)]
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


def measure_safely(case, provider, device, **kwargs) -> dict:
    """`measure`, with a failure recorded as an error result. What is alive before the case (the modules of
    torch and the peers, millions of objects) is moved out of the collector's sight first: every collection
    the memory probe needs then scans only what the case allocates, not half a second of imports."""
    gc.freeze()
    try:
        return measure(case, provider, device, **kwargs)
    except torch.OutOfMemoryError as error:
        reason = f"out of memory: {str(error).splitlines()[0][:200]}"
    except Exception as error:  # a peer failing on a case is a result to record, not a crash
        last = traceback.extract_tb(error.__traceback__)[-1]
        reason = f"error: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''} " \
                 f"({Path(last.filename).name}:{last.lineno})"
    finally:
        gc.collect()
        # Frozen objects are never freed, not even at exit (extension types then report leaks).
        gc.unfreeze()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"case": case.id, "provider": provider.name, "status": "error", "reason": reason}


def worker(spec: dict) -> dict:
    """The fresh process's side of `run_isolated`."""
    torch.manual_seed(0)
    case = Case.from_dict(spec["case"])
    return measure_safely(case, PROVIDERS[spec["provider"]], spec["device"], **spec["measure"])


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
        n, copy_bytes, reps = n // 4, copy_bytes // 16, 3

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


def finalize_fractions(doc: dict) -> None:
    """Every fraction of the record against the best ceilings measured in the run."""
    doc["ceilings"] = best_ceilings(doc["ceilings_measured"])
    cases = {c["id"]: c for c in doc["cases"]}
    for r in doc["results"]:
        if r["case"] in cases and r["provider"] in doc["providers"]:
            add_fractions(r, cases[r["case"]], doc["providers"][r["provider"]], doc["ceilings"])


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
