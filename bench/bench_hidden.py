"""Hidden states + lm_head weight -> log-probs (forward only, as for old and reference log-probs) and
-> policy loss (forward + backward). Work counted: 2NHV FLOPs forward, 6NHV forward + backward; the
fraction is of the matmul rate measured in the same session."""

from conftest import run_case

PATH = "hidden"


def bench_hidden_forward(benchmark, case, provider_name, device, ceilings):
    run_case(benchmark, case, provider_name, device, ceilings)


bench_hidden_forward.MODE = "fwd"


def bench_hidden_forward_backward(benchmark, case, provider_name, device, ceilings):
    run_case(benchmark, case, provider_name, device, ceilings)


bench_hidden_forward_backward.MODE = "fwdbwd"
