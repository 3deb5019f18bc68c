"""The plain log-prob sweeps as torch.library custom ops with shape-only ("fake") versions, so that
torch.compile keeps them out of the graph as opaque calls: the token loops, the data-dependent row selection
(and its host sync), the in-place tiles and the kernel launches never reach the tracer.

`chunked_logprob` is the chunked torch sweep (`softpo.chunked`): the single-process torch path always runs
through it, so every test of that path tests it. `triton_logprob` is the Triton sweep (`softpo.tiles`,
`softpo.kernels`), taken by compiled calls; eager calls keep the autograd Functions of `softpo.fused`.
Each forward op returns (logp [N], entropy [N] or [0], lse [2, N]: the log-sum-exp and its rounding error,
which the backward needs for log-probs as precise as log_softmax at large logit offsets) and has a backward op returning
(d logits, empty) or (d hidden or empty, d weight or empty) in the inputs' dtypes.
"""

from __future__ import annotations

import torch

from . import chunked
from .rows import valid_first, valid_rows
from .sweep import Sweep, accumulation_dtype, on_device


@torch.library.custom_op("softpo::chunked_logprob", mutates_args=())
def chunked_logprob(
    targets: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, temperature: float, return_entropy: bool, token_chunk: int, vocab_chunk: int,
    flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In the accumulation dtype."""
    args = chunked.ChunkedArgs(temperature=temperature, return_entropy=return_entropy, token_chunk=token_chunk,
                               vocab_chunk=vocab_chunk)
    valid_rows_ = valid.nonzero().squeeze(-1)
    x = logits if logits is not None else hidden
    acc = accumulation_dtype(x.dtype)
    if logits is not None:
        V, tiles_for = logits.shape[1], chunked._logits_tiles(logits, acc, 1.0 / temperature)
    else:
        V, tiles_for = weight.shape[0], chunked._hidden_tiles(hidden, weight, acc, 1.0 / temperature)
    logp, entropy, lse, _ = chunked._forward_sweep(valid_rows_, targets, V, x.shape[0], acc, args, tiles_for)
    return logp, lse.new_empty(0) if entropy is None else entropy, lse


@torch.library.custom_op("softpo::chunked_logprob_backward", mutates_args=())
def chunked_logprob_backward(
    targets: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor,
    g_entropy: torch.Tensor | None, need_hidden: bool, need_weight: bool, temperature: float, token_chunk: int,
    vocab_chunk: int, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = chunked.ChunkedArgs(temperature=temperature, return_entropy=g_entropy is not None,
                               token_chunk=token_chunk, vocab_chunk=vocab_chunk, flat_memory=flat_memory)
    valid_rows_ = valid.nonzero().squeeze(-1)
    entropy = entropy if g_entropy is not None else None
    if logits is not None:
        return chunked._logits_grad(logits, targets, valid_rows_, lse, entropy, g_logp, g_entropy, args), \
            lse.new_empty(0)
    d_hidden, d_weight = chunked._hidden_grads(hidden, weight, targets, valid_rows_, lse, entropy, g_logp, g_entropy,
                                               args, need_hidden, need_weight)
    return _gradients(hidden, weight, d_hidden, d_weight)


@torch.library.custom_op("softpo::triton_logprob", mutates_args=())
def triton_logprob(
    targets: torch.Tensor, valid: torch.Tensor | None, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, temperature: float, return_entropy: bool, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32."""
    row_idx, n_valid = valid_first(valid)
    with on_device(targets):
        return _triton_logprob(targets, row_idx, n_valid, hidden, weight, logits, temperature, return_entropy)


def _triton_logprob(targets, row_idx, n_valid, hidden, weight, logits, temperature, return_entropy):
    tiles, logits_sweep = _triton_sweep()
    if logits is not None:
        lse = torch.empty(2, logits.shape[0], dtype=torch.float32, device=logits.device)
        logp, lse[0], entropy, _, _ = logits_sweep.logits_logprob_fwd(
            logits, targets, temperature=temperature, row_idx=row_idx, n_valid=n_valid, return_entropy=return_entropy,
            lse_low=lse[1],
        )
    else:
        sweep = Sweep(targets=targets, row_idx=row_idx, n_valid=n_valid, temperature=temperature,
                      return_entropy=return_entropy)
        _, (logp, lse, entropy, _, _), sampler = tiles.hidden_forward(hidden, weight, sweep)
        lse = torch.stack([lse, sampler.lse_low])
    return logp, lse.new_empty(0) if entropy is None else entropy, lse


@torch.library.custom_op("softpo::triton_logprob_backward", mutates_args=())
def triton_logprob_backward(
    targets: torch.Tensor, valid: torch.Tensor | None, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor,
    g_entropy: torch.Tensor | None, need_hidden: bool, need_weight: bool, temperature: float, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    row_idx, n_valid = valid_first(valid)
    entropy = entropy if g_entropy is not None else None
    with on_device(targets):
        return _triton_logprob_backward(targets, row_idx, n_valid, hidden, weight, logits, lse, entropy, g_logp,
                                        g_entropy, need_hidden, need_weight, temperature, flat_memory)


def _triton_logprob_backward(targets, row_idx, n_valid, hidden, weight, logits, lse, entropy, g_logp, g_entropy,
                             need_hidden, need_weight, temperature, flat_memory):
    tiles, logits_sweep = _triton_sweep()
    if logits is not None:
        d_logits = logits_sweep.logits_logprob_bwd(logits, targets, lse[0], g_logp, entropy=entropy,
                                                   g_entropy=g_entropy, temperature=temperature, row_idx=row_idx,
                                                   n_valid=n_valid, lse_low=lse[1])
        return d_logits, lse.new_empty(0)
    sampler = tiles.TileSampler(temperature=temperature, lse_low=lse[1])
    d_hidden, d_weight = tiles.hidden_backward(hidden, weight, targets, valid_rows(row_idx, n_valid), lse[0],
                                               entropy, g_logp, g_entropy, sampler, need_hidden, need_weight,
                                               flat_memory)
    return _gradients(hidden, weight, d_hidden, d_weight)


def _triton_sweep():
    # Imported at the first Triton call: the chunked op above must work where the kernels fail to import.
    from . import tiles
    from .kernels import logits

    return tiles, logits


def _gradients(hidden, weight, d_hidden, d_weight):
    """A backward op's (d hidden or empty, d weight or empty), in the inputs' dtypes."""
    return (hidden.new_empty(0) if d_hidden is None else d_hidden.to(hidden.dtype),
            weight.new_empty(0) if d_weight is None else d_weight.to(weight.dtype))


def _fake_forward(targets, valid, hidden, weight, logits, temperature, return_entropy, *_):
    N = targets.shape[0]
    # The chunked op keeps float64 for float64 inputs; the Triton one is fp32 throughout.
    dtype = accumulation_dtype((logits if logits is not None else hidden).dtype)
    return (targets.new_empty(N, dtype=dtype), targets.new_empty(N if return_entropy else 0, dtype=dtype),
            targets.new_empty(2, N, dtype=dtype))


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
    targets, valid, hidden, weight, logits, temperature, _return_entropy, *settings = inputs
    _, entropy, lse = output
    ctx.save_for_backward(targets, valid, hidden, weight, logits, lse, entropy)
    ctx.settings = (temperature, *settings)


def _autograd(backward_op):
    """The backward of a forward op: the upstream gradients in the op's dtype, then `backward_op`."""

    def backward(ctx, g_logp, g_entropy, _g_lse):
        targets, valid, hidden, weight, logits, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_logits = ctx.needs_input_grad[2:5]
        grads = [None] * len(ctx.needs_input_grad)
        if not (need_hidden or need_weight or need_logits):
            return tuple(grads)
        g_logp = torch.zeros_like(lse[0]) if g_logp is None else g_logp.to(lse.dtype).contiguous()
        # An entropy that was not computed, or not used, sends no gradient.
        g_entropy = g_entropy.to(lse.dtype).contiguous() if entropy.numel() and g_entropy is not None else None
        first, second = backward_op(targets, valid, hidden, weight, logits, lse, entropy, g_logp, g_entropy,
                                    bool(need_hidden), bool(need_weight), *ctx.settings)
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
