"""softpo inside verl: policy losses in verl's registry and a fused log-prob backend.

verl imports this module at start-up through its plugin entry point (group "verl.plugins", which
`pip install softpo[verl]` registers; `VERL_USE_EXTERNAL_MODULES=softpo.integrations.verl` also works).
Importing it registers, with verl's `register_policy_loss`:

    softpo_vanilla, softpo_gspo (= softpo_gspo_token), softpo_sapo, softpo_cispo
        twins of verl's vanilla, gspo, sapo and cispo, reading the same actor keys;
    softpo_gspo_sequence   GSPO with the gradient of the sequence ratio itself (the paper's estimator);
    softpo_sapo_agg        SAPO aggregated by `loss_agg_mode` (verl's sapo always uses seq-mean-token-mean);
    softpo_spo             SPO's cumulative-Q loss, fed by the `softpo_spo` advantage estimator.

Each loss maps verl's actor config to a `softpo.LossConfig` and calls `softpo.objectives.policy_objective`
(or `spo_loss`): the math is softpo's, the sums are divided by verl's global batch counts
(`config.global_batch_info`) exactly where verl's own losses divide by them.

`linear_cross_entropy` has the contract of `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`
and runs `softpo.token_logprobs`; `use_softpo_linear_cross_entropy()` (or SOFTPO_VERL_FUSED_KERNEL=1 at
import) puts it where verl's fused-kernel forward (`fused_kernels_backend="triton"`) looks it up. verl
scores the full softmax(z / temperature); `use_softpo_linear_cross_entropy(top_k=, top_p=, min_p=, ...)`
(or SOFTPO_VERL_TOP_K, SOFTPO_VERL_TOP_P, ...) scores under the rollout's truncation instead, and the
registered losses then leave out a token whose log-prob is -inf (outside the sampler's kept set).

verl hands the policy losses padded [B, T] tensors (its ppo_loss pads the packed log-probs first), so
they take no cu_seqlens; the fused forward's packed [1, total] rows need none either (one row per token).
"""

from __future__ import annotations

import inspect
import os
import sys

import torch
from torch.distributed.tensor import DTensor
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

from .. import objectives
from ..api import token_logprobs
from ..config import LOSS_AGGREGATIONS, LossConfig, preset
from ..sampling import check_sampling_args

__all__ = [
    "LOSSES", "linear_cross_entropy", "loss_config", "spo_targets", "use_softpo_linear_cross_entropy",
]


def _get(config, key, default=None):
    """A key of verl's config, a dataclass (ActorConfig, AlgoConfig) or an OmegaConf DictConfig."""
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _clip_range(config) -> tuple[float, float]:
    clip = _get(config, "clip_ratio")
    low = _get(config, "clip_ratio_low")
    high = _get(config, "clip_ratio_high")
    return (clip if low is None else low), (clip if high is None else high)


def _aggregation(loss_agg_mode: str) -> str:
    if loss_agg_mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"actor.loss_agg_mode must be one of {LOSS_AGGREGATIONS}, got {loss_agg_mode!r}")
    return loss_agg_mode


def _vanilla(config, agg):
    low, high = _clip_range(config)
    dual_clip = _get(config, "clip_ratio_c", 3.0)
    if not dual_clip > 1 + high:
        raise ValueError(
            f"actor.clip_ratio_c must be > 1 + clip_ratio_high = {1 + high} for softpo_vanilla, got {dual_clip}"
        )
    # verl's dual clip bounds the loss of negative-advantage tokens by c |A|; softpo's delta caps the
    # unclipped ratio at c, which gives the same value and gradient once c > 1 + clip_ratio_high.
    return preset("grpo", epsilon=low, epsilon_high=high, delta=dual_clip, loss_aggregation=agg)


def _gspo(config, agg):
    # verl's gspo carries the sequence ratio's value with each token's own gradient: GSPO-token.
    low, high = _clip_range(config)
    return preset("gspo_token", epsilon=low, epsilon_high=high, loss_aggregation=agg)


def _gspo_sequence(config, agg):
    low, high = _clip_range(config)
    return preset("gspo", epsilon=low, epsilon_high=high, loss_aggregation=agg)


def _sapo(config, agg):
    # As verl's sapo: the sequence-level mean whatever loss_agg_mode says.
    return _sapo_agg(config, "seq-mean-token-mean")


