"""Autograd over the Triton vocabulary sweeps in `softpo.kernels`.

Two entry points, called by `softpo.api` with validated, flattened inputs:
`triton_token_logprobs` (per-token log-prob and entropy) and `triton_fused_token_terms` (the same
sweep with a token-level objective's terms evaluated in the forward kernel's epilogue).
"""

from __future__ import annotations

import contextlib
import dataclasses
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


# Bytes of the one vocabulary-sized buffer of the hidden path: a [tokens, V] logits tile in the inputs' dtype.
# A larger tile gives the d-weight matmul a longer reduction (tokens) per pass over its fp32 accumulator.
TILE_BYTES = 1 << 30
HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _tile_rows(n: int, V: int, element_size: int) -> int:
    rows = TILE_BYTES // (V * element_size)
    if rows >= 256:
        rows -= rows % 256  # whole matmul tiles
    return max(1, min(n, rows))


def _chunks(n: int, step: int, rows: torch.Tensor | None):
    """Index of each chunk of the valid tokens: a slice when every token is valid, else positions."""
    for c0 in range(0, n, step):
        yield slice(c0, min(c0 + step, n)) if rows is None else rows[c0:c0 + step]


def _take(t, idx):
    if t is None:
        return None
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def _put(full, idx, part):
    if isinstance(idx, slice):
        full[idx] = part
    else:
        full.index_copy_(0, idx, part)


