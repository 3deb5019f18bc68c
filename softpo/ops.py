"""The plain log-prob sweeps as torch.library custom ops with shape-only ("fake") versions, so that
torch.compile keeps them out of the graph as opaque calls: the token loops, the data-dependent row selection
(and its host sync), the in-place tiles and the kernel launches never reach the tracer.

`chunked_logprob` is the chunked torch sweep (`softpo.chunked`): the single-process torch path always runs
through it, so every test of that path tests it. `triton_logprob` is the Triton sweep (`softpo.tiles`,
`softpo.kernels`), taken by compiled calls; eager calls keep the autograd Functions of `softpo.fused`.
Each forward op takes the sampler's distribution as plain arguments (a float temperature, or one per token in
`temperature_rows`; logit_scale, softcap, top_k, top_p, min_p, batch_invariant: `softpo.sampling`), returns
(logp [N], entropy [N] or [0], stats [3, N]: the log-sum-exp, its rounding error, which the backward needs for
log-probs as precise as log_softmax at large logit offsets, and the rows' truncation thresholds, -inf when none)
and has a backward op returning (d logits, empty) or (d hidden or empty, d weight or empty) in the inputs' dtypes.
"""

from __future__ import annotations

import torch

from . import chunked
from .rows import valid_first, valid_rows
from .sampling import SamplerTransform
from .sweep import Sweep, accumulation_dtype, invariant_rows, on_device


def sampler_args(temperature, transform: SamplerTransform, batch_invariant: bool) -> tuple:
    """The ops' sampler arguments, in their order, from a sweep's settings (temperature a float or fp32 [N])."""
    rows = temperature if isinstance(temperature, torch.Tensor) else None
    return (1.0 if rows is not None else float(temperature), rows, transform.logit_scale, transform.softcap,
            transform.top_k, transform.top_p, transform.min_p, bool(batch_invariant))


def _settings(temperature, temperature_rows, logit_scale, softcap, top_k, top_p, min_p, batch_invariant) -> dict:
    """The sampler arguments of an op as `softpo.sweep.SweepArgs` fields."""
    transform = SamplerTransform(logit_scale=logit_scale, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p)
    return dict(temperature=temperature if temperature_rows is None else temperature_rows, transform=transform,
                batch_invariant=batch_invariant)


def _stats(lse, lse_low, threshold):
    """[3, N]: lse, its rounding error and the thresholds (-inf: nothing truncated)."""
    return torch.stack([lse, lse_low, torch.full_like(lse, float("-inf")) if threshold is None else
                        threshold.to(lse.dtype)])


def _threshold(stats, transform: SamplerTransform, V: int):
    return stats[2] if transform.truncates(V) else None


