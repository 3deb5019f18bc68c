"""The logits kernels with the sampler's transform (logit_scale, softcap, per-row temperature, truncation
thresholds from softpo.sampling) against float64 references built on transformers' warpers; and log-probs
at large logit offsets against torch's fp32 log_softmax."""


import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from softpo import sampling
from softpo.kernels import logits as logits_sweep
from softpo.rows import valid_first

from compile_sm90 import compile_in_a_fresh_process
from reference import assert_close_to_gt

pytestmark = [
    pytest.mark.usefixtures("poison_empty"),
    # The interpreter evaluates masked-out lanes too (log 0, inf * 0) before where() discards them.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def reference(x, targets, transform, temperature, g_logp, g_entropy):
    """(logp, entropy, d x) in float64: process, the warpers in generate's order, log_softmax over the kept
    set. A target outside it has logp -inf and contributes no gradient."""
    x = x.double().requires_grad_()
    z = x * transform.logit_scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    z = torch.where(x.detach() == float("-inf"), x.detach(), z)
    z = z / torch.as_tensor(temperature, dtype=torch.float64).reshape(-1, 1)
    ids = torch.zeros(z.shape[0], 1, dtype=torch.long)
    scores = z.detach()
    if transform.top_k:
        scores = TopKLogitsWarper(transform.top_k)(ids, scores)
    if transform.top_p is not None and transform.top_p < 1:
        scores = TopPLogitsWarper(transform.top_p)(ids, scores)
    if transform.min_p:
        scores = MinPLogitsWarper(transform.min_p)(ids, scores)
    # softpo keeps every token tied with the last one kept (the warper splits a tie at the top-p boundary by
    # its sort order; bf16 logits tie often).
    last_kept = torch.where(torch.isfinite(scores), z.detach(), float("inf")).amin(1, keepdim=True)
    kept = torch.isfinite(z.detach()) & (z.detach() >= last_kept)
    log_p = torch.log_softmax(torch.where(kept, z, float("-inf")), -1)
    logp = log_p.gather(1, targets[:, None])[:, 0]
    excluded = ~kept.gather(1, targets[:, None])[:, 0]
    entropy = -(log_p.exp() * torch.where(kept, log_p, 0.0)).sum(-1)
    loss = (g_logp * torch.where(excluded, 0.0, logp)).sum() + (g_entropy * entropy).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), x.grad, excluded


def ours(x, targets, transform, temperature, g_logp, g_entropy, valid=None):
    """The kernels as the library wires them: thresholds from fp32 processed chunks, then the sweeps."""
    N, V = x.shape
    inv_t = sampling.inverse_temperature(temperature)
    threshold = sampling.find_thresholds(
        transform, N, V,
        lambda rows: (sampling.process(x[slice(None) if rows is None else rows].float(), transform,
                                       inv_t if rows is None or not torch.is_tensor(inv_t) else inv_t[rows])
                      for _ in [0]),
        x.float(),
    )
    kernel_t = temperature.float().contiguous() if torch.is_tensor(temperature) else temperature
    kw = dict(temperature=kernel_t, threshold=None if threshold is None else threshold.float().contiguous(),
              **transform.kernel_kwargs())
    row_idx, n_valid = valid_first(valid)
    lse_low = torch.empty(N, dtype=torch.float32)
    logp, lse, entropy, _, _ = logits_sweep.logits_logprob_fwd(x, targets, return_entropy=True, row_idx=row_idx,
                                                                n_valid=n_valid, lse_low=lse_low, **kw)
    d_x = logits_sweep.logits_logprob_bwd(x, targets, lse, g_logp, entropy=entropy, g_entropy=g_entropy,
                                          row_idx=row_idx, n_valid=n_valid, lse_low=lse_low, **kw)
    return logp, entropy, d_x


