"""Logits -> policy loss, forward + backward. Work counted: N x V elements read forward, read and
written backward (3 passes); the fraction is of the copy bandwidth measured in the same session."""

from conftest import run_case

PATH = "logits"


def bench_logits_forward_backward(benchmark, case, provider_name, device, ceilings):
    run_case(benchmark, case, provider_name, device, ceilings)


bench_logits_forward_backward.MODE = "fwdbwd"