def _sapo_agg(config, agg):
    return preset("sapo", sapo_temperature_pos=_get(config, "tau_pos"), sapo_temperature_neg=_get(config, "tau_neg"),
                  loss_aggregation=agg)


def _cispo(config, agg):
    low, high = _clip_range(config)
    if not 0 <= low <= 1:
        raise ValueError(
            f"actor.clip_ratio_low must lie in [0, 1] for softpo_cispo (1 - it is the ratio floor), got {low}"
        )
    return preset("cispo", epsilon_high=1 + high, cispo_floor=1 - low, loss_aggregation=agg)


# Registered name -> builder of the LossConfig from verl's actor config and loss_agg_mode.
LOSSES = {
    "softpo_vanilla": _vanilla,
    "softpo_gspo": _gspo,
    "softpo_gspo_token": _gspo,
    "softpo_gspo_sequence": _gspo_sequence,
    "softpo_sapo": _sapo,
    "softpo_sapo_agg": _sapo_agg,
    "softpo_cispo": _cispo,
}


def loss_config(name: str, config, loss_agg_mode: str) -> LossConfig:
    """The softpo LossConfig that the registered loss `name` runs for verl's actor `config`."""
    if name not in LOSSES:
        raise ValueError(f"actor.policy_loss.loss_mode must be one of {sorted(LOSSES) + ['softpo_spo']}, got {name!r}")
    return LOSSES[name](config, _aggregation(loss_agg_mode))


def _global_counts(config, mask: torch.Tensor, agg: str) -> tuple[torch.Tensor | float, int | None]:
    """(normalizer, loss_scale_factor) as verl's agg_loss reads them from config.global_batch_info.

    verl divides a micro-batch's sum by the global token or sequence count and multiplies by the
    data-parallel size (ranks average gradients); softpo divides by one normalizer, so it is
    count / dp_size. Without global counts verl uses the local ones: tokens, or non-empty sequences.
    """
    info = _get(config, "global_batch_info") or {}
    dp_size = info.get("dp_size", 1) or 1
    if agg == "token-sum":
        return 1.0 / dp_size, None
    if agg == "token-mean":
        count = info.get("batch_num_tokens")
        key = "batch_num_tokens"
        local = mask.sum()
    else:
        count = info.get("global_batch_size")
        key = "global_batch_size"
        local = (mask.sum(-1) > 0).sum()
    if count is None:
        if dp_size > 1:
            raise ValueError(f"global_batch_info[{key!r}] is required when dp_size > 1 (loss_agg_mode={agg!r})")
        count = local.clamp(min=1)
    scale = info.get("loss_scale_factor", _get(config, "loss_scale_factor"))
    return count / dp_size, scale


def _sampler_support(log_prob, old_log_prob, mask):
    """(mask, log_prob, old_log_prob, fraction outside): under a truncating sampler (see
    `use_softpo_linear_cross_entropy`) a response token outside its row's kept set has log-prob -inf, now or
    when the old log-probs were taken. Such a token leaves the mask and both its log-probs become 0, so no
    inf reaches the objective and no gradient reaches it; the global counts verl passes still include it."""
    outside = mask & (torch.isneginf(log_prob) | torch.isneginf(old_log_prob))
    inside = mask & ~outside
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    fraction = float(outside.sum() / mask.sum().clamp(min=1))
    return inside, torch.where(outside, zero, log_prob), torch.where(outside, zero.to(old_log_prob.dtype),
                                                                     old_log_prob), fraction


def _metrics(metrics: dict, logp, old_log_prob, mask) -> dict[str, float]:
    out = {f"actor/softpo/{k}": float(v) for k, v in metrics.items() if k not in ("loss", "policy_loss")}
    # verl's own name for the mean of old - new log-prob over response tokens.
    out["actor/ppo_kl"] = float(objectives.masked_mean((old_log_prob - logp).detach(), mask))
    return out


