"""pytest-benchmark side of the suite: `pytest bench/ --benchmark-json out.json`.

The cases and providers are those of `softpo bench` (providers.py); each benchmark's group is its case,
and extra_info carries the peak memory above inputs and the fraction of the ceilings measured at the
start of the session. Options: --bench-set full|quick|tiny (default full on CUDA, quick on CPU),
--bench-device cuda|cpu.
"""

from __future__ import annotations

import pytest
import torch

import providers
from softpo import bench


def pytest_addoption(parser):
    parser.addoption("--bench-set", choices=("full", "quick", "tiny"), default=None)
    parser.addoption("--bench-device", choices=("cuda", "cpu"), default=None)


def _device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    set_name = metafunc.config.getoption("--bench-set") or ("full" if device == "cuda" else "quick")
    path, mode = metafunc.module.PATH, metafunc.function.MODE
    cases = [c for c in providers.case_set(set_name) if c.path == path and c.mode == mode]
    params = [(c, p) for c in cases for p in providers.PROVIDERS]
    metafunc.parametrize(("case", "provider_name"), params, ids=[f"{c.id}-{p}" for c, p in params])


@pytest.fixture(scope="session")
def device(request):
    device = _device(request.config)
    if device == "cpu":
        bench.cpu_memory_setup()
    return device


@pytest.fixture(scope="session")
def ceilings(device):
    return bench.measure_ceilings(device)


def run_case(benchmark, case, provider_name, device, ceilings, target_s=1.0, max_rounds=25):
    provider = providers.PROVIDERS[provider_name]
    reason = provider.skip_reason(case, device)
    if reason is not None:
        pytest.skip(reason)
    try:
        inputs = providers.make_inputs(case, device, extra_position=provider.extra_position)
        fn = provider.build(case, inputs)

        def clear():
            for leaf in inputs["leaves"]:
                leaf.grad = None
            bench.synchronize(device)

        def run():
            fn()
            bench.synchronize(device)

        clear()
        first = bench.Timer(device)(fn)
        clear()
        probe = bench.MemoryProbe(device)
        probe.reset()
        t = bench.Timer(device)(fn)
        peak = probe.peak()
        grads = bench.grad_bytes(inputs["leaves"])
        rounds = max(3, min(max_rounds, int(target_s / max(t, 1e-9))))
        benchmark.group = case.id
        benchmark.pedantic(run, setup=clear, rounds=rounds, warmup_rounds=0)
    except torch.OutOfMemoryError as error:
        pytest.skip(f"out of memory: {str(error).splitlines()[0][:200]}")
    result = {"status": "ok", "time_median_s": benchmark.stats.stats.median}
    bench.add_fractions(result, case.to_dict(), provider.describe(), ceilings)
    benchmark.extra_info.update(
        provider=provider.label,
        case=case.to_dict(),
        first_call_s=first,
        peak_mem_bytes=peak,
        grad_bytes=grads,
        ceiling=result["ceiling"],
        ceiling_fraction=result["ceiling_fraction"],
        executed_fraction=result.get("executed_fraction"),
        ceilings=ceilings,
    )