@torch.library.custom_op("softpo::chunked_logprob", mutates_args=())
def chunked_logprob(
    targets: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, temperature: float, temperature_rows: torch.Tensor | None, logit_scale: float,
    softcap: float | None, top_k: int | None, top_p: float | None, min_p: float | None, batch_invariant: bool,
    return_entropy: bool, token_chunk: int, vocab_chunk: int, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In the accumulation dtype."""
    args = chunked._row_chunk(chunked.ChunkedArgs(
        return_entropy=return_entropy, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
        **_settings(temperature, temperature_rows, logit_scale, softcap, top_k, top_p, min_p, batch_invariant)))
    valid_rows_ = valid.nonzero().squeeze(-1)
    x = logits if logits is not None else hidden
    acc = accumulation_dtype(x.dtype)
    if logits is not None:
        V, tiles_for = logits.shape[1], chunked._logits_tiles(logits, acc, args)
    else:
        V, tiles_for = weight.shape[0], chunked._hidden_tiles(hidden, weight, acc, args)
    logp, entropy, stats, threshold = chunked._forward_sweep(valid_rows_, targets, V, x.shape[0], acc, args,
                                                             tiles_for)
    return logp, stats.new_empty(0) if entropy is None else entropy, _stats(stats[0], stats[1], threshold)


@torch.library.custom_op("softpo::chunked_logprob_backward", mutates_args=())
def chunked_logprob_backward(
    targets: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, stats: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor,
    g_entropy: torch.Tensor | None, need_hidden: bool, need_weight: bool, temperature: float,
    temperature_rows: torch.Tensor | None, logit_scale: float, softcap: float | None, top_k: int | None,
    top_p: float | None, min_p: float | None, batch_invariant: bool, token_chunk: int, vocab_chunk: int,
    flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = chunked._row_chunk(chunked.ChunkedArgs(
        return_entropy=g_entropy is not None, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
        flat_memory=flat_memory,
        **_settings(temperature, temperature_rows, logit_scale, softcap, top_k, top_p, min_p, batch_invariant)))
    valid_rows_ = valid.nonzero().squeeze(-1)
    entropy = entropy if g_entropy is not None else None
    V = logits.shape[1] if logits is not None else weight.shape[0]
    threshold = _threshold(stats, args.transform, V)
    if logits is not None:
        return chunked._logits_grad(logits, targets, valid_rows_, stats[:2], entropy, g_logp, g_entropy, args,
                                    threshold), stats.new_empty(0)
    d_hidden, d_weight = chunked._hidden_grads(hidden, weight, targets, valid_rows_, stats[:2], entropy, g_logp,
                                               g_entropy, args, need_hidden, need_weight, threshold)
    return _gradients(hidden, weight, d_hidden, d_weight)


@torch.library.custom_op("softpo::triton_logprob", mutates_args=())
def triton_logprob(
    targets: torch.Tensor, valid: torch.Tensor | None, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, temperature: float, temperature_rows: torch.Tensor | None, logit_scale: float,
    softcap: float | None, top_k: int | None, top_p: float | None, min_p: float | None, batch_invariant: bool,
    return_entropy: bool, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32."""
    row_idx, n_valid = valid_first(valid)
    sweep = Sweep(targets=targets, row_idx=row_idx, n_valid=n_valid, return_entropy=return_entropy,
                  **_settings(temperature, temperature_rows, logit_scale, softcap, top_k, top_p, min_p,
                              batch_invariant))
    with on_device(targets):
        return _triton_logprob(sweep, hidden, weight, logits)


def _triton_logprob(sweep: Sweep, hidden, weight, logits):
    tiles, logits_sweep, fused = _triton_sweep()
    if logits is not None:
        sampler = fused._logits_sampler(logits, sweep)
        logp, lse, entropy, _, _ = logits_sweep.logits_logprob_fwd(
            logits, sweep.targets, row_idx=sweep.row_idx, n_valid=sweep.n_valid,
            return_entropy=sweep.return_entropy, **sampler.kernel_kwargs(slice(None)),
        )
    else:
        _, (logp, lse, entropy, _, _), sampler = tiles.hidden_forward(hidden, weight, sweep)
    return logp, lse.new_empty(0) if entropy is None else entropy, _stats(lse, sampler.lse_low, sampler.threshold)


@torch.library.custom_op("softpo::triton_logprob_backward", mutates_args=())
def triton_logprob_backward(
    targets: torch.Tensor, valid: torch.Tensor | None, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, stats: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor,
    g_entropy: torch.Tensor | None, need_hidden: bool, need_weight: bool, temperature: float,
    temperature_rows: torch.Tensor | None, logit_scale: float, softcap: float | None, top_k: int | None,
    top_p: float | None, min_p: float | None, batch_invariant: bool, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    row_idx, n_valid = valid_first(valid)
    entropy = entropy if g_entropy is not None else None
    settings = _settings(temperature, temperature_rows, logit_scale, softcap, top_k, top_p, min_p, batch_invariant)
    with on_device(targets):
        return _triton_logprob_backward(targets, row_idx, n_valid, hidden, weight, logits, stats, entropy, g_logp,
                                        g_entropy, need_hidden, need_weight, settings, flat_memory)


def _triton_logprob_backward(targets, row_idx, n_valid, hidden, weight, logits, stats, entropy, g_logp, g_entropy,
                             need_hidden, need_weight, settings, flat_memory):
    tiles, logits_sweep, _ = _triton_sweep()
    transform = settings["transform"]
    V = logits.shape[1] if logits is not None else weight.shape[0]
    sampler = tiles.TileSampler(
        temperature=settings["temperature"], transform=transform, threshold=_threshold(stats, transform, V),
        lse_low=stats[1], block=invariant_rows(targets.device) if settings["batch_invariant"] else None)
    if logits is not None:
        d_logits = logits_sweep.logits_logprob_bwd(logits, targets, stats[0], g_logp, entropy=entropy,
                                                   g_entropy=g_entropy, row_idx=row_idx, n_valid=n_valid,
                                                   **sampler.kernel_kwargs(slice(None)))
        return d_logits, stats.new_empty(0)
    d_hidden, d_weight = tiles.hidden_backward(hidden, weight, targets, valid_rows(row_idx, n_valid), stats[0],
                                               entropy, g_logp, g_entropy, sampler, need_hidden, need_weight,
                                               flat_memory)
    return _gradients(hidden, weight, d_hidden, d_weight)


def _triton_sweep():
    # Imported at the first Triton call: the chunked op above must work where the kernels fail to import.
    from . import fused, tiles
    from .kernels import logits

    return tiles, logits, fused


def _gradients(hidden, weight, d_hidden, d_weight):
    """A backward op's (d hidden or empty, d weight or empty), in the inputs' dtypes."""
    return (hidden.new_empty(0) if d_hidden is None else d_hidden.to(hidden.dtype),
            weight.new_empty(0) if d_weight is None else d_weight.to(weight.dtype))


# Positions of the ops' arguments: the sampler's eight after the inputs, then return_entropy.
_SAMPLER = slice(5, 13)
_RETURN_ENTROPY = 13


def _fake_forward(*args):
    targets, hidden, logits = args[0], args[2], args[4]
    N = targets.shape[0]
    # The chunked op keeps float64 for float64 inputs; the Triton one is fp32 throughout.
    dtype = accumulation_dtype((logits if logits is not None else hidden).dtype)
    return (targets.new_empty(N, dtype=dtype), targets.new_empty(N if args[_RETURN_ENTROPY] else 0, dtype=dtype),
            targets.new_empty(3, N, dtype=dtype))


def _fake_backward(d_logits_like):
    """The shape-only backward; `d_logits_like(logits)` allocates d logits as the op does."""

    def fake(targets, valid, hidden, weight, logits, lse, entropy, g_logp, g_entropy, need_hidden, need_weight, *_):
        if logits is not None:
            return d_logits_like(logits), lse.new_empty(0)
        # The ops allocate contiguous gradients; so must their shape-only twins.
        return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
                weight.new_empty(weight.shape) if need_weight else weight.new_empty(0))

    return fake


def _save_for_backward(ctx, inputs, output):
    targets, valid, hidden, weight, logits = inputs[:5]
    temperature, temperature_rows, *sampler = inputs[_SAMPLER]
    logp, entropy, stats = output
    ctx.save_for_backward(targets, valid, hidden, weight, logits, stats, entropy, logp, temperature_rows)
    ctx.temperature, ctx.sampler, ctx.settings = temperature, sampler, inputs[_RETURN_ENTROPY + 1:]
    ctx.truncates = any(x is not None for x in sampler[3:6])


def _autograd(backward_op):
    """The backward of a forward op: the upstream gradients in the op's dtype, then `backward_op`."""

    def backward(ctx, g_logp, g_entropy, _g_stats):
        targets, valid, hidden, weight, logits, stats, entropy, logp, temperature_rows = ctx.saved_tensors
        need_hidden, need_weight, need_logits = ctx.needs_input_grad[2:5]
        grads = [None] * len(ctx.needs_input_grad)
        if not (need_hidden or need_weight or need_logits):
            return tuple(grads)
        g_logp = torch.zeros_like(stats[0]) if g_logp is None else g_logp.to(stats.dtype).contiguous()
        if ctx.truncates:
            # A target outside the kept set has log-prob -inf whatever the logits: no gradient flows from it.
            g_logp = torch.where(logp == float("-inf"), torch.zeros_like(g_logp), g_logp)
        # An entropy that was not computed, or not used, sends no gradient.
        g_entropy = g_entropy.to(stats.dtype).contiguous() if entropy.numel() and g_entropy is not None else None
        first, second = backward_op(targets, valid, hidden, weight, logits, stats, entropy, g_logp, g_entropy,
                                    bool(need_hidden), bool(need_weight), ctx.temperature, temperature_rows,
                                    *ctx.sampler, *ctx.settings)
        if logits is not None:
            grads[4] = first
        else:
            grads[2], grads[3] = first if need_hidden else None, second if need_weight else None
        return tuple(grads)

    return backward


# The chunked op's d logits take the logits' strides (zeros_like); the Triton launcher's are contiguous.
for _forward, _backward, _d_logits_like in ((chunked_logprob, chunked_logprob_backward, torch.empty_like),
                                            (triton_logprob, triton_logprob_backward, lambda x: x.new_empty(x.shape))):
    _forward.register_fake(_fake_forward)
    _backward.register_fake(_fake_backward(_d_logits_like))
    _forward.register_autograd(_autograd(_backward), setup_context=_save_for_backward)