CASES = [
    # (N, V, dtype, transform settings, per-row temperature, masked rows): why
    pytest.param(7, 1, torch.float32, dict(top_k=1, top_p=0.5), True, False, id="V1-fp32"),  # one column
    pytest.param(33, 97, torch.float32, dict(logit_scale=0.5, softcap=5.0, top_k=10), True, False,
                 id="V97-fp32-softcap-topk"),  # a softcap that bites (|x| up to ~8)
    pytest.param(40, 97, torch.bfloat16, dict(top_p=0.8, min_p=0.02), True, True,
                 id="V97-bf16-topp-minp-masked"),
    pytest.param(25, 1000, torch.float16, dict(top_k=50, top_p=0.9), False, True, id="V1000-fp16-topk-topp"),
    pytest.param(20, 1000, torch.float32, dict(logit_scale=0.0625, softcap=30.0), True, False,
                 id="V1000-fp32-cohere-gemma"),  # the transform alone, no truncation
    pytest.param(20, 1000, torch.float32, dict(min_p=0.1), False, False, id="V1000-fp32-minp"),
    pytest.param(20, 200, torch.float32, dict(logit_scale=-1.0, top_k=30), True, False, id="V200-negative-scale"),
]


@pytest.mark.parametrize("N,V,dtype,settings,row_temperature,masked", CASES)
def test_sampled_logprobs_match_the_warpers(N, V, dtype, settings, row_temperature, masked):
    g = torch.Generator().manual_seed(1)
    # Drawn in float64 and rounded to the test dtype once: every path sees the same logits.
    x = (3 * torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)
    if V > 150:
        x[1, : V // 2] = float("-inf")  # a banned half of the vocabulary
    transform = sampling.check_sampling_args(**settings)
    temperature = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5) if row_temperature else 0.8
    targets = torch.randint(0, V, (N,), generator=g)
    targets[1] = V - 1
    g_logp = torch.randn(N, generator=g, dtype=torch.float64)
    g_entropy = torch.randn(N, generator=g, dtype=torch.float64)
    valid = torch.rand(N, generator=g) > 0.3 if masked else None
    temperature_t = temperature.float().double() if row_temperature else temperature

    gt_logp, gt_entropy, gt_dx, excluded = reference(x.double(), targets, transform, temperature_t, g_logp, g_entropy)
    logp, entropy, d_x = ours(x.to(DEVICE), targets.to(DEVICE), transform,
                              temperature.float() if row_temperature else temperature,
                              g_logp.float().to(DEVICE), g_entropy.float().to(DEVICE), valid)
    logp, entropy, d_x = logp.cpu(), entropy.cpu(), d_x.cpu()
    assert d_x.dtype == dtype and torch.isfinite(d_x).all() and not entropy.isnan().any()
    on = torch.ones(N, dtype=torch.bool) if valid is None else valid
    if masked:
        assert (logp[~on] == 0).all() and (entropy[~on] == 0).all() and (d_x[~on] == 0).all()
    # Targets outside the kept set: -inf exactly, no NaN; the test draws some in every truncating case.
    assert torch.equal(logp[on] == float("-inf"), excluded[on])
    if transform.truncates(V) and V > 1:
        assert excluded[on].any()
    fin = on & ~excluded
    # Our results come from fp32 arithmetic on the exact inputs; the best any dtype-`dtype` output can do
    # for d logits is the exact value rounded to it.
    assert_close_to_gt(logp[fin], gt_logp[fin].float(), gt_logp[fin], torch.float32, "logp")
    assert_close_to_gt(entropy[on], gt_entropy[on].float(), gt_entropy[on], torch.float32, "entropy")
    assert_close_to_gt(d_x[on], gt_dx[on].to(dtype), gt_dx[on], dtype, "d_logits",
                       scale=gt_dx[on].abs().amax(1, keepdim=True).expand_as(gt_dx[on]))


