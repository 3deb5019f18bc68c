"""Each Triton gate and KL estimator of the fused epilogue, pinned to its torch twin in softpo.objectives.

Over a grid of log-ratios and advantages (signs and magnitudes), the epilogue's value and its
coefficient must match `objectives.token_terms` and its autograd derivative d term / d logp, as
closely as the fp32 twin matches the float64 twin (plus the fp32 tolerance).
"""

import pytest
import torch

import softpo
from softpo.kernels import terms as token_epilogue
from softpo import objectives
from softpo.fused import terms_args

from reference import assert_close_to_gt

pytestmark = pytest.mark.usefixtures("poison_empty")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {
    "clip": softpo.GRPO,
    "clip-asym": softpo.DAPO,
    "clip-dual": softpo.GRPO.replace(delta=1.5),
    "soft": softpo.SAPO,
    "soft-tau": softpo.SAPO.replace(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    "cispo": softpo.CISPO,
    "cispo-cap1.1": softpo.CISPO.replace(epsilon_high=1.1),
    "cispo-floor0.9": softpo.CISPO.replace(epsilon_high=1.1, cispo_floor=0.9),  # verl's two-sided CISPO clamp
    "clip-k1": softpo.GRPO.replace(beta=0.1, kl_estimator="k1"),
    "clip-k2": softpo.GRPO.replace(beta=0.1, kl_estimator="k2"),
    "clip-k3": softpo.GRPO.replace(beta=0.1, kl_estimator="k3"),
    "soft-k1-biascorr": softpo.SAPO.replace(beta=0.1, kl_estimator="k1", use_bias_correction_kl=True),
    "cispo-k2-biascorr": softpo.CISPO.replace(beta=0.1, kl_estimator="k2", use_bias_correction_kl=True),
    "clip-dual-k3-biascorr": softpo.GRPO.replace(delta=1.5, beta=0.1, use_bias_correction_kl=True),
    "clip-k1-biascorr": softpo.GRPO.replace(beta=0.1, kl_estimator="k1", use_bias_correction_kl=True),
    "clip-k2-biascorr": softpo.DAPO.replace(beta=0.1, kl_estimator="k2", use_bias_correction_kl=True),
    "soft-k2": softpo.SAPO.replace(beta=0.1, kl_estimator="k2"),
    "soft-k3-biascorr": softpo.SAPO.replace(beta=0.1, kl_estimator="k3", use_bias_correction_kl=True),
    "cispo-k1": softpo.CISPO.replace(beta=0.1, kl_estimator="k1"),
    "cispo-k3-biascorr": softpo.CISPO.replace(beta=0.1, kl_estimator="k3", use_bias_correction_kl=True),
    # The sampler weight's bounds, every mode, with and without each side.
    "clip-token_mask": softpo.GRPO.replace(
        vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_cap=2.0
    ),
    "clip-token_mask-min": softpo.GRPO.replace(
        vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.5,
        vllm_importance_sampling_cap=2.0, beta=0.1, use_bias_correction_kl=True,
    ),
    "soft-token_truncate-min-nocap": softpo.SAPO.replace(
        vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_cap=None
    ),
    "cispo-token_mask-min-nocap": softpo.CISPO.replace(
        vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.8,
        vllm_importance_sampling_cap=None, beta=0.1, kl_estimator="k2",
    ),
    "clip-sequence_truncate-min": softpo.DAPO.replace(
        vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_min=0.25,
        vllm_importance_sampling_cap=1.5,
    ),
    "soft-sequence_mask-min": softpo.SAPO.replace(
        vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=0.25,
        vllm_importance_sampling_cap=1.5, beta=0.1,
    ),
}


def _grid():
    # log-ratios in steps of 0.1 stay clear of every clip edge above (log 0.8, 1.2, 1.28, 1.5, 1.1, 5),
    # so an ulp of difference between two exp implementations cannot flip a branch. They reach +-50, far
    # past objectives.LOG_RATIO_LIMIT (20), where both sides must cap the exponentials the same way; the
    # limit itself is a kink, so the grid steps over it as it does over the clip edges.
    log_ratio = torch.arange(-500, 501, dtype=torch.float64) / 10
    limit = objectives.LOG_RATIO_LIMIT
    log_ratio = torch.cat([log_ratio[log_ratio != limit], torch.tensor([limit - 0.05, limit + 0.05])])
    advantages = torch.tensor([-3.0, -1.0, -0.1, 0.0, 0.1, 1.0, 3.0], dtype=torch.float64)
    lr, adv = torch.meshgrid(log_ratio, advantages, indexing="ij")
    g = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(lr.numel(), generator=g, dtype=torch.float64)
    # The KL's log-ratio log pi_ref - log pi over the same +-50.
    ref = logp + 100 * torch.rand(lr.numel(), generator=g, dtype=torch.float64) - 50
    # Raw sampler weights (before the bounds of the mode) from e^-5 to e^5, on both sides of every bound
    # above. Far larger ones would only scale up the float64 twin's own floor: its saturated sigmoid
    # derivative is 0 where the true one is 1e-17.
    is_weight = torch.exp(10 * torch.rand(lr.numel(), generator=g, dtype=torch.float64) - 5)
    to = lambda t: t.reshape(-1).float().to(DEVICE)  # noqa: E731
    return to(logp), to(logp - lr.reshape(-1)), to(adv), to(ref), to(is_weight)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("on_policy", [False, True], ids=["off-policy", "on-policy"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "isweight"])
def test_epilogue_matches_torch_twin(config, on_policy, weighted):
    logp, old, adv, ref_logp, is_weight = _grid()
    old = None if on_policy else old
    ref_logp = ref_logp if config.beta > 0 else None
    is_weight = is_weight if weighted else None

    def twin(dtype, config=config):
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        x = logp.to(dtype).requires_grad_()
        terms = objectives.token_terms(
            config, x, advantages=cast(adv), old_logp=cast(old), ref_logp=cast(ref_logp), is_weight=cast(is_weight)
        )
        (coef,) = torch.autograd.grad(terms.sum(), x)
        return terms.detach(), coef

    gt = twin(torch.float64)
    ref = twin(torch.float32)
    out = token_epilogue.token_terms(logp, terms_args(config, adv, old, ref_logp, is_weight))
    # Where the gate's and the KL's parts cancel (they reach 1e17 at log-ratios of 20), fp32 can be
    # no closer than its epsilon times the parts: the tolerance scales with them, not with their sum.
    if config.beta > 0:
        gate_only = config.replace(beta=0.0)
        parts = [g.abs() + (g - p).abs() for g, p in zip(gt, twin(torch.float64, gate_only))]
    else:
        parts = [g.abs() for g in gt]
    for name, o, r, e, scale in zip(("value", "coef"), out, ref, gt, parts):
        assert_close_to_gt(o, r, e, torch.float32, name, scale=scale)


def test_epilogue_masks_tokens_and_agrees_at_ratio_one():
    logp, _, adv, _, _ = _grid()
    valid = torch.arange(logp.numel(), device=DEVICE) % 3 != 0
    coefs = []
    for config in (softpo.GRPO, softpo.SAPO, softpo.CISPO):
        terms, coef = token_epilogue.token_terms(logp, terms_args(config, adv), valid=valid)
        assert (terms[~valid] == 0).all() and (coef[~valid] == 0).all()
        coefs.append(coef)
    # On policy every gate's gradient is plain REINFORCE: d term / d logp = -A.
    for coef in coefs:
        torch.testing.assert_close(coef[valid], -adv[valid], rtol=1e-6, atol=1e-7)


ISSUE_CASES = {
    "grpo": softpo.GRPO,
    "grpo-k3-biascorr": softpo.GRPO.replace(beta=0.1, kl_estimator="k3", use_bias_correction_kl=True),
    "dapo-k2": softpo.DAPO.replace(beta=0.1, kl_estimator="k2"),
    "sapo-k1-biascorr": softpo.SAPO.replace(beta=0.1, kl_estimator="k1", use_bias_correction_kl=True),
}


@pytest.mark.parametrize("config", list(ISSUE_CASES.values()), ids=list(ISSUE_CASES))
@pytest.mark.parametrize("shift", [25.0, 50.0, -50.0])
@pytest.mark.parametrize("path", ["logits", "hidden"])  # hidden: the gradient formed in the forward
def test_triton_path_matches_torch_path_at_large_log_ratios(config, shift, path):
    # The whole public op, fused epilogue against the torch objective: loss and its input gradient.
    B, T, H, V = 2, 3, 8, 11
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    z = hidden @ weight.T
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    logp = torch.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kwargs = dict(old_logp=logp - shift, ref_logp=logp + torch.linspace(-shift, shift, B * T).view(B, T).double())

    def run(dtype, impl):
        x = (z if path == "logits" else hidden).to(dtype).to(DEVICE).requires_grad_()
        inputs = dict(logits=x) if path == "logits" else dict(hidden=x, weight=weight.to(dtype).to(DEVICE))
        cast = {k: v.to(DEVICE) for k, v in kwargs.items()}
        out = softpo.policy_loss(config, targets.to(DEVICE), mask.to(DEVICE), advantages.to(DEVICE),
                                 impl=impl, **inputs, **cast)
        (grad,) = torch.autograd.grad(out.loss, x)
        return out.loss.detach(), grad

    gt = run(torch.float64, "torch")
    ref = run(torch.float32, "torch")
    out = run(torch.float32, "triton")
    for name, o, r, e in zip(("loss", "grad"), out, ref, gt):
        assert bool(torch.isfinite(o).all()), name
        assert_close_to_gt(o, r, e, torch.float32, name, scale=e.abs().max().expand_as(e))
