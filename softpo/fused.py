"""Autograd over the Triton vocabulary sweeps: each op a ladder of launcher (`softpo.kernels`), allocating
function (`softpo.tiles` on the hidden path), `torch.autograd.Function`, public function.

Public functions (called by `softpo.routes` with validated, flattened inputs; they trust their caller):
`triton_token_logprobs` (per-token log-prob and entropy), `triton_fused_token_terms` (the same sweep with a
token-level objective's terms evaluated in the forward kernel's epilogue), `hidden_loss_in_forward` and
`logits_loss_in_forward` (an objective's gradient formed during the forward sweep), and `terms_args` (the
epilogue's arguments for a config).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from . import sampling, tiles, vocab_parallel
from .config import LossConfig
from .kernels import logits as logits_sweep, terms as token_epilogue
from .rows import chunks, put, take, valid_first
from .sweep import Sweep, on_device, per_token


def _forward_outputs(ctx, sweep: Sweep, rows, outputs, sampler: tiles.TileSampler, *inputs):
    """The log-prob Functions' forward tail: a vocabulary shard's results combined over its group, `inputs`
    then (lse, entropy, coef, logp) saved, the sampler kept for the backward (`ctx.sampler`), and (out,
    entropy, logp) returned, out being logp or the terms."""
    logp, lse, entropy, term, coef = outputs
    if sweep.shard is not None:
        logp, lse, entropy, lse_low = vocab_parallel.combine(sweep.shard, logp, lse, entropy, sweep.targets, rows,
                                                             sampler.lse_low)
        sampler = dataclasses.replace(sampler, lse_low=lse_low)
    ctx.save_for_backward(*inputs, lse, entropy, coef, logp)
    ctx.sampler = sampler
    if term is None:
        return logp, entropy, None
    ctx.mark_non_differentiable(logp)
    return term, entropy, logp


def _scale_formed_(ctx, g_surrogate, *gradients):
    """Gradients formed in the forward, scaled in place by the surrogate's incoming gradient (read on the
    device: nothing is read or written when it is 1, the usual `loss.backward()`), so no second copy is
    made. Scaled once, they cannot serve a second backward, which is refused."""
    if ctx.spent:
        raise RuntimeError(
            "the gradient formed in the forward was scaled in place by the first backward; a second backward "
            "through the same policy_loss call (retain_graph=True) is not supported on this route: call "
            "policy_loss again, or pass inputs that do not require grad for one of the two"
        )
    ctx.spent = True
    g = g_surrogate.detach().float()
    return [None if d is None else logits_sweep.scale_(d, g) for d in gradients]


def _grad_logp(g_out, coef, like, logp=None):
    """Upstream gradient of logp as contiguous fp32; in fused mode the term's gradient times d term / d logp.
    Zero where logp is -inf (a target outside the sampler's kept set): such a log-prob has no gradient, and
    a sweep over part of the vocabulary (a shard, a block of rows) cannot see that its target was dropped."""
    if g_out is None:
        return torch.zeros_like(like)
    g = per_token(g_out if coef is None else g_out.float() * coef)
    if logp is not None:
        g = torch.where(logp == float("-inf"), torch.zeros_like(g), g)
    return g


def _logits_sampler(logits, sweep: Sweep) -> tiles.TileSampler:
    """The sampler of a logits sweep: thresholds searched over chunks of the valid rows' logits (one more read
    of them, merged over the group for a vocabulary shard) and a buffer for lse's rounding error."""
    N, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    sampler = tiles.TileSampler(temperature=sweep.temperature, transform=sweep.transform, lse_low=torch.zeros(N, **f32),
                                block=tiles.invariant_rows(logits.device) if sweep.batch_invariant else None)
    V_all = V if sweep.shard is None else sweep.shard.vocab
    if not sweep.transform.truncates(V_all):
        return sampler
    sampler = dataclasses.replace(sampler, threshold=torch.full((N,), float("-inf"), **f32))
    rows = tiles._valid_rows(sweep)
    n = N if rows is None else rows.numel()
    for idx in chunks(n, 1024, rows):
        x = take(logits, idx)
        if sweep.shard is None:
            found = tiles._search_tile(sampler, x, idx, V)
        else:
            inv = sampling.inverse_temperature(sweep.temperature, None, x)
            inv = take(inv, idx) if isinstance(inv, torch.Tensor) else inv

            def chunks_for(sub, x=x, inv=inv):
                for v0 in range(0, V, 1 << 14):
                    z = sampling.process(x[:, v0:v0 + (1 << 14)].float(), sweep.transform, inv)
                    yield z if sub is None else z[sub]

            found = vocab_parallel.find_thresholds(sweep.shard, sweep.transform, x.shape[0], chunks_for,
                                                   sampler.threshold)
        put(sampler.threshold, idx, found)
    return sampler


