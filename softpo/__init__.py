"""softpo: fused vocabulary sweeps and policy losses (SAPO, SPO, GRPO family) for RL on LLMs."""

from .adaptive import AdaptiveEntropy
from .api import LazyMetrics, PolicyLoss, PolicyLossOutput, TokenLogprobs, policy_loss, token_logprobs
from .config import (
    BNPO, CISPO, DAPO, DR_GRPO, GRPO, GSPO, GSPO_TOKEN, LUSPO, PRESETS, SAPO, SPO, VESPO, LossConfig, preset,
)
from .lora import lm_head_weight
from .objectives import spo_q0

__version__ = "0.1.0"

__all__ = [
    "BNPO", "CISPO", "DAPO", "DR_GRPO", "GRPO", "GSPO", "GSPO_TOKEN", "LUSPO", "PRESETS", "SAPO", "SPO", "VESPO",
    "AdaptiveEntropy", "LazyMetrics", "LossConfig", "PolicyLoss", "PolicyLossOutput", "TokenLogprobs",
    "lm_head_weight", "policy_loss", "preset", "spo_q0", "token_logprobs",
]
