"""The loss math of every objective, written once in torch on [B, T] tensors.

This module is the specification. Everything here is O(tokens): the vocabulary-sized work (log-probs,
entropy and their gradients) happens before, in `softpo.chunked` or the Triton kernels, and arrives as
`logp` and `entropy`. The Triton epilogue that evaluates token-level gates in-kernel is pinned by tests
to `token_terms` below.

Notation: logp = log pi(y_t), old = log pi_old(y_t), r = exp(logp - old), A = advantage, m = mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import LossConfig

# Exponentials of log-ratios are taken at most at this exponent (r <= 4.9e8): the bias-corrected KL
# multiplies two of them, and exp(2 * 20) is still far inside fp32, where exp(2 * 50) is not.
LOG_RATIO_LIMIT = 20.0


def bounded_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(max=LOG_RATIO_LIMIT))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """The sum of x where mask (over dim, or all)."""
    # where() rather than a product, so that a non-finite value at a padded position cannot leak in.
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    masked = torch.where(mask, x, zero)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of x over the positions where mask (0 when there are none)."""
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def log_importance_ratio(
    config: LossConfig, logp: torch.Tensor, old_logp: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """log of the ratio each token's gate sees, at the config's importance-sampling level, [B, T]."""
    old = logp.detach() if old_logp is None else old_logp
    log_ratio = torch.where(mask, logp - old, torch.zeros_like(logp))
    if config.importance_sampling_level == "token":
        return log_ratio
    # GSPO: the length-normalized sequence log-ratio, shared by every token of the sequence.
    seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    if config.importance_sampling_level == "sequence":
        return seq.expand_as(logp)
    # GSPO-token: value of the sequence ratio, gradient of each token's own log-prob.
    return seq.detach() + logp - logp.detach()


def gate_terms(
    config: LossConfig, ratio: torch.Tensor, advantages: torch.Tensor, logp: torch.Tensor,
    vespo_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token policy term (to be minimized) of the config's gate."""
    if config.gate == "vespo":
        # REINFORCE on logp, weighted by the detached Gamma weight of the sequence (`vespo_weights`).
        return -vespo_weight * advantages * logp
    if config.gate == "clip":
        clipped = ratio.clamp(1 - config.epsilon, 1 + config.epsilon_upper)
        unclipped = ratio if config.delta is None else ratio.clamp(max=config.delta)
        return -torch.minimum(unclipped * advantages, clipped * advantages)
    if config.gate == "soft":
        tau = torch.where(
            advantages > 0,
            torch.full_like(advantages, config.sapo_temperature_pos),
            torch.full_like(advantages, config.sapo_temperature_neg),
        )
        return -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * advantages
    # cispo: REINFORCE on logp, weighted by the detached, capped ratio.
    return -ratio.clamp(min=config.cispo_floor, max=config.epsilon_upper).detach() * advantages * logp


def kl_terms(config: LossConfig, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi."""
    log_ref_ratio = ref_logp - logp
    if config.kl_estimator == "k1":
        return -log_ref_ratio
    if config.kl_estimator == "k2":
        return log_ref_ratio.square() / 2
    return bounded_exp(log_ref_ratio) - log_ref_ratio - 1


def _policy_terms(config, logp, ratio, advantages, ref_logp, is_weight, keep=None, vespo_weight=None):
    terms = gate_terms(config, ratio, advantages, logp, vespo_weight)
    if keep is not None:
        terms = torch.where(keep, terms, torch.zeros_like(terms))
    # VESPO folds the sampler weight into its own sequence weight instead.
    if is_weight is not None and config.gate != "vespo":
        terms = terms * is_weight
    if config.beta > 0:
        kl = kl_terms(config, logp, ref_logp)
        if config.use_bias_correction_kl:
            kl = kl * ratio
        terms = terms + config.beta * kl
    return terms


def token_terms(
    config: LossConfig,
    logp: torch.Tensor,
    *,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token loss term of a token-level policy objective, before aggregation.

    All tensors share one shape ([N] or [B, T]). This is the torch twin of the Triton epilogue:
    its value and its autograd gradient with respect to `logp` are what the kernel must produce.
    is_weight is the sampler-mismatch ratio before the config's bounds, which apply here.
    """
    old = logp.detach() if old_logp is None else old_logp
    ratio = bounded_exp(logp - old)
    if is_weight is not None:
        is_weight = bound_rollout_weights(config, is_weight)
    return _policy_terms(config, logp, ratio, advantages, ref_logp, is_weight)


def raw_rollout_weights(
    config: LossConfig, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The sampler/trainer importance ratio pi_old / pi_sampler before its bounds, [B, T] or [B, 1], detached."""
    log_w = torch.where(mask, old_logp - rollout_logp, torch.zeros_like(old_logp)).detach()
    if config.vllm_importance_sampling_mode.startswith("sequence"):
        log_w = log_w.sum(-1, keepdim=True)
    return bounded_exp(log_w)


def bound_rollout_weights(config: LossConfig, w: torch.Tensor) -> torch.Tensor:
    """The sampler-mismatch weight: w clipped to (truncate modes) or zeroed outside (mask modes)
    [vllm_importance_sampling_clip_min, vllm_importance_sampling_cap]. Bounding twice changes nothing.
    Torch twin of the kernel epilogue's bound, which applies it per token."""
    low, high = config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_cap
    if config.vllm_importance_sampling_mode.endswith("truncate"):
        return w.clamp(min=low, max=high)
    outside = torch.zeros_like(w, dtype=torch.bool)
    if low is not None:
        outside = outside | (w < low)
    if high is not None:
        outside = outside | (w > high)
    return w.masked_fill(outside, 0.0)


def rollout_weights(
    config: LossConfig, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Detached importance weight correcting for the sampler/trainer mismatch, [B, T] or [B, 1]."""
    return bound_rollout_weights(config, raw_rollout_weights(config, old_logp, rollout_logp, mask))


def sampler_weights(
    config: LossConfig, old_logp: torch.Tensor, mask: torch.Tensor, rollout_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The sampler-mismatch weight the policy terms are multiplied by, detached: the one given as is, else
    `rollout_weights` from rollout_logp, else None (no correction)."""
    if importance_sampling_ratio is not None:
        return importance_sampling_ratio.detach()
    if rollout_logp is not None:
        return rollout_weights(config, old_logp, rollout_logp, mask)
    return None


# VESPO's sequence weight is taken in log space between log(1e-8) and LOG_RATIO_LIMIT, as TRL does.
VESPO_LOG_WEIGHT_MIN = math.log(1e-8)


@torch.no_grad()
def vespo_weights(
    config: LossConfig, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
    advantages: torch.Tensor, is_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """VESPO's detached weight phi(w) = exp(lambda + k log w - lambda w) (phi(1) = 1), one per sequence.

    w = prod_t r_t (times the sampler weights prod_t is_weight_t), the un-normalized sequence ratio;
    (k, lambda) are the config's `vespo_k_pos, vespo_lambda_pos` for advantages >= 0, else the _neg pair.
    advantages [B, 1] or [B, T] gives phi of that shape. Masked tokens contribute nothing.
    """
    zero = torch.zeros_like(logp)
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    log_w = torch.where(mask, log_ratio, zero).sum(-1, keepdim=True)
    if is_weight is not None:
        log_is = torch.log(is_weight).clamp(VESPO_LOG_WEIGHT_MIN, LOG_RATIO_LIMIT)
        # A per-sequence weight [B, 1] is already the product over the sequence; per-token ones multiply.
        log_w = log_w + (log_is if log_is.shape[-1] == 1 and logp.shape[-1] != 1 else
                         torch.where(mask, log_is, zero).sum(-1, keepdim=True))
    log_w = log_w.clamp(VESPO_LOG_WEIGHT_MIN, LOG_RATIO_LIMIT)
    nonnegative = advantages >= 0
    k = torch.where(nonnegative, config.vespo_k_pos, config.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(nonnegative, config.vespo_lambda_pos, config.vespo_lambda_neg).to(log_w.dtype)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_keep(
    config: LossConfig, logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (Eq. 9): False for sequences with a negative advantage whose
    mean log pi_sampler - log pi over their tokens exceeds `off_policy_mask_threshold`. [B, 1] (or [B, T]
    for per-token advantages), detached."""
    kl = torch.where(mask, sampler_logp - logp.detach(), torch.zeros_like(logp)).detach()
    mean_kl = kl.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return (advantages >= 0) | (mean_kl <= config.off_policy_mask_threshold)


def high_entropy_mask(
    config: LossConfig, entropy: torch.Tensor, mask: torch.Tensor, gather=None
) -> torch.Tensor:
    """The tokens whose entropy is at or above the (1 - top_entropy_quantile) quantile of the batch's, [B, T] bool.

    gather: optional function from this process's 1-D tensor of entropies to every process's, concatenated
    (the quantile is then the global batch's, as TRL takes it). A batch without tokens keeps none.
    """
    local = entropy.detach()[mask]
    values = local if gather is None else gather(local)
    if values.numel() == 0:
        return torch.zeros_like(mask)
    # TRL takes the quantile in float32; so does its spec here, so that ties fall the same way.
    threshold = torch.quantile(values.float(), 1 - config.top_entropy_quantile)
    return (entropy.detach() >= threshold) & mask


def aggregate(
    config: LossConfig, terms: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Reduce per-token terms [B, T] to the scalar loss.

    normalizer replaces the local count the sum is divided by: tokens for "token-mean", sequences for
    the "seq-mean-*" modes, and a plain divisor for "token-sum". A data-parallel caller passes the
    global count over the number of ranks, so that averaging gradients over ranks gives the global mean.
    """
    B, T = mask.shape
    if config.loss_aggregation == "seq-mean-token-mean":
        per_seq = masked_sum(terms, mask, -1) / mask.sum(-1).clamp(min=1)
        if normalizer is not None:
            return per_seq.sum() / normalizer
        return per_seq.mean() if B else terms.sum()
    if config.loss_aggregation == "token-mean":
        denominator = mask.sum().clamp(min=1) if normalizer is None else normalizer
        return masked_sum(terms, mask) / denominator
    if config.loss_aggregation == "token-sum":
        total = masked_sum(terms, mask)
        return total if normalizer is None else total / normalizer
    if config.loss_aggregation == "seq-mean-token-sum-norm":
        length = config.max_completion_length or T
        if normalizer is not None:
            return masked_sum(terms, mask) / (normalizer * length)
        return masked_sum(terms, mask) / max(B * length, 1)
    if normalizer is not None:
        return masked_sum(terms, mask) / normalizer
    return masked_sum(terms, mask, -1).mean() if B else terms.sum()


def entropy_bonus(config: LossConfig, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the loss subtracts for entropy: entropy_coef times the masked mean entropy."""
    return config.entropy_coef * masked_mean(entropy, mask)


def loss_weights(
    config: LossConfig, mask: torch.Tensor, normalizer: torch.Tensor | float | None = None, *,
    entropy: bool = False, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d loss / d terms and d loss / d entropy ([B, T]; None without an entropy bonus) of a token-level
    policy objective.

    The loss is linear in the per-token terms and in the entropy, so these weights are known before
    any log-prob is: the fused hidden path uses them to turn each logits tile into its gradient in
    the forward. They come from autograd through `aggregate` and `entropy_bonus`, the loss's own code.
    """
    with torch.enable_grad():
        terms = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
        inputs = [terms]
        loss = aggregate(config, terms, mask, normalizer)
        if entropy and config.entropy_coef != 0:
            ent = torch.zeros_like(terms, requires_grad=True)
            inputs.append(ent)
            loss = loss - entropy_bonus(config, ent, mask)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    weights = [torch.zeros_like(terms) if g is None else g for g in grads]
    return weights[0], (weights[1] if len(weights) > 1 else None)


def spo_q0(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Initial soft value per prompt from a group of reward samples: beta * log mean exp(R / beta).

    rewards: [P, G] (G samples for each of P prompts) -> [P]. Under the reference policy the soft
    value of a prompt is V* = beta * log E_{y ~ pi_ref}[exp(R(y) / beta)] (SPO, arXiv 2503.05453),
    which this estimates from the G samples.
    """
    if rewards.dim() != 2 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must have shape [P, G] with G >= 1, got {tuple(rewards.shape)}")
    if not (isinstance(beta, (int, float)) and beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    r = rewards.double() / beta
    G = rewards.shape[1]
    return (beta * (torch.logsumexp(r, dim=1) - torch.log(torch.tensor(float(G), dtype=r.dtype)))).to(rewards.dtype)


def spo_loss(
    config: LossConfig,
    logp: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor,
    rewards: torch.Tensor,
    q0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPO's cumulative-Q loss. Returns (loss, Q per sequence).

    Q_T = q0 + beta * sum_t m_t (logp_t - ref_t): the soft Q of the full completion, parameterized
    by the policy itself, so no value model is needed.
    squared: mean_b (Q - R)^2 / 2.
    bce: mean_b -(R log p + (1 - R) log(1 - p)), p = expm1(Q / beta) / expm1(1 / beta) the success
    probability that a soft value Q stands for when rewards are 0 or 1: E[exp(R / beta)] = 1 + p (e^(1 / beta)
    - 1), the relation `spo_q0` estimates q0 by. Q / beta is held at 1e-6 or more and p at 1 - 1e-6 or
    less: below Q = 0 and above Q = 1 (where p leaves [0, 1]) no gradient moves Q further.
    """
    cumulative = masked_sum(logp - ref_logp, mask, -1)
    q = q0 + config.beta * cumulative
    if config.spo_loss == "squared":
        per_seq = (q - rewards).square() / 2
    else:
        log_norm = 1 / config.beta + math.log(-math.expm1(-1 / config.beta))  # log expm1(1 / beta), any beta
        log_p = (_log_expm1((q / config.beta).clamp(min=1e-6)) - log_norm).clamp(max=math.log1p(-1e-6))
        per_seq = -(rewards * log_p) - (1 - rewards) * torch.log(-torch.expm1(log_p))
    return (per_seq.mean() if per_seq.numel() else q.sum()), q


def _log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(e^x - 1) for x > 0, without overflow for large x (x + log(1 - e^-x))."""
    return x + torch.log(-torch.expm1(-x))


def policy_objective(
    config: LossConfig,
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    **inputs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar loss and metrics of `config` from per-token log-probs: `objective_loss`, then `objective_metrics`.

    logp, mask, old/ref/rollout logp, entropy: [B, T]; advantages [B] or [B, T]; rewards, q0 [B].
    importance_sampling_ratio [B, T] or [B, 1]: the sampler-mismatch weight as given (TRL's batch, verl's
    rollout_is_weights; already bounded), used instead of one from rollout_logp.
    `terms`, when given, are the per-token terms already evaluated (by the fused kernel epilogue)
    and replace the evaluation of `token_terms`; only token-level policy objectives pass them.
    entropy_gather: see `high_entropy_mask` (top_entropy_quantile < 1 across processes).
    """
    loss, pieces = objective_loss(config, logp, mask, advantages, **inputs)
    return loss, objective_metrics(config, pieces)


@dataclass
class ObjectivePieces:
    """What `objective_loss` computed on the way to the loss that its metrics read again (all detached)."""

    logp: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor
    policy_loss: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    policy_mask: torch.Tensor | None = None
    q: torch.Tensor | None = None
    adv: torch.Tensor | None = None
    ratio: torch.Tensor | None = None  # None when the terms came evaluated
    is_weight: torch.Tensor | None = None
    off_policy_keep: torch.Tensor | None = None
    vespo_weight: torch.Tensor | None = None


def objective_loss(
    config: LossConfig,
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    q0: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
    terms: torch.Tensor | None = None,
    entropy_gather=None,
) -> tuple[torch.Tensor, ObjectivePieces]:
    """The scalar loss of `config` (arguments as `policy_objective`) and the pieces its metrics need.

    The metrics are most of the objective's small kernels (SAPO with its terms given: 12 ops for the loss,
    85 with the metrics) and none of its gradient: a caller that may not read them defers
    `objective_metrics` (softpo.api does).
    """
    detached = lambda t: None if t is None else t.detach()  # noqa: E731
    pieces = dict(logp=logp.detach(), mask=mask, old_logp=old_logp, ref_logp=ref_logp, entropy=detached(entropy),
                  policy_mask=mask)
    if config.objective == "spo":
        loss, q = spo_loss(config, logp, mask, ref_logp, rewards, q0)
        pieces.update(q=q.detach(), policy_loss=loss.detach())
    else:
        adv_given = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        adv = adv_given.expand_as(logp)
        old = logp.detach() if old_logp is None else old_logp
        is_weight = sampler_weights(config, old, mask, rollout_logp, importance_sampling_ratio)
        keep = None
        if config.off_policy_mask_threshold is not None:
            sampler = old if rollout_logp is None else rollout_logp
            keep = off_policy_keep(config, logp, sampler, mask, adv_given).expand_as(logp)
            pieces["off_policy_keep"] = keep
        if config.top_entropy_quantile < 1:
            high = high_entropy_mask(config, entropy, mask, entropy_gather)
            keep = high if keep is None else keep & high
            pieces["policy_mask"] = mask & high
        vespo_weight = None
        if config.gate == "vespo":
            vespo_weight = vespo_weights(config, logp, old, mask, adv_given, is_weight)
        ratio = None  # terms given (by the kernel epilogue): the metrics form the ratio if they are read
        if terms is None:
            ratio = bounded_exp(log_importance_ratio(config, logp, old_logp, mask))
            terms = _policy_terms(config, logp, ratio, adv, ref_logp, is_weight, keep, vespo_weight)
        loss = aggregate(config, terms, mask, normalizer)
        pieces.update(policy_loss=loss.detach(), adv=adv, ratio=detached(ratio), is_weight=is_weight,
                      vespo_weight=detached(vespo_weight))
    if entropy is not None and config.entropy_coef != 0:
        loss = loss - entropy_bonus(config, entropy, pieces["policy_mask"])
    return loss, ObjectivePieces(loss=loss.detach(), **pieces)


def objective_metrics(config: LossConfig, pieces: ObjectivePieces) -> dict[str, torch.Tensor]:
    """The objective's metrics (0-d detached tensors) from the pieces `objective_loss` left."""
    p = pieces
    mask = p.mask
    metrics: dict[str, torch.Tensor] = {}
    if config.objective == "spo":
        metrics["q_mean"] = p.q.mean() if p.q.numel() else p.q.sum()
        metrics["kl"] = masked_mean(kl_terms(config, p.logp, p.ref_logp), mask)
        metrics["policy_loss"] = p.policy_loss
    else:
        if p.is_weight is not None:
            metrics["is_weight_mean"] = masked_mean(p.is_weight.expand_as(p.logp), mask)
        if config.off_policy_mask_threshold is not None:
            metrics["off_policy_kept"] = masked_mean(p.off_policy_keep.to(p.logp.dtype), mask)
        if p.vespo_weight is not None:
            metrics["vespo_weight_mean"] = (
                p.vespo_weight.mean() if p.vespo_weight.shape[-1] == 1 else masked_mean(p.vespo_weight, mask)
            )
        metrics["policy_loss"] = p.policy_loss
        ratio = p.ratio if p.ratio is not None else bounded_exp(log_importance_ratio(config, p.logp, p.old_logp, mask))
        _ratio_metrics(config, metrics, ratio, p.adv, mask, p.logp, p.old_logp)
        if p.ref_logp is not None:
            metrics["kl"] = masked_mean(kl_terms(config, p.logp, p.ref_logp), mask)
    if p.entropy is not None:
        metrics["entropy"] = masked_mean(p.entropy, mask)
        if config.use_adaptive_entropy:
            # What `AdaptiveEntropy.observe` accumulates: the entropy over the tokens the bonus acts on.
            metrics["controlled_entropy_sum"] = masked_sum(p.entropy, p.policy_mask)
            metrics["controlled_entropy_tokens"] = p.policy_mask.sum().to(p.entropy.dtype)
    metrics["loss"] = p.loss
    return metrics


def _ratio_metrics(config, metrics, ratio, adv, mask, logp, old_logp):
    count = mask.sum()
    has_tokens = count > 0
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    inf = torch.full((), float("inf"), dtype=ratio.dtype, device=ratio.device)
    metrics["ratio_mean"] = torch.where(has_tokens, masked_mean(ratio, mask), one)
    metrics["ratio_min"] = torch.where(has_tokens, torch.where(mask, ratio, inf).amin() if ratio.numel() else one, one)
    metrics["ratio_max"] = torch.where(has_tokens, torch.where(mask, ratio, -inf).amax() if ratio.numel() else one, one)
    if config.gate == "clip":
        low = (ratio < 1 - config.epsilon) & (adv < 0)
        high = (ratio > 1 + config.epsilon_upper) & (adv > 0)
        metrics["clip_fraction_low"] = masked_mean(low.to(ratio.dtype), mask)
        metrics["clip_fraction_high"] = masked_mean(high.to(ratio.dtype), mask)
        metrics["clip_fraction"] = masked_mean((low | high).to(ratio.dtype), mask)
    elif config.gate == "cispo":
        capped = (ratio > config.epsilon_upper) & (adv > 0)
        metrics["clip_fraction"] = masked_mean(capped.to(ratio.dtype), mask)
    elif config.gate == "soft":
        # d/dr of sigmoid(tau (r - 1)) * 4 / tau: the weight SAPO's gate puts on each token's gradient.
        tau = torch.where(adv > 0, config.sapo_temperature_pos, config.sapo_temperature_neg).to(ratio.dtype)
        s = torch.sigmoid(tau * (ratio - 1))
        metrics["gate_weight"] = masked_mean(4 * s * (1 - s), mask)
    # SAPO's sequence coherence assumption: log-ratios vary little within a sequence.
    token_log_ratio = torch.zeros_like(logp) if old_logp is None else torch.where(mask, logp - old_logp, 0.0)
    lengths = mask.sum(-1)
    mean = masked_sum(token_log_ratio, mask, -1) / lengths.clamp(min=1)
    var = masked_sum((token_log_ratio - mean.unsqueeze(-1)).square(), mask, -1) / lengths.clamp(min=1)
    metrics["log_ratio_seq_var"] = masked_sum(var, lengths > 0) / (lengths > 0).sum().clamp(min=1)