class HiddenLogprobFunction(torch.autograd.Function):
    """(out, entropy, logp) from hidden [N, H] and weight [V, H]; out is logp, or the terms when fused.

    The forward and backward sweep logits tiles (`softpo.tiles`); the backward recomputes each tile and
    turns it into its gradient in place before the two gradient matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, sweep: Sweep):
        # An unused entropy output then arrives as None and its gradient term is skipped.
        ctx.set_materialize_grads(False)
        rows, outputs, sampler = tiles.hidden_forward(hidden, weight, sweep)
        ctx.sweep = sweep
        return _forward_outputs(ctx, sweep, rows, outputs, sampler, hidden, weight, sweep.targets, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_entropy, _g_logp):
        hidden, weight, targets, rows, lse, entropy, coef, logp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if (g_out is None and g_entropy is None) or not (need_hidden or need_weight):
            return None, None, None
        sweep = ctx.sweep
        d_hidden, d_weight = tiles.hidden_backward(
            hidden, weight, targets, rows, lse, entropy, _grad_logp(g_out, coef, lse, logp), per_token(g_entropy),
            ctx.sampler, need_hidden, need_weight, sweep.flat_memory,
        )
        if d_hidden is not None and sweep.shard is not None:
            vocab_parallel.reduce_hidden_grad(sweep.shard, d_hidden)
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None


class HiddenGradientInForwardFunction(torch.autograd.Function):
    """An objective's loss from hidden [N, H] and weight [V, H], its gradients made during the forward sweep.

    `tile_gradients(idx, outputs)` gives d loss / d logp and d loss / d entropy (or None) of a tile's tokens
    from the sweep's outputs so far (logp, lse, entropy, term, coef): a token-level objective's are known
    before the sweep (the loss is linear in its terms and the entropy); a sequence-level one's are known
    once the tile's whole sequences have their log-probs, so its tiles hold whole sequences (`tiles`). Each
    tile then becomes its own gradient right after its forward sweep (`softpo.tiles.gradient_in_forward`):
    three matmuls of 2NHV, no logits recomputed. With `sweep.flat_memory` only d hidden is formed so, and
    d weight waits for the backward's vocabulary-major pass: 8NHV and no V x H fp32 accumulator. Returns
    (surrogate, entropy, logp, term): the surrogate, zero-valued, carries the gradients (scaled by its
    incoming gradient); the others are detached.
    """

    @staticmethod
    def forward(ctx, hidden, weight, sweep: Sweep, tiled, tile_gradients):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        rows, outputs, d_hidden, d_weight, g_logp, g_entropy, sampler = tiles.gradient_in_forward(
            hidden, weight, sweep, tiled, tile_gradients, need_hidden, need_weight)
        logp, lse, entropy, term, _ = outputs
        ctx.weight_in_backward = sweep.flat_memory and need_weight
        ctx.spent = False
        if ctx.weight_in_backward:
            ctx.sampler = sampler
            g_logp = _grad_logp(g_logp, None, lse, logp)
            ctx.save_for_backward(d_hidden, hidden, weight, sweep.targets, rows, lse, entropy, g_logp, g_entropy)
        else:
            ctx.save_for_backward(d_hidden, None if d_weight is None else d_weight.to(weight.dtype))
        ctx.mark_non_differentiable(logp, *[t for t in (entropy, term) if t is not None])
        return logp.new_zeros(()), entropy, logp, term

    @staticmethod
    @once_differentiable
    def backward(ctx, g_surrogate, *_):
        if g_surrogate is None:
            return None, None, None, None, None
        if not ctx.weight_in_backward:
            d_hidden, d_weight = _scale_formed_(ctx, g_surrogate, *ctx.saved_tensors)
            return d_hidden, d_weight, None, None, None
        d_hidden, hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy = ctx.saved_tensors
        # The per-token gradients take the scale, so the vocabulary-major pass writes d weight final.
        d_hidden, g_logp, g_entropy = _scale_formed_(ctx, g_surrogate, d_hidden, g_logp, g_entropy)
        _, d_weight = tiles._hidden_backward_flat(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy,
                                                  ctx.sampler, False, True)
        return d_hidden, d_weight, None, None, None


class LogitsLogprobFunction(torch.autograd.Function):
    """(out, entropy, logp) from logits [N, V]; out is logp, or the terms when fused."""

    @staticmethod
    def forward(ctx, logits, sweep: Sweep):
        ctx.set_materialize_grads(False)
        sampler = _logits_sampler(logits, sweep)
        outputs = logits_sweep.logits_logprob_fwd(
            logits, sweep.targets, row_idx=sweep.row_idx, n_valid=sweep.n_valid,
            return_entropy=sweep.return_entropy, terms=sweep.terms, **sampler.kernel_kwargs(slice(None)),
        )
        ctx.inplace = sweep.inplace_backward
        rows = None if sweep.shard is None else tiles._valid_rows(sweep)
        return _forward_outputs(ctx, sweep, rows, outputs, sampler, logits, sweep.targets, sweep.row_idx,
                                sweep.n_valid)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_entropy, _g_logp):
        # Unpacking checks the version counter: logits modified since the forward raise here.
        logits, targets, row_idx, n_valid, lse, entropy, coef, logp = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_out is None and g_entropy is None):
            return None, None
        inplace = ctx.inplace
        d_logits = logits_sweep.logits_logprob_bwd(
            logits, targets, lse, _grad_logp(g_out, coef, lse, logp), entropy=entropy, g_entropy=per_token(g_entropy),
            row_idx=row_idx, n_valid=n_valid, out=logits if inplace else None, **ctx.sampler.kernel_kwargs(slice(None)),
        )
        if inplace:
            # The logits now hold their gradient. Any other node that saved them (or a view of their
            # storage) sees a newer version and refuses to run rather than read gradients as logits.
            torch.autograd.graph.increment_version(logits)
        return d_logits, None


class LogitsGradientInForwardFunction(torch.autograd.Function):
    """A token-level objective's loss from logits [N, V], with d logits written by the forward kernel
    (`kernels.logits_loss_fwd`): the loss is linear in the terms and the entropy, whose weights (w_term,
    w_entropy: fp32 [N]) are known before the sweep. Returns (surrogate, entropy, logp, term) as
    `HiddenGradientInForwardFunction` does; the backward scales the stored d logits by the incoming gradient
    in place (no pass at all when it is 1, the usual `loss.backward()`), so it runs once per forward.
    """

    @staticmethod
    def forward(ctx, logits, sweep: Sweep, w_term, w_entropy):
        sampler = _logits_sampler(logits, sweep)
        logp, _, entropy, term, _, d_logits = logits_sweep.logits_loss_fwd(
            logits, sweep.targets, sweep.terms, w_term, w_entropy, row_idx=sweep.row_idx, n_valid=sweep.n_valid,
            return_entropy=sweep.return_entropy or w_entropy is not None, **sampler.kernel_kwargs(slice(None)),
        )
        ctx.save_for_backward(d_logits)
        ctx.spent = False
        ctx.mark_non_differentiable(logp, *[t for t in (entropy, term) if t is not None])
        return logp.new_zeros(()), entropy, logp, term

    @staticmethod
    @once_differentiable
    def backward(ctx, g_surrogate, *_):
        if g_surrogate is None:
            return None, None, None, None
        (d_logits,) = _scale_formed_(ctx, g_surrogate, *ctx.saved_tensors)
        return d_logits, None, None, None


def _temperature(temperature):
    """A float, or one fp32 value per flat token."""
    return temperature.float().contiguous() if isinstance(temperature, torch.Tensor) else float(temperature)


def _sweep(targets, valid, valid_count=None, **settings) -> Sweep:
    assert valid is None or (valid.dtype == torch.bool and valid.shape == targets.shape)
    row_idx, n_valid = valid_first(valid)
    return Sweep(targets=targets.contiguous(), row_idx=row_idx, n_valid=n_valid,
                 valid_count=None if valid is None else valid_count, **settings)


def triton_token_logprobs(
    targets: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    valid: torch.Tensor | None = None,
    valid_count: int | None = None,
    inplace_backward: bool = False,
    shard: vocab_parallel.VocabShard | None = None,
    flat_memory: bool = False,
    transform: sampling.SamplerTransform = sampling.SamplerTransform(),
    batch_invariant: bool = False,
):
    """Per-token log-prob of targets under softmax(z / temperature), z = hidden @ weight.T or logits.

    targets int64 [N] (in [0, V) where valid); hidden [N, H] with weight [V, H], or logits [N, V];
    valid bool [N] or None (all valid), valid_count its number of True values if known. Returns
    (logp fp32 [N], entropy fp32 [N] or None), both differentiable; masked tokens give 0 and no gradient.
    inplace_backward=True (logits only) writes d logits over the logits' storage during backward. With
    `shard`, weight / logits hold this rank's vocabulary rows, targets are ids local to them, and the
    results are the whole vocabulary's. temperature: a float or fp32 [N]; transform, batch_invariant: the
    sampler's distribution (`softpo.sweep.SweepArgs`).
    """
    logp, entropy, _ = _logprob_sweep(
        targets, valid, hidden, weight, logits, temperature=_temperature(temperature),
        return_entropy=bool(return_entropy), valid_count=valid_count, inplace_backward=bool(inplace_backward),
        shard=shard, flat_memory=bool(flat_memory), transform=transform, batch_invariant=bool(batch_invariant),
    )
    return logp, entropy


def triton_fused_token_terms(
    config: LossConfig,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    valid_count: int | None = None,
    inplace_backward: bool = False,
    shard: vocab_parallel.VocabShard | None = None,
    flat_memory: bool = False,
    transform: sampling.SamplerTransform = sampling.SamplerTransform(),
    batch_invariant: bool = False,
    **per_token_inputs,
):
    """One sweep yielding the per-token terms of a token-level objective (softpo.objectives.token_terms).

    per_token_inputs: those of `terms_args` (advantages, old_logp, ref_logp, is_weight: fp32 [N]; None:
    on-policy ratio 1 / no KL / weight 1; is_weight_as_given). Returns (terms fp32 [N] differentiable,
    logp fp32 [N] detached, entropy fp32 [N] differentiable or None). The backward is the log-prob sweep with
    grad_logp = grad_terms * d term / d logp.
    """
    term, entropy, logp = _logprob_sweep(
        targets, valid, hidden, weight, logits, temperature=_temperature(temperature),
        return_entropy=bool(return_entropy), valid_count=valid_count, inplace_backward=bool(inplace_backward),
        shard=shard, flat_memory=bool(flat_memory), terms=terms_args(config, **per_token_inputs),
        transform=transform, batch_invariant=bool(batch_invariant),
    )
    return term, logp, entropy


def _logprob_sweep(targets, valid, hidden, weight, logits, **settings):
    """(out, entropy, logp) of the log-prob Function that fits the inputs (see `HiddenLogprobFunction`)."""
    assert (logits is None) != (hidden is None or weight is None), "logits, or hidden and weight"
    assert not settings.get("inplace_backward") or logits is not None, "inplace_backward is the logits path's"
    sweep = _sweep(targets, valid, **settings)
    with on_device(targets):
        if logits is not None:
            return LogitsLogprobFunction.apply(logits, sweep)
        return HiddenLogprobFunction.apply(hidden, weight, sweep)


def hidden_loss_in_forward(targets, valid, tiled, tile_gradients, *, hidden, weight, temperature, return_entropy,
                           terms=None, valid_count=None, flat_memory=False, transform=sampling.SamplerTransform(),
                           batch_invariant=False):
    """An objective on the hidden path with its gradients formed in the forward (`HiddenGradientInForwardFunction`).

    tiled: lists of positions that each hold whole sequences (`softpo.tiles.sequence_tiles`), or None for
    tiles of the valid tokens; tile_gradients(idx, outputs) -> (d loss / d logp, d loss / d entropy or None)
    of the tokens `idx`; terms: the epilogue's arguments (`terms_args`) or None. Returns (surrogate, terms,
    logp, entropy or None): a differentiable scalar whose gradient is the loss's gradient with respect to
    hidden and weight, and the per-token values (detached) from which the caller computes the loss's value.
    """
    sweep = _sweep(targets, valid, valid_count, temperature=_temperature(temperature),
                   return_entropy=bool(return_entropy), terms=terms, flat_memory=bool(flat_memory),
                   transform=transform, batch_invariant=bool(batch_invariant))
    with on_device(hidden):
        surrogate, entropy, logp, term = HiddenGradientInForwardFunction.apply(hidden, weight, sweep, tiled,
                                                                               tile_gradients)
    return surrogate, term, logp, entropy


def logits_loss_in_forward(targets, valid, terms, w_term, w_entropy, *, logits, temperature, return_entropy,
                           transform=sampling.SamplerTransform(), batch_invariant=False):
    """A token-level objective on the logits path with d logits written by the forward kernel
    (`LogitsGradientInForwardFunction`). w_term, w_entropy: d loss / d term and d loss / d entropy, [N]
    (objectives.loss_weights). Returns (surrogate, terms, logp, entropy or None) as `hidden_loss_in_forward`."""
    sweep = _sweep(targets, valid, temperature=_temperature(temperature), return_entropy=bool(return_entropy),
                   terms=terms, transform=transform, batch_invariant=bool(batch_invariant))
    with on_device(logits):
        surrogate, entropy, logp, term = LogitsGradientInForwardFunction.apply(logits, sweep, per_token(w_term),
                                                                               per_token(w_entropy))
    return surrogate, term, logp, entropy


def terms_args(config: LossConfig, advantages, old_logp=None, ref_logp=None, is_weight=None,
               is_weight_as_given=False) -> token_epilogue.TermsArgs:
    """The kernel epilogue's arguments for a token-level policy objective.

    is_weight: the raw sampler ratio, which the epilogue bounds as the config says (its torch twin is
    objectives.bound_rollout_weights), or with is_weight_as_given a weight the caller already bounded.
    """
    assert config.per_token_terms, config.name
    gate = {"clip": token_epilogue.GATE_CLIP, "soft": token_epilogue.GATE_SOFT,
            "cispo": token_epilogue.GATE_TRUNCATED}[config.gate]
    if config.gate == "cispo":
        lo, hi = config.cispo_floor or 0.0, config.epsilon_upper
    else:
        lo, hi = 1 - config.epsilon, 1 + config.epsilon_upper
    kl = (
        {"k1": token_epilogue.KL_K1, "k2": token_epilogue.KL_K2, "k3": token_epilogue.KL_K3}[config.kl_estimator]
        if config.beta > 0 else token_epilogue.KL_NONE
    )
    return token_epilogue.TermsArgs(
        advantages=per_token(advantages), old_logp=per_token(old_logp),
        ref_logp=per_token(ref_logp) if kl != token_epilogue.KL_NONE else None, is_weight=per_token(is_weight),
        gate=gate, lo=lo, hi=hi, delta=config.delta if config.gate == "clip" else None,
        tau_pos=config.sapo_temperature_pos, tau_neg=config.sapo_temperature_neg,
        beta=config.beta, kl=kl, kl_ratio=config.use_bias_correction_kl,
        is_bound=token_epilogue.IS_AS_GIVEN if is_weight_as_given else
        token_epilogue.IS_TRUNCATE if config.vllm_importance_sampling_mode.endswith("truncate")
        else token_epilogue.IS_MASK,
        is_lo=config.vllm_importance_sampling_clip_min or 0.0,
        is_hi=float("inf") if config.vllm_importance_sampling_cap is None else config.vllm_importance_sampling_cap,
    )