def _accumulate(acc, a, b):
    """acc += a @ b with acc in fp32 for half-precision a, b, without rounding a @ b to their dtype first:
    per-chunk rounding of d weight to bf16 adds up over the chunks."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _check_hidden(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, {hidden.shape[1]}] to match hidden, got {tuple(weight.shape)}")
    if hidden.dtype not in HIDDEN_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one of {HIDDEN_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"weight and targets must be on {hidden.device}, got {weight.device} and {targets.device}")


_PER_TOKEN_TERMS = ("advantages", "old_logp", "ref_logp", "is_weight")


def _projected_tiles(hidden, weight, rows):
    """(idx, hidden rows, logits tile) for each tile of valid tokens; one tile buffer serves them all."""
    N, V = hidden.shape[0], weight.shape[0]
    n = N if rows is None else rows.numel()
    if n == 0:
        return
    step = _tile_rows(n, V, hidden.element_size())
    tile = torch.empty(step, V, dtype=hidden.dtype, device=hidden.device)
    for idx in _chunks(n, step, rows):
        h = _take(hidden, idx)
        z = tile[: h.shape[0]]
        torch.mm(h, weight.T, out=z)
        yield idx, h, z


def _no_autocast(tensor):
    # The tile matmuls stay in the inputs' dtype: autocast would turn an fp32 d hidden into bf16.
    return torch.autocast(tensor.device.type, enabled=False)


def _valid_rows(sweep: Sweep):
    # One host sync: the number of valid tokens fixes the tiles, and masked ones cost no matmul.
    return None if sweep.row_idx is None else sweep.row_idx[: int(sweep.n_valid)]


def _forward_tile(sweep: Sweep, z, idx, outputs):
    """The forward sweep of one tile; its per-token results land in `outputs` (logp, lse, entropy, term, coef)."""
    terms = sweep.terms and dataclasses.replace(
        sweep.terms, **{name: _take(getattr(sweep.terms, name), idx) for name in _PER_TOKEN_TERMS}
    )
    parts = K.logits_logprob_fwd(z, _take(sweep.targets, idx), temperature=sweep.temperature,
                                 return_entropy=sweep.return_entropy, terms=terms)
    for full, part in zip(outputs, parts):
        if full is not None:
            _put(full, idx, part)


def _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, temperature, d_hidden, d_weight):
    """Turn the tile into d logits in place, then add its share of d hidden and d weight."""
    K.logits_logprob_bwd(
        z, _take(targets, idx), _take(lse, idx), _take(g_logp, idx), entropy=_take(entropy, idx),
        g_entropy=_take(g_entropy, idx), temperature=temperature, out=z,
    )
    if d_hidden is not None:
        _put(d_hidden, idx, z @ weight)
    if d_weight is not None:
        _accumulate(d_weight, z.T, h)


def _gradient_buffers(hidden, weight, need_hidden, need_weight):
    # Masked tokens keep a zero gradient; d weight sums over tiles in fp32 for half-precision weights.
    d_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    acc_dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
    d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    return d_hidden, d_weight


def _sweep_outputs(N, device, sweep: Sweep):
    f32 = dict(dtype=torch.float32, device=device)
    entropy = torch.zeros(N, **f32) if sweep.return_entropy else None
    term, coef = (torch.zeros(N, **f32), torch.zeros(N, **f32)) if sweep.terms is not None else (None, None)
    return torch.zeros(N, **f32), torch.zeros(N, **f32), entropy, term, coef


class HiddenLogprobFunction(torch.autograd.Function):
    """(out, entropy, logp) from hidden [N, H] and weight [V, H]; out is logp, or the terms when fused.

    The projection runs in the matmul library on tiles of at most TILE_BYTES ([tokens, V] logits in
    the inputs' dtype, as a plain `hidden @ weight.T` would round them), masked tokens dropped first;
    the logits kernels sweep each tile forward and, in the backward, turn the recomputed tile into its
    gradient in place before the two gradient matmuls. d weight accumulates over tiles in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, sweep: Sweep):
        # An unused entropy output then arrives as None and its gradient term is skipped.
        ctx.set_materialize_grads(False)
        _check_hidden(hidden, weight, sweep.targets)
        rows = _valid_rows(sweep)
        outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep)
        with _no_autocast(hidden):
            for idx, _, z in _projected_tiles(hidden, weight, rows):
                _forward_tile(sweep, z, idx, outputs)
        logp, lse, entropy, term, coef = outputs
        ctx.save_for_backward(hidden, weight, sweep.targets, rows, lse, entropy, coef)
        ctx.temperature = sweep.temperature
        if term is None:
            return logp, entropy, None
        ctx.mark_non_differentiable(logp)
        return term, entropy, logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_entropy, _g_logp):
        hidden, weight, targets, rows, lse, entropy, coef = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if (g_out is None and g_entropy is None) or not (need_hidden or need_weight):
            return None, None, None
        g_logp = _grad_logp(g_out, coef, lse)
        g_entropy = None if g_entropy is None else g_entropy.float().contiguous()
        d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight)
        with _no_autocast(hidden):
            for idx, h, z in _projected_tiles(hidden, weight, rows):
                _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, ctx.temperature,
                               d_hidden, d_weight)
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None


class HiddenFusedLossFunction(torch.autograd.Function):
    """A token-level objective's loss from hidden [N, H] and weight [V, H], its gradients made in the forward.

    With `weights` = (d loss / d term, d loss / d entropy or None), fp32 [N], known before the sweep
    (the loss is linear in both), each tile becomes its own gradient right after its forward sweep:
    three matmuls of 2NHV instead of four, no logits recomputed. Returns (surrogate, term, entropy,
    logp): the surrogate sum(w_term * term) + sum(w_entropy * entropy) carries the precomputed
    gradients (scaled by its incoming gradient); the others are detached.
    """

    @staticmethod
    def forward(ctx, hidden, weight, sweep: Sweep, w_term, w_entropy):
        _check_hidden(hidden, weight, sweep.targets)
        rows = _valid_rows(sweep)
        outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep)
        logp, lse, entropy, term, coef = outputs
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight)
        g_logp = torch.zeros_like(coef)
        with _no_autocast(hidden):
            for idx, h, z in _projected_tiles(hidden, weight, rows):
                _forward_tile(sweep, z, idx, outputs)
                _put(g_logp, idx, _take(w_term, idx) * _take(coef, idx))
                _backward_tile(z, h, idx, weight, sweep.targets, lse, g_logp, entropy, w_entropy,
                               sweep.temperature, d_hidden, d_weight)
        surrogate = (w_term * term).sum()
        if w_entropy is not None:
            surrogate = surrogate + (w_entropy * entropy).sum()
        ctx.save_for_backward(d_hidden, None if d_weight is None else d_weight.to(weight.dtype))
        ctx.mark_non_differentiable(term, logp, *([] if entropy is None else [entropy]))
        return surrogate, term, entropy, logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_surrogate, *_):
        d_hidden, d_weight = ctx.saved_tensors
        if g_surrogate is None:
            return None, None, None, None, None
        scale = lambda d: None if d is None else d * g_surrogate.to(d.dtype)  # noqa: E731
        return scale(d_hidden), scale(d_weight), None, None, None


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


