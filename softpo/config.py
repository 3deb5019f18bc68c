"""Loss configuration and the algorithm presets.

Algorithms are data: every objective in the family is a `LossConfig` value, and the loss math in
`softpo.objectives` reads only these fields. Field names follow TRL's `GRPOConfig` where it has one,
so a TRL user finds each knob under the same word.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

OBJECTIVES = ("policy", "spo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
GATES = ("clip", "soft", "cispo", "vespo")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = (
    "seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum", "token-sum",
)
ROLLOUT_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SPO_LOSSES = ("squared", "bce")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _finite(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """One policy objective.

    objective: "policy" (ratio x gate x advantage, the GRPO family and SAPO) or "spo" (cumulative-Q
        soft policy optimization, which uses `beta`, `spo_loss`, rewards and q0 instead of advantages).
    importance_sampling_level: "token" (r per token), "sequence" (GSPO: one geometric-mean ratio per
        sequence) or "sequence_token" (GSPO-token: the sequence ratio carried by each token's gradient).
    gate: "clip" (PPO clip, dual clip with `delta`), "soft" (SAPO's sigmoid gate), "cispo"
        (REINFORCE weighted by the detached ratio capped at `epsilon_high`) or "vespo" (REINFORCE weighted
        by a detached Gamma-shaped function of the sequence's importance weight, VESPO).
    epsilon, epsilon_high: lower and upper clip range; `epsilon_high=None` means `epsilon`. For the
        cispo gate `epsilon_high` is the cap on the ratio, as in TRL.
    cispo_floor: lower bound on the cispo gate's detached ratio (verl's CISPO clamps it to
        [1 - clip_ratio_low, 1 + clip_ratio_high]); None = no floor, as in TRL.
    delta: dual-clip upper bound on the unclipped ratio (None = off). TRL only recommends
        delta > 1 + epsilon_high; a smaller one is accepted with a warning.
    sapo_temperature_pos, sapo_temperature_neg: SAPO's tau for positive / non-positive advantages.
    beta: KL coefficient (policy objectives) or the soft-RL temperature (SPO).
    kl_estimator: "k1", "k2" or "k3" (Schulman's estimators of KL(pi || pi_ref)).
    use_bias_correction_kl: multiply the per-token KL by the importance ratio.
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's weight
        phi(w) = exp(lambda) w^k exp(-lambda w) of the sequence weight w, for advantages >= 0 / < 0.
    entropy_coef: coefficient of the entropy bonus (subtracted from the loss).
    use_adaptive_entropy, entropy_coef_min, entropy_coef_max, entropy_coef_delta, entropy_target:
        Skywork-OR1's entropy control; the coefficient is caller-owned state (`softpo.AdaptiveEntropy`).
    top_entropy_quantile: only tokens at or above this upper quantile of the batch's entropy count in
        the policy term and the entropy bonus (1.0 = every token; 0.2 = the top 20%).
    off_policy_mask_threshold: drop sequences with a negative advantage whose mean KL between the
        sampler (rollout_logp, else old_logp) and the current policy exceeds this (None = off).
    compute_entropy: compute entropy for the metrics even when `entropy_coef` is 0.
    loss_aggregation: how per-token terms become a scalar ("token-sum": the plain masked sum).
    max_completion_length: the constant of "seq-mean-token-sum-norm" (Dr.GRPO), as TRL's field of that name;
        None = T, the padded width (packed sequences, `cu_seqlens=`, have none and need it set).
    vllm_importance_sampling_mode, vllm_importance_sampling_cap, vllm_importance_sampling_clip_min:
        rollout/trainer mismatch correction, applied when `rollout_logp` is given: the weight is clipped
        to (truncate modes) or zeroed outside (mask modes) [clip_min, cap]; None = no bound on that side.
    spo_loss: "squared" or "bce" (rewards in [0, 1]; Q read as a success probability, `objectives.spo_loss`).
    """

    name: str = "custom"
    objective: str = "policy"
    importance_sampling_level: str = "token"
    gate: str = "clip"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    cispo_floor: float | None = None
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    beta: float = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    compute_entropy: bool = False
    loss_aggregation: str = "seq-mean-token-mean"
    max_completion_length: int | None = None
    vllm_importance_sampling_mode: str = "token_truncate"
    vllm_importance_sampling_cap: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    spo_loss: str = "squared"

    def __post_init__(self):
        _choice("objective", self.objective, OBJECTIVES)
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _choice("gate", self.gate, GATES)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        _choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, ROLLOUT_CORRECTION_MODES)
        _choice("spo_loss", self.spo_loss, SPO_LOSSES)
        _finite("epsilon", self.epsilon, nonnegative=True)
        if self.epsilon_high is not None:
            _finite("epsilon_high", self.epsilon_high, positive=self.gate == "cispo", nonnegative=True)
        if self.cispo_floor is not None:
            _finite("cispo_floor", self.cispo_floor, nonnegative=True)
        if self.gate == "clip" and self.epsilon >= 1:
            raise ValueError(f"epsilon must be < 1 for the clip gate (1 - epsilon is a ratio), got {self.epsilon}")
        if self.delta is not None:
            _finite("delta", self.delta)
            if self.delta <= 1 + self.epsilon_upper:
                # TRL accepts it (and only recommends more): the dual clip then binds inside the clip range.
                warnings.warn(
                    f"delta={self.delta} is not above 1 + epsilon_high ({1 + self.epsilon_upper}): the dual clip "
                    "caps the ratio inside the clip range",
                    stacklevel=3,
                )
        _finite("sapo_temperature_pos", self.sapo_temperature_pos, positive=True)
        _finite("sapo_temperature_neg", self.sapo_temperature_neg, positive=True)
        _finite("beta", self.beta, nonnegative=True)
        if self.objective == "spo" and self.beta <= 0:
            raise ValueError(f"beta must be > 0 for the spo objective, got {self.beta}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _finite(name, getattr(self, name), positive=True)
        _finite("entropy_coef", self.entropy_coef)
        self._check_entropy_options()
        if self.off_policy_mask_threshold is not None:
            _finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
        if self.objective == "spo" and (self.top_entropy_quantile < 1 or self.off_policy_mask_threshold is not None):
            raise ValueError(
                "top_entropy_quantile and off_policy_mask_threshold act on the policy objective's per-token "
                f"terms; the spo objective has none (got {self.top_entropy_quantile}, {self.off_policy_mask_threshold})"
            )
        self._check_sampler_bounds()
        if self.max_completion_length is not None and (
            not isinstance(self.max_completion_length, int) or self.max_completion_length <= 0
        ):
            raise ValueError(f"max_completion_length must be a positive int, got {self.max_completion_length!r}")

    def _check_entropy_options(self) -> None:
        _finite("top_entropy_quantile", self.top_entropy_quantile)
        if not 0 <= self.top_entropy_quantile <= 1:
            raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}")
        for name in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
            _finite(name, getattr(self, name), nonnegative=True)
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError(
                f"entropy_coef_min ({self.entropy_coef_min}) must be <= entropy_coef_max ({self.entropy_coef_max})"
            )

    def _check_sampler_bounds(self) -> None:
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_cap
        if high is not None:
            _finite("vllm_importance_sampling_cap", high, positive=True)
        if low is not None:
            _finite("vllm_importance_sampling_clip_min", low, nonnegative=True)
        if low is not None and high is not None and low >= high:
            raise ValueError(
                f"vllm_importance_sampling_clip_min ({low}) must be less than vllm_importance_sampling_cap ({high})"
            )
        truncate = self.vllm_importance_sampling_mode.endswith("truncate")
        if truncate and low is None and high is None:
            raise ValueError(
                "vllm_importance_sampling_cap or vllm_importance_sampling_clip_min must be set for "
                f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}"
            )
        if self.gate == "vespo" and self.vllm_importance_sampling_mode.startswith("sequence"):
            raise ValueError(
                "vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask' for the vespo gate "
                f"(its weight sums token log-weights itself), got {self.vllm_importance_sampling_mode!r}"
            )

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_entropy(self) -> bool:
        return (
            self.compute_entropy or self.entropy_coef != 0 or self.use_adaptive_entropy or self.top_entropy_quantile < 1
        )

    @property
    def per_token_terms(self) -> bool:
        """Whether each token's term is a function of that token's inputs alone (which the kernel epilogue can
        evaluate): no sequence ratio or weight, and no mask that needs the whole batch's log-probs first."""
        return (
            self.objective == "policy"
            and self.importance_sampling_level == "token"
            and self.gate != "vespo"
            and self.top_entropy_quantile == 1
            and self.off_policy_mask_threshold is None
        )

    @property
    def needs_ref(self) -> bool:
        return self.objective == "spo" or self.beta > 0

    def replace(self, **overrides) -> "LossConfig":
        return dataclasses.replace(self, **overrides)


GRPO = LossConfig(name="grpo", epsilon=0.2, epsilon_high=0.2)
DAPO = LossConfig(name="dapo", epsilon=0.2, epsilon_high=0.28, loss_aggregation="token-mean")
DR_GRPO = LossConfig(name="dr_grpo", epsilon=0.2, epsilon_high=0.2, loss_aggregation="seq-mean-token-sum-norm")
BNPO = LossConfig(name="bnpo", epsilon=0.2, epsilon_high=0.2, loss_aggregation="token-mean")
GSPO = LossConfig(name="gspo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)
GSPO_TOKEN = LossConfig(name="gspo_token", importance_sampling_level="sequence_token", epsilon=3e-4, epsilon_high=4e-4)
SAPO = LossConfig(name="sapo", gate="soft", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
CISPO = LossConfig(name="cispo", gate="cispo", epsilon_high=5.0, loss_aggregation="token-mean")
SPO = LossConfig(name="spo", objective="spo", beta=0.1, spo_loss="squared")
# LUSPO: GSPO's sequence ratio, each sequence's loss scaled by its length (a token sum per sequence).
LUSPO = LossConfig(
    name="luspo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
    loss_aggregation="seq-mean-token-sum",
)
VESPO = LossConfig(name="vespo", gate="vespo", loss_aggregation="token-mean")

PRESETS = {
    c.name: c for c in (GRPO, DAPO, DR_GRPO, BNPO, GSPO, GSPO_TOKEN, SAPO, CISPO, SPO, LUSPO, VESPO)
}


def preset(name: str, **overrides) -> LossConfig:
    """The preset called `name` (softpo's names and TRL's `loss_type` strings), with field overrides.

    >>> preset("sapo", beta=0.04).beta
    0.04
    """
    key = name.lower().replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    config = PRESETS[key]
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LossConfig field(s) {unknown}; valid fields are {sorted(fields)}")
    return dataclasses.replace(config, **overrides) if overrides else config