def _make_policy_loss(name: str):
    def softpo_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if config is None:
            raise ValueError(f"{name} needs verl's actor config (config=None)")
        cfg = loss_config(name, config, loss_agg_mode)
        mask, log_prob, old_log_prob, outside = _sampler_support(log_prob, old_log_prob, response_mask.bool())
        normalizer, scale = _global_counts(config, response_mask.bool(), cfg.loss_aggregation)
        if scale is not None:
            cfg = cfg.replace(max_completion_length=int(scale))
        loss, metrics = objectives.policy_objective(
            cfg, log_prob, mask, advantages, old_logp=old_log_prob, normalizer=normalizer,
            importance_sampling_ratio=rollout_is_weights,
        )
        out = _metrics(metrics, log_prob, old_log_prob, mask)
        out["actor/softpo/outside_support"] = outside
        return loss, out

    softpo_policy_loss.__name__ = softpo_policy_loss.__qualname__ = f"{name}_policy_loss"
    softpo_policy_loss.__doc__ = f"verl policy loss {name!r}: softpo's objective for verl's actor config."
    return softpo_policy_loss


for _name in LOSSES:
    register_policy_loss(_name)(_make_policy_loss(_name))


# SPO through verl. verl's policy loss sees old and new log-probs, advantages and the mask, never the
# rewards or the reference log-probs, so SPO is split in two:
#   the advantage estimator `softpo_spo` turns rewards into a per-sequence target y = R' - q0, where
#   R' = sum_t token_level_rewards is the score minus beta * sum_t (old - ref) (verl's KL-in-reward with
#   kl_penalty="kl") and q0 = beta log mean_group exp(R' / beta) (softpo.spo_q0 of the group);
#   the loss `softpo_spo` then has Q - R = beta sum_t (logp - old) - y: SPO's (Q - R)^2 / 2 with
#   Q = q0 + beta sum_t (logp - ref) and R the score, using old as the reference of the sum.
# R' in q0 is the importance-weighted estimate of the soft value under pi_ref from samples of pi_old;
# it is softpo's spo_q0(R) when old == ref.

def _spo_beta_from_algorithm(config) -> float:
    if config is None:
        raise ValueError("the softpo_spo advantage estimator needs verl's algorithm config (config=None)")
    if not _get(config, "use_kl_in_reward", False):
        raise ValueError("algorithm.use_kl_in_reward must be True for adv_estimator=softpo_spo: SPO's reference "
                         "log-probs reach the loss as the KL penalty in the rewards")
    if _get(config, "kl_penalty", "kl") != "kl":
        raise ValueError(
            f"algorithm.kl_penalty must be 'kl' for adv_estimator=softpo_spo, got {_get(config, 'kl_penalty')!r}"
        )
    kl_ctrl = _get(config, "kl_ctrl")
    if kl_ctrl is None or _get(kl_ctrl, "type", "fixed") != "fixed":
        raise ValueError(
            "algorithm.kl_ctrl.type must be 'fixed' for adv_estimator=softpo_spo (beta is SPO's temperature)"
        )
    beta = _get(kl_ctrl, "kl_coef")
    if beta is None or not beta > 0:
        raise ValueError(
            f"algorithm.kl_ctrl.kl_coef must be > 0 for adv_estimator=softpo_spo (it is SPO's beta), got {beta!r}"
        )
    return float(beta)


def spo_targets(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, beta: float) -> torch.Tensor:
    """Per-sequence SPO target y = R' - q0 [B] from verl's token-level rewards [B, T] and group ids [B]."""
    rewards = (token_level_rewards * response_mask).sum(-1)
    groups = {}
    for row, uid in enumerate(index):
        groups.setdefault(uid, []).append(row)
    q0 = torch.empty_like(rewards)
    for rows in groups.values():
        rows = torch.tensor(rows, device=rewards.device)
        q0[rows] = objectives.spo_q0(rewards[rows].unsqueeze(0), beta)[0]
    return rewards - q0


@register_adv_est("softpo_spo")
def compute_spo_advantage(token_level_rewards, response_mask, index=None, config=None, **_):
    """verl advantage estimator for `softpo_spo`: the SPO target y on every response token (advantages, returns)."""
    beta = _spo_beta_from_algorithm(config)
    if index is None:
        raise ValueError("adv_estimator=softpo_spo needs the group ids (non_tensor_batch['uid']) to estimate q0")
    with torch.no_grad():
        y = spo_targets(token_level_rewards, response_mask, index, beta)
        target = y.unsqueeze(-1) * response_mask
    return target, target