def test_loss_forward_writes_the_same_gradient_with_thresholds():
    # logits_loss_fwd forms d logits in the forward: with terms on-policy and no KL, coef = -advantage.
    from softpo.kernels import terms as token_epilogue

    g = torch.Generator().manual_seed(2)
    N, V = 30, 97
    x = 3 * torch.randn(N, V, generator=g)
    transform = sampling.check_sampling_args(top_k=5, softcap=4.0)
    temperature = torch.rand(N, generator=g) + 0.5
    threshold = sampling.find_thresholds(transform, N, V, lambda rows: iter([sampling.process(
        x, transform, sampling.inverse_temperature(temperature))]), x)
    targets = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    w = torch.rand(N, generator=g)
    w_ent = torch.rand(N, generator=g)
    kw = dict(temperature=temperature, threshold=threshold, **transform.kernel_kwargs())
    terms = token_epilogue.TermsArgs(advantages=adv)
    logp, lse, entropy, term, coef, d_x = logits_sweep.logits_loss_fwd(x, targets, terms, w, w_ent,
                                                                       return_entropy=True, **kw)
    # A row whose target is outside the kept set leaves the loss: no gradient from its term or its entropy.
    d_ref = logits_sweep.logits_logprob_bwd(x, targets, lse, (w * coef).contiguous(), entropy=entropy,
                                            g_entropy=torch.where(logp == float("-inf"), 0.0, w_ent), **kw)
    assert (logp == float("-inf")).any() and torch.isfinite(d_x).all()
    torch.testing.assert_close(d_x, d_ref, rtol=1e-5, atol=1e-7)


