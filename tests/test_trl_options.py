"""LUSPO, VESPO, the off-policy sequence mask, the top-entropy token mask, the sampler weight's lower bound
and adaptive entropy control, through `softpo.policy_loss` on both paths, against plain float64 references
written here from TRL 1.16's GRPOTrainer formulas (materialized logits, nothing from softpo.objectives).
"""

import math

import pytest
import torch

import softpo

from reference import assert_close_to_gt

pytestmark = pytest.mark.usefixtures("poison_empty")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, V = 4, 5, 23


def _mask():
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 1:] = False  # a sequence of length 1
    mask[2] = False  # a fully masked sequence
    mask[3, 3:] = False
    return mask


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    noise = lambda scale: scale * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    old = logp + noise(0.3)
    return dict(
        logits=logits, targets=targets, advantages=torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=torch.float64),
        old_logp=old, ref_logp=logp + noise(0.4), rollout_logp=old + noise(0.2),
    )


def _plain_loss(name, logits, targets, mask, advantages, old_logp, ref_logp, rollout_logp, config):
    """TRL's _compute_loss for one option, on materialized logits, in the inputs' dtype."""
    log_probs = torch.log_softmax(logits, -1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    m = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1)
    log_ratio = logp - old_logp
    if config.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    is_ratio = None
    if name in USES_ROLLOUT:  # softpo's rollout_logp turns the sampler correction on
        w = torch.exp((old_logp - rollout_logp) * m)
        low, high = config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_cap
        if config.vllm_importance_sampling_mode == "token_truncate":
            is_ratio = w.clamp(min=low, max=high)
        else:
            is_ratio = w.masked_fill((w < (low or -math.inf)) | (w > (high or math.inf)), 0.0)
    if config.gate == "vespo":
        with torch.no_grad():
            seq = ((logp - old_logp).clamp(-20, 20) * m).sum(-1, keepdim=True)
            if is_ratio is not None:
                seq = seq + (torch.log(is_ratio).clamp(math.log(1e-8), 20) * m).sum(-1, keepdim=True)
            log_w = seq.clamp(math.log(1e-8), 20)
            k = torch.where(adv >= 0, config.vespo_k_pos, config.vespo_k_neg).to(logp.dtype)
            lam = torch.where(adv >= 0, config.vespo_lambda_pos, config.vespo_lambda_neg).to(logp.dtype)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        per_token = -phi * adv * logp
    else:
        clipped = ratio.clamp(1 - config.epsilon, 1 + config.epsilon_upper)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
    if config.off_policy_mask_threshold is not None:
        kl = ((rollout_logp - logp.detach()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        per_token = per_token * ((adv >= 0) | (kl <= config.off_policy_mask_threshold)).to(logp.dtype)
    effective = m
    if config.top_entropy_quantile < 1:
        threshold = torch.quantile(entropy.detach()[mask].float(), 1 - config.top_entropy_quantile)
        high = (entropy.detach() >= threshold) & mask
        per_token = per_token * high.to(logp.dtype)
        effective = m * high.to(logp.dtype)
    if is_ratio is not None and config.gate != "vespo":
        per_token = per_token * is_ratio
    if config.beta > 0:
        d = ref_logp - logp
        per_token = per_token + config.beta * (torch.exp(d) - d - 1)
    if config.loss_aggregation == "seq-mean-token-sum":  # LUSPO
        loss = (per_token * m).sum(-1).mean()
    else:  # token-mean (DAPO, VESPO) over the local tokens
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    if config.entropy_coef:
        loss = loss - config.entropy_coef * (entropy * effective).sum() / effective.sum().clamp(min=1)
    return loss


CASES = {
    "luspo": softpo.LUSPO.replace(epsilon=0.1, epsilon_high=0.15),
    "luspo-kl-entropy": softpo.LUSPO.replace(epsilon=0.1, epsilon_high=0.15, beta=0.05, entropy_coef=0.02),
    "vespo": softpo.VESPO,
    "vespo-kl-entropy": softpo.VESPO.replace(beta=0.05, entropy_coef=0.02, vespo_k_neg=1.5, vespo_lambda_pos=0.7),
    "vespo-is": softpo.VESPO.replace(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.8,
                                     vllm_importance_sampling_cap=1.3),
    "grpo-is-min": softpo.DAPO.replace(vllm_importance_sampling_clip_min=0.9, vllm_importance_sampling_cap=1.2,
                                       beta=0.05),
    "grpo-off-policy": softpo.DAPO.replace(off_policy_mask_threshold=0.05, beta=0.05, entropy_coef=0.02),
    "dapo-top-entropy": softpo.DAPO.replace(top_entropy_quantile=0.3, beta=0.05, entropy_coef=0.02),
    "luspo-top-entropy-off-policy": softpo.LUSPO.replace(epsilon=0.1, top_entropy_quantile=0.5,
                                                         off_policy_mask_threshold=0.0),
}
USES_ROLLOUT = ("vespo-is", "grpo-is-min", "grpo-off-policy", "luspo-top-entropy-off-policy")


def _run(name, config, inputs, dtype, impl):
    logits = inputs["logits"].to(dtype).to(DEVICE).requires_grad_()
    mask = _mask().to(DEVICE)
    kwargs = {k: inputs[k].to(DEVICE) for k in ("old_logp", "ref_logp")}
    if name in USES_ROLLOUT:
        kwargs["rollout_logp"] = inputs["rollout_logp"].to(DEVICE)
    out = softpo.policy_loss(config, inputs["targets"].to(DEVICE), mask, inputs["advantages"].to(DEVICE),
                             logits=logits, impl=impl, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, logits)
    return out, grad


def _plain(name, config, inputs, dtype):
    logits = inputs["logits"].to(dtype).requires_grad_()
    cast = {k: inputs[k].to(dtype) for k in ("advantages", "old_logp", "ref_logp", "rollout_logp")}
    loss = _plain_loss(name, logits, inputs["targets"], _mask(), config=config, **cast)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_float64_reference(name):
    config, inputs = CASES[name], _inputs()
    out, grad = _run(name, config, inputs, torch.float64, "torch")
    gt_loss, gt_grad = _plain(name, config, inputs, torch.float64)
    torch.testing.assert_close(out.loss.cpu(), gt_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.cpu(), gt_grad, rtol=1e-9, atol=1e-12)
    # Masked tokens, the fully masked sequence among them, get exactly zero gradient.
    assert torch.equal(grad.cpu()[~_mask()], torch.zeros_like(grad.cpu()[~_mask()]))
    assert all(bool(torch.isfinite(v)) for v in out.metrics.values())


@pytest.mark.parametrize("name", list(CASES))
def test_triton_path_matches_float64_reference(name):
    config, inputs = CASES[name], _inputs(seed=1)
    out = _run(name, config, inputs, torch.float32, "triton")
    ref = _plain(name, config, inputs, torch.float32)
    gt = _plain(name, config, inputs, torch.float64)
    for what, o, r, e in zip(("loss", "grad"), (out[0].loss, out[1]), ref, gt):
        assert_close_to_gt(o.cpu(), r, e, torch.float32, what)


def test_every_token_masked_gives_zero_loss_and_gradient():
    inputs = _inputs()
    for name, config in CASES.items():
        logits = inputs["logits"].clone().requires_grad_()
        mask = torch.zeros(B, T, dtype=torch.bool)
        kwargs = {k: inputs[k] for k in ("old_logp", "ref_logp")}
        if name in USES_ROLLOUT:
            kwargs["rollout_logp"] = inputs["rollout_logp"]
        out = softpo.policy_loss(config, inputs["targets"], mask, inputs["advantages"], logits=logits, **kwargs)
        out.loss.backward()
        assert out.loss.item() == 0.0, name
        assert torch.equal(logits.grad, torch.zeros_like(logits)), name


def test_presets_by_trl_name():
    assert softpo.preset("luspo") is softpo.LUSPO and softpo.preset("VESPO") is softpo.VESPO
    assert softpo.LUSPO.importance_sampling_level == "sequence"
    assert softpo.LUSPO.loss_aggregation == "seq-mean-token-sum"
    assert (softpo.VESPO.gate, softpo.VESPO.loss_aggregation) == ("vespo", "token-mean")


def test_supplied_importance_sampling_ratio_is_used_as_given():
    inputs = _inputs()
    config = softpo.DAPO.replace(vllm_importance_sampling_clip_min=0.9, vllm_importance_sampling_cap=1.1)
    g = torch.Generator().manual_seed(3)
    ratio = 2 * torch.rand(B, T, generator=g, dtype=torch.float64)  # outside the config's bounds, on purpose
    results = []
    for impl, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        logits = inputs["logits"].to(dtype).requires_grad_()
        out = softpo.policy_loss(config, inputs["targets"], _mask(), inputs["advantages"], logits=logits,
                                 old_logp=inputs["old_logp"], rollout_logp=inputs["rollout_logp"],
                                 importance_sampling_ratio=ratio, impl=impl)
        results.append(out.loss.double())
    # TRL multiplies each token's policy term by the ratio, unbounded by softpo (it is TRL's to bound).
    logits = inputs["logits"]
    logp = torch.log_softmax(logits, -1).gather(-1, inputs["targets"].unsqueeze(-1)).squeeze(-1)
    r = torch.exp(logp - inputs["old_logp"])
    adv = inputs["advantages"].unsqueeze(1)
    per_token = -torch.minimum(r * adv, r.clamp(0.8, 1.28) * adv) * ratio
    m = _mask().double()
    expected = (per_token * m).sum() / m.sum()
    torch.testing.assert_close(results[0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.ones(B, T - 1), "importance_sampling_ratio"),
    (lambda: -torch.ones(B, T), "importance_sampling_ratio"),
    (lambda: torch.full((B, 1), math.nan), "importance_sampling_ratio"),
])
def test_bad_importance_sampling_ratio_raises(bad, match):
    inputs = _inputs()
    with pytest.raises(ValueError, match=match):
        softpo.policy_loss(softpo.DAPO, inputs["targets"], _mask(), inputs["advantages"], logits=inputs["logits"],
                           importance_sampling_ratio=bad().double())


def test_adaptive_entropy_controller():
    config = softpo.DAPO.replace(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05,
                                 entropy_coef_max=0.2, entropy_coef_min=0.0, entropy_target=5.0)
    inputs = _inputs()
    control = softpo.AdaptiveEntropy.start(config)
    assert control.applied_coef(config) == 0.0  # no measurement yet: no bonus on the first step
    coefs = []
    for step in range(4):
        for _ in range(2):  # two micro-batches per optimizer step
            out = softpo.policy_loss(control.loss_config(config), inputs["targets"], _mask(), inputs["advantages"],
                                     logits=inputs["logits"], old_logp=inputs["old_logp"])
            control = control.observe(out)
        entropy = (out.entropy * _mask()).sum() / _mask().sum()
        control = control.step(config)
        assert control.last_entropy == pytest.approx(entropy.item(), rel=1e-12)
        coefs.append(control.coef)
    # The entropy (about 2.3 nats) is below the target: the coefficient climbs by delta up to its maximum.
    assert coefs == pytest.approx([0.15, 0.2, 0.2, 0.2])
    assert control.applied_coef(config) == 0.2
    below = control.step(config.replace(entropy_target=0.1))  # nothing observed since: unchanged
    assert below == control
    control = control.observe(out).step(config.replace(entropy_target=0.1))
    assert control.coef == pytest.approx(0.15) and control.applied_coef(config.replace(entropy_target=0.1)) == 0.0
    with pytest.raises(ValueError, match="use_adaptive_entropy"):
        softpo.AdaptiveEntropy.start(softpo.DAPO)


def test_vespo_counts_a_per_sequence_sampler_weight_once():
    """A [B, 1] sampler weight is already the sequence's product: it enters VESPO's log w once, as the same
    weight carried by a single token of the sequence would."""
    from softpo import objectives

    g = torch.Generator().manual_seed(3)
    B, T = 3, 5
    logp = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    old = logp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    adv = torch.tensor([[1.0], [-1.0], [0.5]], dtype=torch.float64)
    per_sequence = torch.tensor([[2.0], [0.5], [1.5]], dtype=torch.float64)
    on_first_token = torch.ones(B, T, dtype=torch.float64)
    on_first_token[:, 0] = per_sequence[:, 0]
    got = objectives.vespo_weights(softpo.VESPO, logp, old, mask, adv, per_sequence)
    expected = objectives.vespo_weights(softpo.VESPO, logp, old, mask, adv, on_first_token)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