@register_policy_loss("softpo_spo")
def spo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl policy loss 'softpo_spo': SPO's squared cumulative-Q loss.

    The advantages must come from adv_estimator=softpo_spo (one SPO target per sequence).

    Beta is actor.kl_loss_coef (set it equal to algorithm.kl_ctrl.kl_coef). loss_agg_mode is not used:
    SPO's loss is a mean over sequences, divided by verl's global sequence count.
    """
    if config is None:
        raise ValueError("softpo_spo needs verl's actor config (config=None)")
    if _get(config, "use_kl_loss", False):
        raise ValueError("actor.use_kl_loss must be False with softpo_spo: SPO's KL is already in the rewards "
                         "(algorithm.use_kl_in_reward)")
    if rollout_is_weights is not None:
        raise ValueError("softpo_spo takes no rollout_is_weights: turn off algorithm.rollout_correction.rollout_is")
    beta = _get(config, "kl_loss_coef")
    if beta is None or not beta > 0:
        raise ValueError(f"actor.kl_loss_coef must be > 0 for softpo_spo (it is SPO's beta), got {beta!r}")
    cfg = preset("spo", beta=float(beta))
    response = response_mask.bool()
    # The estimator wrote one target per sequence on each of its tokens.
    target = objectives.masked_sum(advantages, response, -1) / response.sum(-1).clamp(min=1)
    mask, log_prob, old_log_prob, outside = _sampler_support(log_prob, old_log_prob, response)
    loss, q = objectives.spo_loss(cfg, log_prob, mask, old_log_prob, target, torch.zeros_like(target))
    normalizer, _ = _global_counts(config, response, "seq-mean-token-mean")
    # spo_loss is the mean over this micro-batch's sequences; verl sums micro-batches, so rescale to the
    # share of the global mean.
    loss = loss * mask.shape[0] / normalizer
    # With q0 = 0 and the target in place of the reward, spo_loss's Q is beta sum_t (logp - old); Q - R is Q - y.
    metrics = {"actor/softpo/spo_q_minus_r": float((q - target).detach().mean()) if q.numel() else 0.0}
    metrics["actor/ppo_kl"] = float(objectives.masked_mean((old_log_prob - log_prob).detach(), mask))
    metrics["actor/softpo/outside_support"] = outside
    return loss, metrics


# The sampler's settings that `linear_cross_entropy` scores under, set by `use_softpo_linear_cross_entropy`.
# The default keeps every token: verl's own fused and unfused forwards apply the temperature only.
_sampler = dict(logit_scale=1.0, softcap=None, top_k=None, top_p=None, min_p=None)


def _temperature_for(labels: torch.Tensor, temperature):
    """verl's packed per-token temperature may come squeezed ([total] next to labels [1, total]): give it the
    labels' shape. Anything else goes to token_logprobs as given (a float, [B] per sequence, per token)."""
    if (isinstance(temperature, torch.Tensor) and temperature.dim() == 1 and labels.dim() == 2
            and labels.shape[0] == 1 and labels.shape[1] > 1 and temperature.shape[0] == labels.shape[1]):
        return temperature.view(labels.shape)
    return temperature


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's fused log-prob contract on softpo's sweep: (log-probs, entropy) in fp32.

    hidden [..., H], weight [V, H], labels [...] (in [0, V); a masked position needs a valid label
    and gets no gradient when its upstream gradient is zero). Returns log softmax(hidden @ weight.T /
    temperature)[labels] with labels' shape (reduction "none"), or their sum or mean (a scalar), and the
    entropy per token. Each token reads its own row, so a packed batch (verl's remove-padding path:
    hidden [1, total, H], labels [1, total]) needs no sequence boundaries here.

    `temperature` is what verl passes: a float (verl 0.9.1's fused forwards refuse a per-sample temperature
    and pass the rollout's scalar). A tensor is taken too: one value per token with labels' shape (or
    [total] next to labels [1, total], verl's packed per-token layout), or one per sequence [B] for labels
    [B, T].

    verl scores the full softmax(z / temperature); the rollout's top-k / top-p never reach this contract.
    After `use_softpo_linear_cross_entropy(top_k=..., top_p=..., min_p=..., logit_scale=..., softcap=...)`
    the log-probs and entropy are those of that truncated sampler's distribution (`softpo.token_logprobs`):
    a label outside its row's kept set gets log-prob -inf and no gradient.

    Triton kernels on CUDA, the chunked torch sweep elsewhere. A vocab-parallel `dist_process_group` (weight
    holds this rank's vocabulary shard) needs a softpo whose token_logprobs takes `process_group=`.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    kwargs = dict(_sampler)
    if dist_process_group is not None:
        if "process_group" not in inspect.signature(token_logprobs).parameters:
            raise ValueError("dist_process_group: this softpo's token_logprobs has no vocab-parallel sweep "
                             "(no process_group= argument); pass dist_process_group=None")
        kwargs["process_group"] = dist_process_group
    if isinstance(weight, DTensor):
        raise ValueError(
            "weight is a DTensor shard: FSDP2 wraps an untied lm_head on its own, and verl's fused forward reads "
            "its weight outside that module's forward (verl's own fused backends fail the same way); use tied "
            "embeddings or model.use_fused_kernels=False"
        )
    if weight.dtype != hidden.dtype:
        # Under FSDP mixed precision the head's weight can arrive in its storage dtype next to hidden
        # states in the compute dtype: the sweep runs in the compute dtype, the cast passes gradients back.
        weight = weight.to(hidden.dtype)
    logp, entropy = token_logprobs(labels, hidden=hidden, weight=weight,
                                   temperature=_temperature_for(labels, temperature), return_entropy=True, **kwargs)
    logp, entropy = logp.float(), entropy.float()
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


# verl modules that bind `linear_cross_entropy` by name when imported (Megatron's fused forwards); the
# transformers forwards look it up in verl.utils.kernel.linear_cross_entropy at each call.
_BOUND_BY_NAME = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def use_softpo_linear_cross_entropy(
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> None:
    """Make verl's fused-kernel forward (model.use_fused_kernels with impl_backend="triton") call softpo,
    scoring under the given sampler settings.

    verl's patched transformers forward imports `linear_cross_entropy` from
    `verl.utils.kernel.linear_cross_entropy` at each call, so replacing that attribute reroutes every model
    family that goes through it; Megatron's fused forwards, which bind the name at import, are rerouted
    too when already imported (and bind softpo's when imported later).

    top_k, top_p, min_p, logit_scale, softcap: the distribution the log-probs are taken under, as in
    `softpo.token_logprobs` (applied after the temperature verl passes). The defaults keep every token,
    which is what verl computes. Set them to the rollout's `actor_rollout_ref.rollout.top_k` / `top_p` to
    train on the log-probs of the distribution the rollout sampled from; top_k=-1 (verl's and vLLM's
    "off") is taken as None. Each call replaces the previous settings. Bad values raise ValueError
    naming the argument.
    """
    from verl.utils.kernel import linear_cross_entropy as verl_lce

    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k == -1:
        top_k = None
    settings = dict(logit_scale=logit_scale, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p)
    check_sampling_args(**settings)
    _sampler.update(settings)
    verl_lce.linear_cross_entropy = linear_cross_entropy
    for name in _BOUND_BY_NAME:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "linear_cross_entropy"):
            module.linear_cross_entropy = linear_cross_entropy


# Environment variable -> (argument of use_softpo_linear_cross_entropy, its type): how a Ray worker, which
# imports this module at start-up, receives the settings (ray_kwargs.ray_init.runtime_env.env_vars).
_SAMPLER_ENV = {
    "SOFTPO_VERL_TOP_K": ("top_k", int),
    "SOFTPO_VERL_TOP_P": ("top_p", float),
    "SOFTPO_VERL_MIN_P": ("min_p", float),
    "SOFTPO_VERL_LOGIT_SCALE": ("logit_scale", float),
    "SOFTPO_VERL_SOFTCAP": ("softcap", float),
}


def _sampler_from_env(environ) -> dict:
    settings = {}
    for variable, (argument, kind) in _SAMPLER_ENV.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        try:
            settings[argument] = kind(text)
        except ValueError:
            raise ValueError(f"{variable} ({argument}) must be {'an int' if kind is int else 'a float'}, "
                             f"got {text!r}") from None
    return settings


if os.environ.get("SOFTPO_VERL_FUSED_KERNEL", "0") == "1":
    use_softpo_linear_cross_entropy(**_sampler_from_env(os.environ))
elif any(os.environ.get(variable, "").strip() for variable in _SAMPLER_ENV):
    raise ValueError(f"{sorted(_SAMPLER_ENV)} apply to softpo's fused backend: set SOFTPO_VERL_FUSED_KERNEL=1 too")