def test_defaults_are_todays_kernel():
    # Without the new keywords the kernels give what a scalar temperature alone gave.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 97, generator=g)
    targets = torch.randint(0, 97, (12,), generator=g)
    base = logits_sweep.logits_logprob_fwd(x, targets, temperature=1.3, return_entropy=True)
    same = logits_sweep.logits_logprob_fwd(x, targets, temperature=torch.full((12,), 1.3), return_entropy=True,
                                           logit_scale=1.0, softcap=None, threshold=torch.full((12,), -float("inf")))
    for a, b in zip(base[:3], same[:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


OFFSETS = [1e3, 1e4, 1e6, 2.0**24]


@pytest.mark.parametrize("offset", OFFSETS, ids=[f"offset{o:g}" for o in OFFSETS])
def test_precision_at_large_logit_offsets(offset):
    # fp32 logits around a large common value: log-probs and gradients relative to the row max stay as
    # precise as torch's fp32 log_softmax, where z - lse would lose the ulp of the offset.
    g = torch.Generator().manual_seed(4)
    N, V = 16, 200
    spread = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    spread[0] = 0.0  # 2**24 with equal logits: -log V exactly
    x = (offset + spread).float()
    targets = torch.randint(0, V, (N,), generator=g)
    g_logp = torch.randn(N, generator=g)
    g_entropy = torch.randn(N, generator=g)
    x64 = x.double().requires_grad_()
    log_p = torch.log_softmax(x64, -1)
    gt_logp = log_p.gather(1, targets[:, None])[:, 0]
    gt_entropy = -(log_p.exp() * log_p).sum(-1)
    ((g_logp.double() * gt_logp).sum() + (g_entropy.double() * gt_entropy).sum()).backward()
    xt = x.clone().requires_grad_()
    t_log_p = torch.log_softmax(xt, -1)
    t_logp = t_log_p.gather(1, targets[:, None])[:, 0]
    t_entropy = -(t_log_p.exp() * t_log_p).sum(-1)
    ((g_logp * t_logp).sum() + (g_entropy * t_entropy).sum()).backward()

    lse_low = torch.empty(N)
    logp, lse, entropy, _, _ = logits_sweep.logits_logprob_fwd(x.to(DEVICE), targets.to(DEVICE),
                                                                return_entropy=True, lse_low=lse_low.to(DEVICE))
    d_x = logits_sweep.logits_logprob_bwd(x.to(DEVICE), targets.to(DEVICE), lse, g_logp.to(DEVICE),
                                          entropy=entropy, g_entropy=g_entropy.to(DEVICE), lse_low=lse_low.to(DEVICE))
    tol = 2e-6
    assert (logp.cpu().double() - gt_logp).abs().max() <= (t_logp.double() - gt_logp.detach()).abs().max() + tol
    assert (entropy.cpu().double() - gt_entropy).abs().max() <= (t_entropy.double() - gt_entropy).abs().max() + tol
    assert (d_x.cpu().double() - x64.grad).abs().max() <= (xt.grad.double() - x64.grad).abs().max() + tol
    if offset == 2.0**24:
        assert abs(logp[0].item() + torch.log(torch.tensor(float(V))).item()) < 1e-6


def test_excluded_targets_and_minus_inf_logits_give_no_nan():
    # Every target is the row's smallest finite logit under top-k 3, some rows hold -inf columns, a softcap.
    g = torch.Generator().manual_seed(5)
    N, V = 10, 97
    x = torch.randn(N, V, generator=g)
    x[::2, 40:60] = float("-inf")
    transform = sampling.check_sampling_args(top_k=3, softcap=2.0)
    z = sampling.process(x, transform, 1.0)
    threshold = sampling.find_thresholds(transform, N, V, lambda rows: iter([z]), z)
    targets = torch.where(torch.isfinite(x), x, float("inf")).argmin(1)
    kw = dict(threshold=threshold, **transform.kernel_kwargs())
    logp, lse, entropy, _, _ = logits_sweep.logits_logprob_fwd(x, targets, return_entropy=True, **kw)
    assert (logp == float("-inf")).all() and torch.isfinite(lse).all() and torch.isfinite(entropy).all()
    g_logp = torch.randn(N, generator=g)
    d_x = logits_sweep.logits_logprob_bwd(x, targets, lse, g_logp, **kw)
    # With no entropy gradient and every target excluded, nothing flows back at all.
    assert (d_x == 0).all()
    d_x = logits_sweep.logits_logprob_bwd(x, targets, lse, g_logp, entropy=entropy, g_entropy=torch.ones(N), **kw)
    assert torch.isfinite(d_x).all() and (d_x[::2, 40:60] == 0).all()
    assert ((d_x != 0).sum(1) <= 3).all()  # only the kept tokens carry the entropy's gradient


def test_launchers_assert_their_contract():
    x = torch.randn(4, 10)
    targets = torch.zeros(4, dtype=torch.long)
    with pytest.raises(AssertionError, match="temperature"):
        logits_sweep.logits_logprob_fwd(x, targets, temperature=torch.ones(3))
    with pytest.raises(AssertionError, match="threshold"):
        logits_sweep.logits_logprob_fwd(x, targets, threshold=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(AssertionError):
        logits_sweep.logits_logprob_fwd(x, targets, softcap=0.0)


# The sampler's kernel variants compiled for sm_90 without a GPU (tests/compile_sm90.py says why).
_COMPILE_BODY = """
from softpo.kernels import logits

for on in (False, True):
    sampler = dict(HAS_ROW_TEMPERATURE=on, HAS_SOFTCAP=on, KEEP_MINUS_INF=on, HAS_THRESHOLD=on)
    compile_kernel(logits._logits_fwd_kernel, logits._FWD_CONFIGS[1][1], "bf16", HAS_ROW_IDX=on,
                   STORE_ENTROPY=True, GRAD_IN_FWD=on, HAS_ENT_GRAD=on, STORE_LSE_LOW=on, **NO_TERMS, **sampler)
    compile_kernel(logits._logits_bwd_kernel, logits._BWD_CONFIGS[1][1], "bf16", HAS_ROW_IDX=on,
                   HAS_ENT_GRAD=True, HAS_LSE_LOW=on, **sampler)
"""


@pytest.mark.skipif(CUDA, reason="with a GPU every kernel runs compiled in the tests above")
def test_sampler_variants_compile_for_sm90():
    result = compile_in_a_fresh_process(_COMPILE_BODY)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