def _sweep(targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward, terms,
           loss_weights=None):
    if (logits is None) == (hidden is None and weight is None):
        raise ValueError("give either logits, or hidden and weight")
    if loss_weights is not None and (hidden is None or weight is None or terms is None):
        raise ValueError("loss_weights need hidden and weight and a token-level objective's terms")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != targets.shape):
        raise ValueError(f"valid must be bool with targets' shape {targets.shape}, got {valid.dtype} {valid.shape}")
    row_idx, n_valid = _row_order(valid)
    sweep = Sweep(
        targets.contiguous(), row_idx, n_valid, float(temperature), bool(return_entropy), bool(inplace_backward), terms
    )
    if loss_weights is not None:
        with _on_device(targets.device):
            return HiddenFusedLossFunction.apply(hidden, weight, sweep, *loss_weights)
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
    if not config.per_token_terms:
        raise ValueError(
            "config must be a token-level policy objective (objective='policy', importance_sampling_level='token', "
            "gate not 'vespo', top_entropy_quantile=1, off_policy_mask_threshold=None), got "
            f"objective={config.objective!r}, importance_sampling_level={config.importance_sampling_level!r}, "
            f"gate={config.gate!r}, top_entropy_quantile={config.top_entropy_quantile}, "
            f"off_policy_mask_threshold={config.off_policy_mask_threshold}"
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
        # is_weight is the raw sampler ratio: the epilogue bounds it (objectives.bound_rollout_weights).
        is_bound=K.IS_TRUNCATE if config.vllm_importance_sampling_mode.endswith("truncate") else K.IS_MASK,
        is_lo=config.vllm_importance_sampling_clip_min or 0.0,
        is_hi=float("inf") if config.vllm_importance_sampling_cap is None else config.vllm_importance_sampling_cap,
    )


def triton_fused_token_loss(
    config: LossConfig,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    w_term: torch.Tensor,
    w_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
):
    """The token-level objective's sweep on the hidden path with its gradients formed in the forward.

    w_term, w_entropy: d loss / d term and d loss / d entropy, fp32 [N] (objectives.loss_weights);
    the entropy is computed when w_entropy is given or return_entropy is set. The other arguments are
    those of `triton_fused_token_terms`. Returns (surrogate, terms, logp, entropy or None): a
    differentiable scalar whose gradient is the loss's gradient with respect to hidden and weight, and
    the per-token values (detached) from which the caller computes the loss's value and metrics.
    """
    for name, w in (("w_term", w_term), ("w_entropy", w_entropy)):
        if w is not None and (w.shape != targets.shape or w.dtype != torch.float32 or w.device != targets.device):
            raise ValueError(f"{name} must be float32 with targets' shape {tuple(targets.shape)} on {targets.device}")
    terms = terms_args(config, advantages, old_logp, ref_logp, is_weight)
    weights = (w_term.contiguous(), None if w_entropy is None else w_entropy.contiguous())
    surrogate, term, entropy, logp = _sweep(
        targets, hidden, weight, None, temperature, return_entropy or w_entropy is not None, valid, False, terms,
        loss_weights=weights,
    )
    return surrogate, term, logp, entropy


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
