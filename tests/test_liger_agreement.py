"""softpo agrees with Liger-Kernel's LigerFusedLinearGRPOLoss (chunked torch) on the options both have."""

import pytest
import torch

import softpo

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

B, T, H, V = 3, 7, 16, 61

CASES = [
    pytest.param(softpo.GRPO, "grpo", {}, id="grpo"),
    pytest.param(softpo.DAPO, "dapo", {}, id="dapo"),
    pytest.param(softpo.DR_GRPO, "dr_grpo", {"max_completion_length": T}, id="dr_grpo"),
    pytest.param(softpo.BNPO, "bnpo", {}, id="bnpo"),
    pytest.param(softpo.CISPO, "cispo", {}, id="cispo"),
    pytest.param(softpo.SAPO, "sapo", {}, id="sapo"),
    pytest.param(softpo.GSPO, "grpo", {"importance_sampling_level": "sequence"}, id="gspo"),
    pytest.param(softpo.GRPO.replace(beta=0.04), "grpo", {}, id="grpo-kl"),
    pytest.param(softpo.GRPO.replace(beta=0.04, use_bias_correction_kl=True, delta=1.6), "grpo", {}, id="grpo-kl-biascorr-delta"),
    pytest.param(softpo.SAPO.replace(beta=0.04), "sapo", {}, id="sapo-kl"),
]


@pytest.mark.parametrize("config,loss_type,extra", CASES)
def test_matches_liger_fused_linear_grpo(config, loss_type, extra):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 4
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    advantages = torch.randn(B, generator=g)
    with torch.no_grad():
        logp = torch.log_softmax((hidden @ weight.T) / 0.8, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.2 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    theirs_module = liger_grpo.LigerFusedLinearGRPOLoss(
        beta=config.beta, compiled=False, use_ref_model=config.beta > 0, chunk_size=B,
        epsilon_low=config.epsilon, epsilon_high=config.epsilon_upper, loss_type=loss_type,
        sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
        temperature=0.8, delta=config.delta, use_bias_correction_kl=config.use_bias_correction_kl, **extra,
    )
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    theirs = theirs_module(h1, w1, targets, mask, advantages, ref_per_token_logps=ref if config.beta > 0 else None,
                           old_per_token_logps=old)
    theirs_loss = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs_loss.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = softpo.policy_loss(config, targets, mask, advantages, hidden=h2, weight=w2, old_logp=old,
                              ref_logp=ref if config.beta > 0 else None, temperature=0.8, impl="torch")
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)
