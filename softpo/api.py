"""The public functional API and modules: validation, then dispatch to one vocabulary sweep.

`token_logprobs` is the sweep alone. `policy_loss` runs the sweep and the objective's O(tokens) math
from `softpo.objectives`. On the Triton path, token-level policy objectives are fused: the forward
kernel's epilogue evaluates the gate, so one launch yields the per-token terms and the coefficient
its backward needs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from . import objectives
from .chunked import accumulation_dtype, chunked_token_logprobs
from .config import LossConfig

IMPLS = ("auto", "torch", "triton")


@dataclass
class PolicyLossOutput:
    """loss: 0-d tensor to backprop. logp, entropy: [B, T] fp32, detached (entropy None unless computed).
    metrics: 0-d detached tensors (no host sync is forced; call .item() when logging)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _triton_ops():
    try:
        from . import triton_ops
    except ImportError as error:  # triton missing, or a kernel module that failed to import
        raise RuntimeError(f"impl='triton' is unavailable: {error}") from error
    return triton_ops


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # The kernels sweep in fp32; float64 inputs (gradcheck, references) get the float64 torch path.
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); "
            f"got tensors on {device}"
        )
    return impl


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_sweep_inputs(targets, hidden, weight, logits):
    """Validate the vocabulary inputs against `targets` and return V."""
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if logits is not None:
        if hidden is not None or weight is not None:
            raise ValueError("pass either logits or hidden and weight, not both")
        if not logits.dtype.is_floating_point:
            raise ValueError(f"logits must be a floating tensor, got {logits.dtype}")
        if logits.shape[:-1] != targets.shape or logits.dim() < 1:
            raise ValueError(f"logits must have shape targets.shape + (V,), got {tuple(logits.shape)} for targets {tuple(targets.shape)}")
        if logits.device != targets.device:
            raise ValueError(f"logits is on {logits.device} but targets is on {targets.device}")
        if logits.shape[-1] == 0:
            raise ValueError("logits has an empty vocabulary dimension")
        return logits.shape[-1]
    if hidden is None and weight is None:
        raise ValueError("pass either logits or hidden and weight; got neither")
    if hidden is None:
        raise ValueError("hidden is required when weight is given")
    if weight is None:
        raise ValueError("weight is required when hidden is given")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a floating tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape targets.shape + (H,) with H = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)} for targets {tuple(targets.shape)}"
        )
    if hidden.device != targets.device:
        raise ValueError(f"hidden is on {hidden.device} but targets is on {targets.device}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    return weight.shape[0]


class _DeferredChecks:
    """Value checks on device tensors, read back in one host sync: each sync stalls the GPU queue,
    and a loss call checks half a dozen inputs."""

    def __init__(self):
        self.failed: list[tuple[str, torch.Tensor]] = []

    def add(self, message, failed: torch.Tensor) -> None:
        """`message` (a string, or a callable for messages that need the data) is raised if `failed` is True."""
        self.failed.append((message, failed.reshape(())))

    def run(self, *also: torch.Tensor) -> list[bool]:
        """Raise the first failed check's ValueError; else return the values of `also` (0-d bool tensors)."""
        flags = [f for _, f in self.failed] + [a.reshape(()) for a in also]
        if not flags:
            return []
        values = torch.stack([f.to(torch.bool) for f in flags]).tolist()
        for (message, _), failed in zip(self.failed, values):
            if failed:
                raise ValueError(message() if callable(message) else message)
        return values[len(self.failed):]


def _check_target_range(checks, targets, V, where=None):
    bad = (targets < 0) | (targets >= V)
    if where is not None:
        bad = bad & where
    checks.add(lambda: f"targets must lie in [0, V={V}); found {targets[bad][0].item()}", bad.any())


def _flat(tensor):
    return None if tensor is None else tensor.reshape(-1)


def _sweep(path, flat_targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward=False):
    if logits is not None:
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    if path == "triton":
        return _triton_ops().triton_token_logprobs(
            flat_targets, hidden=hidden, weight=weight, logits=logits,
            temperature=temperature, return_entropy=return_entropy, valid=valid,
            inplace_backward=inplace_backward,
        )
    return chunked_token_logprobs(
        flat_targets, hidden=hidden, weight=weight, logits=logits,
        temperature=temperature, return_entropy=return_entropy, valid=valid,
    )


def token_logprobs(
    targets: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    inplace_backward: bool = False,
):
    """log softmax(z / temperature)[target] per token, without a tokens x vocabulary tensor.

    Args:
        targets: integer tensor of any shape [...]; position i of hidden/logits predicts targets[i]
            (already aligned: nothing is shifted here).
        hidden: [..., H] with weight [V, H] (z = hidden @ weight.T), or
        logits: [..., V], any float dtype and row stride.
        temperature: z is divided by it, as in sampling.
        return_entropy: also return the entropy of softmax(z / temperature) per token.
        impl: "auto" (Triton for CUDA tensors, chunked torch otherwise), "torch" or "triton".
        inplace_backward: logits path on the Triton kernels only: the backward writes d logits over
            the logits' storage, saving one tokens x vocabulary buffer. Refused for leaf logits; any
            other autograd node that saved the logits then raises instead of reading gradients.

    Returns:
        logp [...] fp32, or (logp, entropy) when return_entropy; differentiable with respect to
        hidden/weight or logits.
    """
    V = _check_sweep_inputs(targets, hidden, weight, logits)
    temperature = _check_temperature(temperature)
    checks = _DeferredChecks()
    _check_target_range(checks, targets, V)
    checks.run()
    path = _resolve_impl(impl, targets.device, (logits if logits is not None else hidden).dtype)
    if inplace_backward and (logits is None or path != "triton"):
        raise ValueError("inplace_backward needs logits and the Triton path (CUDA tensors or impl='triton')")
    logp, entropy = _sweep(
        path, targets.reshape(-1).long(), hidden, weight, logits, temperature, return_entropy, None,
        inplace_backward,
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp


def _check_bt(checks, name, tensor, shape, device, *, mask=None, required=False, dtype=torch.float32):
    """A per-token or per-sequence float tensor: shape, device, finiteness (where mask), as `dtype`."""
    if tensor is None:
        if required:
            raise ValueError(f"{name} is required for this configuration")
        return None
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but targets is on {device}")
    tensor = tensor.detach().to(dtype)
    finite = torch.isfinite(tensor)
    if mask is not None:
        checks.add(f"{name} must be finite at every unmasked position", ~(finite | ~mask).all())
        # Padded positions may hold anything; zero them so they cannot reach the math.
        return torch.where(mask, tensor, torch.zeros_like(tensor))
    checks.add(f"{name} must be finite", ~finite.all())
    return tensor


def policy_loss(
    config: LossConfig,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    q0: torch.Tensor | None = None,
    temperature: float = 1.0,
    normalizer: torch.Tensor | float | None = None,
    entropy_gather=None,
    impl: str = "auto",
) -> PolicyLossOutput:
    """The loss of `config` (a preset such as `softpo.SAPO`) from hidden states or logits.

    Shapes: targets, mask [B, T] (mask bool or 0/1; targets at masked positions are ignored);
    hidden [B, T, H] with weight [V, H], or logits [B, T, V]; advantages [B] or [B, T] (policy
    objectives); old_logp, ref_logp, rollout_logp [B, T] (old_logp None means on-policy: old =
    logp detached; ref_logp needed when beta > 0 and for SPO; rollout_logp turns on the sampler
    mismatch correction); importance_sampling_ratio [B, T] or [B, 1]: that correction's ratio as the
    caller already has it (TRL's batch does), used instead of one from rollout_logp; rewards, q0 [B] (SPO);
    normalizer: the token count that "token-mean" divides by (e.g. the global count across ranks and
    accumulation steps), default the local one; entropy_gather: see `objectives.high_entropy_mask`.

    Returns a `PolicyLossOutput` with `.loss`, `.logp`, `.entropy` and `.metrics`.
    """
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig (e.g. softpo.SAPO), got {type(config).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError(f"targets must be a [B, T] integer tensor, got {getattr(targets, 'shape', type(targets))}")
    V = _check_sweep_inputs(targets, hidden, weight, logits)
    temperature = _check_temperature(temperature)
    B, T = targets.shape
    device = targets.device
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape {(B, T)}, got {tuple(getattr(mask, 'shape', ()))}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but targets is on {device}")
    checks = _DeferredChecks()
    if mask.dtype != torch.bool:
        checks.add("mask must be boolean or hold only 0 and 1", ((mask != 0) & (mask != 1)).any())
        mask = mask != 0
    _check_target_range(checks, targets, V, where=mask)
    path = _resolve_impl(impl, device, (logits if logits is not None else hidden).dtype)

    # The O(tokens) math runs in the sweep's precision: fp32, or float64 for float64 inputs.
    dtype = accumulation_dtype((logits if logits is not None else hidden).dtype)
    old_logp = _check_bt(checks, "old_logp", old_logp, (B, T), device, mask=mask, dtype=dtype)
    ref_logp = _check_bt(checks, "ref_logp", ref_logp, (B, T), device, mask=mask, required=config.needs_ref,
                         dtype=dtype)
    rollout_logp = _check_bt(checks, "rollout_logp", rollout_logp, (B, T), device, mask=mask, dtype=dtype)
    if importance_sampling_ratio is not None:
        per_token = getattr(importance_sampling_ratio, "shape", (None, None))[-1] != 1 or T == 1
        importance_sampling_ratio = _check_bt(
            checks, "importance_sampling_ratio", importance_sampling_ratio, (B, T) if per_token else (B, 1), device,
            mask=mask if per_token else None, dtype=dtype,
        )
        checks.add("importance_sampling_ratio must be >= 0", (importance_sampling_ratio < 0).any())
    if config.objective == "spo":
        rewards = _check_bt(checks, "rewards", rewards, (B,), device, required=True, dtype=dtype)
        q0 = _check_bt(checks, "q0", q0, (B,), device, required=True, dtype=dtype)
        if config.spo_loss == "bce":
            checks.add("rewards must lie in [0, 1] for spo_loss='bce'", ((rewards < 0) | (rewards > 1)).any())
    else:
        if not isinstance(advantages, torch.Tensor):
            raise ValueError(f"advantages ([B] or [B, T] tensor) is required for the {config.name!r} objective")
        shape = (B,) if advantages.dim() == 1 else (B, T)
        advantages = _check_bt(
            checks, "advantages", advantages, shape, device, mask=mask if advantages.dim() == 2 else None, dtype=dtype
        )
    if normalizer is not None:
        value = normalizer.detach() if isinstance(normalizer, torch.Tensor) else torch.tensor(float(normalizer))
        if value.numel() != 1:
            raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
        checks.add(f"normalizer must be a finite number > 0, got {normalizer!r}",
                   ~(torch.isfinite(value) & (value > 0)).to(device))
    # The same sync tells whether any token is masked: with none, the sweep needs no row order.
    (every_token_valid,) = checks.run(mask.all())

    flat_targets = torch.where(mask, targets, torch.zeros_like(targets)).reshape(-1).long()
    valid = None if every_token_valid else mask.reshape(-1)
    need_entropy = config.needs_entropy
    fused = (
        path == "triton"
        and config.per_token_terms
        and (rollout_logp is None or old_logp is not None)
    )
    terms = surrogate = None
    if fused:
        adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand(B, T)
        # The epilogue bounds the sampler weight itself (objectives.bound_rollout_weights is its twin); a weight
        # the caller supplies is used as given, under bounds that leave every weight >= 0 as it is.
        is_weight, epilogue_config = importance_sampling_ratio, config
        if is_weight is None and rollout_logp is not None:
            is_weight = objectives.raw_rollout_weights(config, old_logp, rollout_logp, mask)
        elif is_weight is not None:
            epilogue_config = config.replace(
                vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_cap=None,
                vllm_importance_sampling_clip_min=None,
            )
        if is_weight is not None:
            is_weight = is_weight.expand(B, T).reshape(-1)
        per_token = dict(advantages=adv.reshape(-1), old_logp=_flat(old_logp), ref_logp=_flat(ref_logp),
                         is_weight=is_weight)
        if hidden is not None and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            # The loss is linear in the terms and the entropy: its gradient is formed during the forward sweep.
            w_term, w_entropy = objectives.loss_weights(config, mask, normalizer, entropy=need_entropy)
            surrogate, terms, logp, entropy = _triton_ops().triton_fused_token_loss(
                epilogue_config, flat_targets, valid, hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight,
                w_term=w_term.reshape(-1), w_entropy=None if w_entropy is None else w_entropy.reshape(-1),
                temperature=temperature, return_entropy=need_entropy, **per_token,
            )
        else:
            terms, logp, entropy = _triton_ops().triton_fused_token_terms(
                epilogue_config, flat_targets, valid,
                hidden=None if hidden is None else hidden.reshape(-1, hidden.shape[-1]), weight=weight,
                logits=None if logits is None else logits.reshape(-1, logits.shape[-1]),
                temperature=temperature, return_entropy=need_entropy, **per_token,
            )
        terms = terms.view(B, T)
    else:
        logp, entropy = _sweep(path, flat_targets, hidden, weight, logits, temperature, need_entropy, valid)
    logp = logp.view(B, T)
    entropy = None if entropy is None else entropy.view(B, T)
    loss, metrics = objectives.policy_objective(
        config, logp, mask, advantages,
        old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp, rewards=rewards, q0=q0,
        entropy=entropy, normalizer=normalizer, terms=terms,
        importance_sampling_ratio=importance_sampling_ratio, entropy_gather=entropy_gather,
    )
    if surrogate is not None:
        # The value is the objective's own; the gradient is the one the fused sweep formed.
        loss = loss.detach() + (surrogate - surrogate.detach())
    return PolicyLossOutput(
        loss=loss, logp=logp.detach(), entropy=None if entropy is None else entropy.detach(), metrics=metrics
    )


class PolicyLoss(nn.Module):
    """`policy_loss` with its config (and impl) stored: `PolicyLoss(softpo.SAPO)(targets, mask, adv, hidden=h, weight=w)`."""

    def __init__(self, config: LossConfig, impl: str = "auto"):
        super().__init__()
        if not isinstance(config, LossConfig):
            raise ValueError(f"config must be a LossConfig, got {type(config).__name__}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.config = config
        self.impl = impl

    def forward(self, targets, mask, advantages=None, **kwargs) -> PolicyLossOutput:
        kwargs.setdefault("impl", self.impl)
        return policy_loss(self.config, targets, mask, advantages, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config.name!r}, impl={self.impl!r}"


class TokenLogprobs(nn.Module):
    """`token_logprobs` with temperature, entropy flag and impl stored."""

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False, impl: str = "auto"):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.return_entropy = return_entropy
        self.impl = impl

    def forward(self, targets, *, hidden=None, weight=None, logits=None):
        return token_logprobs(
            targets, hidden=hidden, weight=weight, logits=logits,
            temperature=self.temperature, return_entropy=self.return_entropy, impl=self.impl,
        )
