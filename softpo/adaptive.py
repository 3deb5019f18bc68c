"""Adaptive entropy control (Skywork-OR1, arXiv 2505.22312) as state the caller owns.

The entropy coefficient moves once per optimizer step: up by `entropy_coef_delta` (to at most
`entropy_coef_max`) when the step's mean entropy is at or below `entropy_target`, down (to at least
`entropy_coef_min`) otherwise; and the bonus is applied only while the last measured entropy is at or
below the target. This is TRL's GRPOTrainer controller, kept out of the loss as a small immutable
value that the training loop passes in and gets back:

    control = AdaptiveEntropy.start(config)
    for step in steps:
        for micro_batch in step:
            out = policy_loss(control.loss_config(config), ...)
            control = control.observe(out)
        control = control.step(config, reduce=all_reduce_sum)   # once per optimizer step
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .config import LossConfig


@dataclass(frozen=True)
class AdaptiveEntropy:
    """coef: the current coefficient; last_entropy: the mean entropy of the last optimizer step (inf before
    the first, so the first step applies no bonus); window: [entropy sum, token count] of this step so far."""

    coef: float
    last_entropy: float = math.inf
    window: torch.Tensor | None = None

    @classmethod
    def start(cls, config: LossConfig) -> "AdaptiveEntropy":
        if not config.use_adaptive_entropy:
            raise ValueError("config.use_adaptive_entropy must be True to start an AdaptiveEntropy")
        return cls(coef=float(config.entropy_coef))

    def applied_coef(self, config: LossConfig) -> float:
        """The coefficient this step's micro-batches apply: coef while the entropy is at or below target, else 0."""
        return self.coef if self.last_entropy <= config.entropy_target else 0.0

    def loss_config(self, config: LossConfig) -> LossConfig:
        """`config` with this step's coefficient, to pass to `policy_loss`."""
        return config.replace(entropy_coef=self.applied_coef(config))

    def observe(self, out) -> "AdaptiveEntropy":
        """Add one micro-batch (a `PolicyLossOutput`, or its metrics dict) to this step's window."""
        metrics = getattr(out, "metrics", out)
        if "controlled_entropy_sum" not in metrics:
            raise ValueError("out has no controlled_entropy_sum metric: compute it with use_adaptive_entropy=True")
        stats = torch.stack([metrics["controlled_entropy_sum"], metrics["controlled_entropy_tokens"]]).detach()
        window = stats if self.window is None else self.window + stats.to(self.window)
        return dataclasses.replace(self, window=window)

    def step(self, config: LossConfig, reduce=None) -> "AdaptiveEntropy":
        """End of an optimizer step: the window's mean entropy (summed over processes by `reduce`, a function
        from a tensor to its sum over processes) moves the coefficient, and the window starts again."""
        # Every process reduces, even one that saw no micro-batch, so no process waits in the collective alone.
        window = torch.zeros(2) if self.window is None else self.window
        window = window if reduce is None else reduce(window)
        if window[1].item() == 0:
            # No token anywhere this step: nothing to move the coefficient by.
            return dataclasses.replace(self, window=None)
        entropy = (window[0] / window[1]).item()
        if entropy <= config.entropy_target:
            coef = min(self.coef + config.entropy_coef_delta, config.entropy_coef_max)
        else:
            coef = max(self.coef - config.entropy_coef_delta, config.entropy_coef_min)
        return AdaptiveEntropy(coef=coef, last_entropy=entropy)
