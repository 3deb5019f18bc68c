"""Each Triton gate and KL estimator of the fused epilogue, pinned to its torch twin in softpo.objectives.

Over a grid of log-ratios and advantages (signs and magnitudes), the epilogue's value and its
coefficient must match `objectives.token_terms` and its autograd derivative d term / d logp, as
closely as the fp32 twin matches the float64 twin (plus the fp32 tolerance).
"""

import pytest
import torch

import softpo
from softpo import kernels as K
from softpo import objectives
from softpo.triton_ops import terms_args

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
}


def _grid():
    # log-ratios in steps of 0.1 stay clear of every clip edge above (log 0.8, 1.2, 1.28, 1.5, 1.1, 5),
    # so an ulp of difference between two exp implementations cannot flip a branch.
    log_ratio = torch.arange(-30, 31, dtype=torch.float64) / 10
    advantages = torch.tensor([-3.0, -1.0, -0.1, 0.0, 0.1, 1.0, 3.0], dtype=torch.float64)
    lr, adv = torch.meshgrid(log_ratio, advantages, indexing="ij")
    g = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(lr.numel(), generator=g, dtype=torch.float64)
    ref = logp + 4 * torch.rand(lr.numel(), generator=g, dtype=torch.float64) - 2
    is_weight = 2 * torch.rand(lr.numel(), generator=g, dtype=torch.float64)
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

    def twin(dtype):
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        x = logp.to(dtype).requires_grad_()
        terms = objectives.token_terms(
            config, x, advantages=cast(adv), old_logp=cast(old), ref_logp=cast(ref_logp), is_weight=cast(is_weight)
        )
        (coef,) = torch.autograd.grad(terms.sum(), x)
        return terms.detach(), coef

    gt = twin(torch.float64)
    ref = twin(torch.float32)
    out = K.token_terms(logp, terms_args(config, adv, old, ref_logp, is_weight))
    for name, o, r, e in zip(("value", "coef"), out, ref, gt):
        assert_close_to_gt(o, r, e, torch.float32, name)


def test_epilogue_masks_tokens_and_agrees_at_ratio_one():
    logp, _, adv, _, _ = _grid()
    valid = torch.arange(logp.numel(), device=DEVICE) % 3 != 0
    coefs = []
    for config in (softpo.GRPO, softpo.SAPO, softpo.CISPO):
        terms, coef = K.token_terms(logp, terms_args(config, adv), valid=valid)
        assert (terms[~valid] == 0).all() and (coef[~valid] == 0).all()
        coefs.append(coef)
    # On policy every gate's gradient is plain REINFORCE: d term / d logp = -A.
    for coef in coefs:
        torch.testing.assert_close(coef[valid], -adv[valid], rtol=1e-6, atol=1e-7)
