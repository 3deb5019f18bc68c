"""TRL's `GRPOConfig` as a `softpo.LossConfig`: the loss settings only (the trainer's are TRL's own).

A setting softpo does not implement raises `ValueError` naming it, rather than training another objective.
"""

from __future__ import annotations

from trl import GRPOConfig

from ..config import LossConfig, preset

# TRL loss_type -> (softpo gate, loss aggregation). The aggregation's scaling across processes and
# accumulation steps is applied in `_normalizer` and `_compute_loss`.
LOSS_TYPES = {
    "grpo": ("clip", "seq-mean-token-mean"),
    "bnpo": ("clip", "token-mean"),
    "dr_grpo": ("clip", "seq-mean-token-sum-norm"),
    "dapo": ("clip", "token-mean"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("soft", "seq-mean-token-mean"),
    # LUSPO: (per_token_loss * mask).sum(-1).mean(), each sequence weighted by its own length.
    "luspo": ("clip", "seq-mean-token-sum"),
    "vespo": ("vespo", "token-mean"),
}
# Loss types whose token-mean divides by the token count of the whole accumulated, all-process batch.
GLOBAL_TOKEN_MEAN = ("dapo", "cispo", "vespo")


def _unsupported(args: GRPOConfig) -> list[str]:
    """The GRPOConfig settings that softpo cannot reproduce, each as 'option=value (why)'."""
    problems = []
    if args.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r} (softpo implements {sorted(LOSS_TYPES)})")
    if args.importance_sampling_level not in ("token", "sequence"):
        problems.append(f"importance_sampling_level={args.importance_sampling_level!r} (TRL knows 'token', 'sequence')")
    return problems


def loss_config_from_grpo_config(args: GRPOConfig) -> LossConfig:
    """The `softpo.LossConfig` that computes the same loss as TRL's `GRPOTrainer` with `args`.

    Raises ValueError naming every option that has no softpo equivalent.
    """
    problems = _unsupported(args)
    if problems:
        raise ValueError(
            "softpo cannot reproduce these GRPOConfig settings; change them or use trl.GRPOTrainer: "
            + "; ".join(problems)
        )
    gate, aggregation = LOSS_TYPES[args.loss_type]
    sampler_correction = {}
    if args.use_vllm and args.vllm_importance_sampling_correction:
        low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
        sampler_correction = dict(
            vllm_importance_sampling_mode=args.vllm_importance_sampling_mode,
            vllm_importance_sampling_cap=None if high is None else float(high),
            vllm_importance_sampling_clip_min=None if low is None else float(low),
        )
    return preset(
        args.loss_type,
        objective="policy",
        importance_sampling_level=args.importance_sampling_level,
        gate=gate,
        epsilon=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        # TRL reads delta only in its clipped losses.
        delta=args.delta if gate == "clip" else None,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        beta=args.beta,
        kl_estimator="k3",
        use_bias_correction_kl=args.use_bias_correction_kl,
        vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos,
        vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
        entropy_coef=args.entropy_coef,
        use_adaptive_entropy=args.use_adaptive_entropy,
        entropy_coef_min=args.entropy_coef_min,
        entropy_coef_max=args.entropy_coef_max,
        entropy_coef_delta=args.entropy_coef_delta,
        entropy_target=args.entropy_target,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        # TRL logs the entropy whatever the coefficient.
        compute_entropy=True,
        loss_aggregation=aggregation,
        max_completion_length=args.max_completion_length if aggregation == "seq-mean-token-sum-norm" else None,
        **sampler_correction,
    )
