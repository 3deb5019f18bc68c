"""pytest-benchmark side of the suite: `pytest bench/ --benchmark-json out.json`.

The cases and providers are those of `softpo bench` (softpo.bench); each benchmark's group is its case,
and extra_info carries the peak memory above inputs and the fraction of the ceilings measured at the
start of the session. Options: --bench-set NAME (a set of `softpo bench --set`; default full on CUDA,
quick on CPU), --bench-device cuda|cpu.
"""

from __future__ import annotations

import pytest
import torch

from softpo.bench import harness
from softpo.bench.cases import SETS, case_set, make_inputs
from softpo.bench.providers import PROVIDERS


def pytest_addoption(parser):
    parser.addoption("--bench-set", choices=tuple(SETS), default=None)
    parser.addoption("--bench-device", choices=("cuda", "cpu"), default=None)


def _device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    set_name = metafunc.config.getoption("--bench-set") or ("full" if device == "cuda" else "quick")
    path, mode = metafunc.module.PATH, metafunc.function.MODE
    cases = [c for c in case_set(set_name, tuple(PROVIDERS)) if c.path == path and c.mode == mode]
    params = [(c, p) for c in cases for p in PROVIDERS]
    metafunc.parametrize(("case", "provider_name"), params, ids=[f"{c.id}-{p}" for c, p in params])


@pytest.fixture(scope="session")
def device(request):
    device = _device(request.config)
    if device == "cpu":
        harness.cpu_memory_setup()
    return device


@pytest.fixture(scope="session")
def ceilings(device):
    return harness.measure_ceilings(device)


def run_case(benchmark, case, provider_name, device, ceilings, target_s=1.0, max_rounds=25):
    provider = PROVIDERS[provider_name]
    reason = provider.skip_reason(case, device)
    if reason is not None:
        pytest.skip(reason)
    try:
        inputs = make_inputs(case, device, extra_position=provider.extra_position)
        fn = provider.build(case, inputs)

        def clear():
            for leaf in inputs["leaves"]:
                leaf.grad = None
            harness.synchronize(device)

        def run():
            fn()
            harness.synchronize(device)

        clear()
        first = harness.Timer(device)(fn)
        clear()
        probe = harness.MemoryProbe(device)
        probe.reset()
        t = harness.Timer(device)(fn)
        peak = probe.peak()
        grads = harness.grad_bytes(inputs["leaves"])
        rounds = max(3, min(max_rounds, int(target_s / max(t, 1e-9))))
        benchmark.group = case.id
        benchmark.pedantic(run, setup=clear, rounds=rounds, warmup_rounds=0)
    except torch.OutOfMemoryError as error:
        pytest.skip(f"out of memory: {str(error).splitlines()[0][:200]}")
    result = {"status": "ok", "time_median_s": benchmark.stats.stats.median}
    harness.add_fractions(result, case.to_dict(), provider.describe(), ceilings)
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
