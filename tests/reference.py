"""Materialized references: the plainest torch that computes the same thing, for tests to compare with."""

from __future__ import annotations

import torch

import softpo
from softpo import objectives

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_lm_head_inputs(B, T, H, V, *, seed=0, dtype=torch.float64):
    """hidden [B, T, H], an lm_head weight [V, H] scaled so that logits have a standard deviation near 2 (as a
    trained head gives), and targets [B, T]: drawn in float64 from `seed`, then cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2 / H**0.5)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden.to(dtype), weight.to(dtype), targets


def reference_logprobs(targets, *, hidden=None, weight=None, logits=None, temperature=1.0):
    """(logp, entropy) from materialized logits, in the inputs' dtype (as plain torch would)."""
    z = hidden @ weight.T if logits is None else logits
    log_probs = torch.log_softmax(z / temperature, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def reference_policy_loss(config, targets, mask, advantages=None, *, hidden=None, weight=None, logits=None,
                          temperature=1.0, **kwargs):
    """The loss through materialized logits and the torch spec, in the inputs' dtype."""
    logp, entropy = reference_logprobs(targets.clamp(min=0), hidden=hidden, weight=weight, logits=logits,
                                       temperature=temperature)
    mask = mask.bool()
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    entropy = torch.where(mask, entropy, torch.zeros_like(entropy)) if config.needs_entropy else None
    loss, _ = objectives.policy_objective(config, logp, mask, advantages, entropy=entropy, **kwargs)
    return loss


def assert_close_to_gt(out, ref, gt, dtype, what="", scale=None):
    """ours (out) is never worse than plain torch in the same dtype (ref), against float64 (gt).

    scale: the magnitude the dtype's tolerance is relative to, where it is not |gt| (a sum of parts).
    """
    out, ref, gt = out.double(), ref.double(), gt.double()
    tol = TOLERANCE[dtype] * (1 + (gt.abs() if scale is None else scale.double()))
    err_out = (out - gt).abs()
    bound = (ref - gt).abs() + tol
    worst = (err_out - bound).max() if err_out.numel() else torch.tensor(-1.0)
    assert bool((err_out <= bound).all()), f"{what}: error {err_out.max():.3e} exceeds bound by {worst:.3e}"


def assert_norm_close_to_gt(out, ref, gt, dtype, what="", slack=1.25):
    """ours within `slack` times plain torch's error norm against float64 (plus the dtype's tolerance).

    For results that go through a half-precision matmul operand exactly as plain torch's do (d weight
    from d logits rounded to bf16): element by element either may land on the other side of a rounding.
    """
    out, ref, gt = out.double(), ref.double(), gt.double()
    err_out, err_ref = (out - gt).norm().item(), (ref - gt).norm().item()
    bound = slack * err_ref + TOLERANCE[dtype] * gt.norm().item()
    assert err_out <= bound, f"{what}: error norm {err_out:.3e} above {bound:.3e} (plain torch: {err_ref:.3e})"


def all_configs():
    """Every preset and every option, as pytest params of (config, uses_rollout_correction)."""
    import pytest

    grpo = softpo.GRPO
    cases = [pytest.param(config, False, id=name) for name, config in softpo.PRESETS.items()]
    options = {
        "grpo-delta": grpo.replace(delta=1.5),
        "grpo-k1": grpo.replace(beta=0.05, kl_estimator="k1"),
        "grpo-k2": grpo.replace(beta=0.05, kl_estimator="k2"),
        "grpo-k3-biascorr": grpo.replace(beta=0.05, use_bias_correction_kl=True),
        "sapo-kl-entropy": softpo.SAPO.replace(beta=0.04, entropy_coef=0.01),
        "gspo-kl-biascorr": softpo.GSPO.replace(beta=0.04, use_bias_correction_kl=True),
        "gsposeqtok-entropy": softpo.GSPO_TOKEN.replace(entropy_coef=0.02),
        "cispo-seq": softpo.CISPO.replace(importance_sampling_level="sequence"),
        "grpo-seqsum": grpo.replace(loss_aggregation="seq-mean-token-sum"),
        "drgrpo-maxlen": softpo.DR_GRPO.replace(max_completion_length=9),
        "spo-bce": softpo.SPO.replace(spo_loss="bce"),
        "spo-entropy": softpo.SPO.replace(entropy_coef=0.01),
        "luspo-kl-entropy": softpo.LUSPO.replace(beta=0.04, entropy_coef=0.01),
        "vespo-kl-asym": softpo.VESPO.replace(beta=0.04, vespo_k_pos=1.5, vespo_lambda_neg=4.0),
        "dapo-top-entropy": softpo.DAPO.replace(top_entropy_quantile=0.4, entropy_coef=0.01),
        "grpo-off-policy": grpo.replace(off_policy_mask_threshold=0.02),
        "gspo-top-entropy-off-policy": softpo.GSPO.replace(top_entropy_quantile=0.7, off_policy_mask_threshold=0.0),
    }
    cases += [pytest.param(config, False, id=name) for name, config in options.items()]
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        config = softpo.SAPO.replace(vllm_importance_sampling_mode=mode, vllm_importance_sampling_cap=1.2)
        cases.append(pytest.param(config, True, id=f"sapo-{mode}"))
    cases.append(pytest.param(grpo.replace(vllm_importance_sampling_mode="token_mask"), True, id="grpo-token_mask"))
    bounds = dict(vllm_importance_sampling_clip_min=0.9, vllm_importance_sampling_cap=None)
    cases.append(pytest.param(softpo.DAPO.replace(**bounds), True, id="dapo-token_truncate-clip_min"))
    cases.append(pytest.param(
        grpo.replace(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=0.7), True,
        id="grpo-sequence_mask-clip_min",
    ))
    cases.append(pytest.param(
        softpo.VESPO.replace(vllm_importance_sampling_mode="token_mask", **bounds), True, id="vespo-token_mask-clip_min"
    ))
    cases.append(pytest.param(grpo.replace(off_policy_mask_threshold=0.02), True, id="grpo-off-policy-sampler"))
    return cases


def loss_kwargs(config, logp, uses_rollout, *, seed=0, log_ratio_scale=0.3):
    """advantages, old/ref/rollout log-probs, rewards and q0 for `config`, around the current logp [B, T]."""
    g = torch.Generator().manual_seed(seed)
    B, T = logp.shape
    base = logp.detach().double().cpu()

    def noise(scale):
        return scale * torch.randn(B, T, generator=g, dtype=torch.float64)

    kwargs = {"old_logp": base + noise(log_ratio_scale)}
    if config.objective == "policy":
        kwargs["advantages"] = torch.randn(B, generator=g, dtype=torch.float64)
    if config.needs_ref:
        kwargs["ref_logp"] = base + noise(0.3)
    if uses_rollout:
        kwargs["rollout_logp"] = kwargs["old_logp"] + noise(0.2)
    if config.objective == "spo":
        kwargs["rewards"] = torch.rand(B, generator=g, dtype=torch.float64)
        kwargs["q0"] = -0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    return {k: v.to(logp.device) for k, v in kwargs.items()}
