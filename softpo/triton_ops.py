"""Autograd over the Triton vocabulary sweeps in `softpo.kernels`.

Two entry points, called by `softpo.api` with validated, flattened inputs:
`triton_token_logprobs` (per-token log-prob and entropy) and `triton_fused_token_terms` (the same
sweep with a token-level objective's terms evaluated in the forward kernel's epilogue).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import kernels as K
from .config import LossConfig


@dataclass(frozen=True)
class Sweep:
    """Everything a sweep needs besides the differentiable inputs.

    targets int64 [N]; row_idx / n_valid: the valid-first token order (None: all valid); terms:
    the epilogue's per-token inputs and settings (None: log-prob mode).
    """

    targets: torch.Tensor
    row_idx: torch.Tensor | None
    n_valid: torch.Tensor | None
    temperature: float
    return_entropy: bool
    inplace_backward: bool = False
    terms: K.TermsArgs | None = None


def _row_order(valid: torch.Tensor | None):
    """(row_idx, n_valid): every token, valid ones first, so kernels skip the masked ones without a host sync."""
    if valid is None:
        return None, None
    row_idx = torch.argsort(valid.to(torch.uint8), descending=True, stable=True)
    return row_idx, valid.sum(dtype=torch.int64).reshape(1)


def _grad_logp(g_out, coef, like):
    """Upstream gradient of logp as contiguous fp32; in fused mode the term's gradient times d term / d logp."""
    if g_out is None:
        return torch.zeros_like(like)
    g = g_out.float()
    if coef is not None:
        g = g * coef
    return g.contiguous()


class HiddenLogprobFunction(torch.autograd.Function):
    """(out, entropy, logp) from hidden [N, H] and weight [V, H]; out is logp, or the terms when fused."""

    @staticmethod
    def forward(ctx, hidden, weight, sweep: Sweep):
        # An unused entropy output then arrives as None and its gradient term is skipped.
        ctx.set_materialize_grads(False)
        logp, lse, entropy, term, coef = K.hidden_logprob_fwd(
            hidden, weight, sweep.targets, temperature=sweep.temperature, row_idx=sweep.row_idx,
            n_valid=sweep.n_valid, return_entropy=sweep.return_entropy, terms=sweep.terms,
        )
        ctx.save_for_backward(hidden, weight, sweep.targets, sweep.row_idx, sweep.n_valid, lse, entropy, coef)
        ctx.temperature = sweep.temperature
        if term is None:
            return logp, entropy, None
        ctx.mark_non_differentiable(logp)
        return term, entropy, logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_entropy, _g_logp):
        hidden, weight, targets, row_idx, n_valid, lse, entropy, coef = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if (g_out is None and g_entropy is None) or not (need_hidden or need_weight):
            return None, None, None
        sweep = dict(
            entropy=entropy, g_entropy=None if g_entropy is None else g_entropy.float().contiguous(),
            temperature=ctx.temperature, row_idx=row_idx, n_valid=n_valid,
        )
        g_logp = _grad_logp(g_out, coef, lse)
        d_hidden = d_weight = None
        if need_hidden:
            d_hidden = K.hidden_logprob_bwd_dh(hidden, weight, targets, lse, g_logp, **sweep)
        if need_weight:
            d_weight = K.hidden_logprob_bwd_dw(hidden, weight, targets, lse, g_logp, **sweep)
        return d_hidden, d_weight, None


class LogitsLogprobFunction(torch.autograd.Function):
    """(out, entropy, logp) from logits [N, V]; out is logp, or the terms when fused."""

    @staticmethod
    def forward(ctx, logits, sweep: Sweep):
        ctx.set_materialize_grads(False)
        logp, lse, entropy, term, coef = K.logits_logprob_fwd(
            logits, sweep.targets, temperature=sweep.temperature, row_idx=sweep.row_idx, n_valid=sweep.n_valid,
            return_entropy=sweep.return_entropy, terms=sweep.terms,
        )
        ctx.save_for_backward(logits, sweep.targets, sweep.row_idx, sweep.n_valid, lse, entropy, coef)
        ctx.temperature = sweep.temperature
        ctx.inplace = sweep.inplace_backward
        if term is None:
            return logp, entropy, None
        ctx.mark_non_differentiable(logp)
        return term, entropy, logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_entropy, _g_logp):
        # Unpacking checks the version counter: logits modified since the forward raise here.
        logits, targets, row_idx, n_valid, lse, entropy, coef = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_out is None and g_entropy is None):
            return None, None
        inplace = ctx.inplace
        d_logits = K.logits_logprob_bwd(
            logits, targets, lse, _grad_logp(g_out, coef, lse),
            entropy=entropy, g_entropy=None if g_entropy is None else g_entropy.float().contiguous(),
            temperature=ctx.temperature, row_idx=row_idx, n_valid=n_valid,
            out=logits if inplace else None,
        )
        if inplace:
            # The logits now hold their gradient. Any other node that saved them (or a view of their
            # storage) sees a newer version and refuses to run rather than read gradients as logits.
            torch.autograd.graph.increment_version(logits)
        return d_logits, None


def _check_inplace(logits: torch.Tensor):
    if not logits.requires_grad:
        return
    # A view's storage belongs to its base: writing through a view of a leaf overwrites the leaf.
    base = logits if logits._base is None else logits._base
    if logits.grad_fn is None or base.grad_fn is None:
        raise ValueError(
            "inplace_backward=True would overwrite a leaf tensor's data with its gradient; "
            "pass logits produced by an autograd op (e.g. the lm_head matmul), or inplace_backward=False"
        )
    if any(stride == 0 and size > 1 for stride, size in zip(logits.stride(), logits.shape)):
        raise ValueError("inplace_backward=True needs logits whose elements do not overlap (no stride 0)")


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, which need not hold the tensors (a model split over
    GPUs in one process). The backward needs no guard: autograd runs it on its gradients' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _sweep(targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward, terms):
    if (logits is None) == (hidden is None and weight is None):
        raise ValueError("give either logits, or hidden and weight")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != targets.shape):
        raise ValueError(f"valid must be bool with targets' shape {targets.shape}, got {valid.dtype} {valid.shape}")
    row_idx, n_valid = _row_order(valid)
    sweep = Sweep(
        targets.contiguous(), row_idx, n_valid, float(temperature), bool(return_entropy), bool(inplace_backward), terms
    )
    if logits is not None:
        if inplace_backward:
            _check_inplace(logits)
        with _on_device(targets.device):
            return LogitsLogprobFunction.apply(logits, sweep)
    if hidden is None or weight is None:
        raise ValueError("hidden and weight must be given together")
    if inplace_backward:
        raise ValueError("inplace_backward applies to the logits path only")
    with _on_device(targets.device):
        return HiddenLogprobFunction.apply(hidden, weight, sweep)


def triton_token_logprobs(
    targets: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    valid: torch.Tensor | None = None,
    inplace_backward: bool = False,
):
    """Per-token log-prob of targets under softmax(z / temperature), z = hidden @ weight.T or logits.

    targets int64 [N] (in [0, V) where valid); hidden [N, H] with weight [V, H], or logits [N, V];
    valid bool [N] or None (all valid). Returns (logp fp32 [N], entropy fp32 [N] or None), both
    differentiable; masked tokens give 0 and no gradient. inplace_backward=True (logits only) writes
    d logits over the logits' storage during backward.
    """
    logp, entropy, _ = _sweep(
        targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward, None
    )
    return logp, entropy


def terms_args(config: LossConfig, advantages, old_logp=None, ref_logp=None, is_weight=None) -> K.TermsArgs:
    """The kernel epilogue's arguments for a token-level policy objective."""
    if config.objective != "policy" or config.importance_sampling_level != "token":
        raise ValueError(
            "config must be a token-level policy objective (objective='policy', importance_sampling_level='token'), "
            f"got objective={config.objective!r}, importance_sampling_level={config.importance_sampling_level!r}"
        )
    if config.beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when config.beta > 0")
    per_token = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    gate = {"clip": K.GATE_CLIP, "soft": K.GATE_SOFT, "cispo": K.GATE_TRUNCATED}[config.gate]
    if config.gate == "cispo":
        lo, hi = 0.0, config.epsilon_upper
    else:
        lo, hi = 1 - config.epsilon, 1 + config.epsilon_upper
    kl = {"k1": K.KL_K1, "k2": K.KL_K2, "k3": K.KL_K3}[config.kl_estimator] if config.beta > 0 else K.KL_NONE
    return K.TermsArgs(
        advantages=per_token(advantages), old_logp=per_token(old_logp),
        ref_logp=per_token(ref_logp) if kl != K.KL_NONE else None, is_weight=per_token(is_weight),
        gate=gate, lo=lo, hi=hi, delta=config.delta if config.gate == "clip" else None,
        tau_pos=config.sapo_temperature_pos, tau_neg=config.sapo_temperature_neg,
        beta=config.beta, kl=kl, kl_ratio=config.use_bias_correction_kl,
    )


def triton_fused_token_terms(
    config: LossConfig,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    inplace_backward: bool = False,
):
    """One sweep yielding the per-token terms of a token-level objective (softpo.objectives.token_terms).

    advantages, old_logp, ref_logp, is_weight: fp32 [N] (None: on-policy ratio 1 / no KL / weight 1).
    Returns (terms fp32 [N] differentiable, logp fp32 [N] detached, entropy fp32 [N] differentiable or
    None). The backward is the log-prob sweep with grad_logp = grad_terms * d term / d logp.
    """
    terms = terms_args(config, advantages, old_logp, ref_logp, is_weight)
    term, entropy, logp = _sweep(
        targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward, terms
    )
    return term, logp, entropy
