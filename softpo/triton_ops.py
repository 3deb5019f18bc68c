"""Autograd over the Triton vocabulary sweeps in `softpo.kernels`.

Three entry points, called by `softpo.api` with validated, flattened inputs (they trust their caller):
`triton_token_logprobs` (per-token log-prob and entropy), `triton_fused_token_terms` (the same sweep
with a token-level objective's terms evaluated in the forward kernel's epilogue) and
`triton_fused_token_loss` (the hidden path with the loss's gradient formed during the forward sweep).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .kernels import logits as logits_sweep, terms as token_epilogue
from . import vocab_parallel
from .config import LossConfig
from .rows import chunks, put, take, valid_first, valid_rows


@dataclass(frozen=True)
class Sweep:
    """Everything a sweep needs besides the differentiable inputs.

    targets int64 [N]; row_idx / n_valid: the valid-first token order (None: all valid); terms:
    the epilogue's per-token inputs and settings (None: log-prob mode); shard: this rank's place in a
    vocab-parallel lm_head (targets are then ids local to the shard); flat_memory: the hidden path's
    backward in two passes (token-major d hidden, vocabulary-major d weight), no V x H fp32 accumulator.
    """

    targets: torch.Tensor
    row_idx: torch.Tensor | None
    n_valid: torch.Tensor | None
    temperature: float
    return_entropy: bool
    inplace_backward: bool = False
    terms: token_epilogue.TermsArgs | None = None
    shard: vocab_parallel.VocabShard | None = None
    flat_memory: bool = False


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


# memory="flat": the backward's two passes use tiles this size, and d weight is summed in fp32 one block of
# vocabulary rows (at most FLAT_BLOCK_BYTES of fp32) at a time instead of in a V x H fp32 accumulator.
FLAT_TILE_BYTES = 1 << 28
FLAT_BLOCK_BYTES = 1 << 26


def _tile_rows(n: int, V: int, element_size: int, tile_bytes: int | None = None) -> int:
    rows = (TILE_BYTES if tile_bytes is None else tile_bytes) // (V * element_size)
    if rows >= 256:
        rows -= rows % 256  # whole matmul tiles
    return max(1, min(n, rows))


@functools.cache
def _addmm_takes_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has addmm(..., out_dtype=) for these operands: a recent keyword (older
    releases reject it), and on CUDA only."""
    a = torch.zeros(1, 1, dtype=dtype, device=device)
    try:
        torch.addmm(torch.zeros(1, 1, device=device), a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True



def _accumulate(acc, a, b):
    """acc += a @ b with acc in fp32 for half-precision a, b, without rounding a @ b to their dtype first:
    per-chunk rounding of d weight to bf16 adds up over the chunks."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _addmm_takes_out_dtype(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        # Upcast operands: the same sum, at the cost of fp32 copies of this tile's a and b.
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _check_hidden(hidden, weight, targets):
    assert hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1] >= 1
    assert hidden.dtype in HIDDEN_DTYPES and weight.dtype == hidden.dtype and weight.shape[0] >= 1
    assert weight.device == hidden.device == targets.device


_PER_TOKEN_TERMS = ("advantages", "old_logp", "ref_logp", "is_weight")


def _projected_tiles(hidden, weight, rows, tile_bytes=None):
    """(idx, hidden rows, logits tile) for each tile of valid tokens; one tile buffer serves them all."""
    N, V = hidden.shape[0], weight.shape[0]
    n = N if rows is None else rows.numel()
    if n == 0:
        return
    step = _tile_rows(n, V, hidden.element_size(), tile_bytes)
    yield from _tiles_over(hidden, weight, chunks(n, step, rows), step)


def _tiles_over(hidden, weight, indices, max_rows):
    """(idx, hidden rows, logits tile) for each index in `indices` (at most `max_rows` rows each)."""
    tile = torch.empty(max_rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for idx in indices:
        h = take(hidden, idx)
        z = tile[: h.shape[0]]
        torch.mm(h, weight.T, out=z)
        yield idx, h, z


def sequence_tiles(valid, seq_len: int, V: int, element_size: int, flat_memory: bool = False):
    """Tiles of whole sequences for the gradient-in-forward route of sequence-level objectives: positions of
    the valid tokens of consecutive sequences (rows of [B, seq_len]), as many as fit one tile (TILE_BYTES,
    or FLAT_TILE_BYTES with flat_memory). None when one sequence alone exceeds a tile; then the objective
    needs the two-pass route."""
    N = valid.numel()
    rows = valid.nonzero().squeeze(-1)
    if rows.numel() == 0:
        return None
    capacity = _tile_rows(N, V, element_size, FLAT_TILE_BYTES if flat_memory else None)
    counts = torch.bincount(rows // seq_len, minlength=N // seq_len).tolist()
    if max(counts) > capacity:
        return None
    tiles, start, size = [], 0, 0
    for count in counts:
        if size + count > capacity:
            tiles.append(rows[start:start + size])
            start, size = start + size, 0
        size += count
    tiles.append(rows[start:start + size])
    return [t for t in tiles if t.numel()]


def _no_autocast(tensor):
    # The tile matmuls stay in the inputs' dtype: autocast would turn an fp32 d hidden into bf16.
    return torch.autocast(tensor.device.type, enabled=False)


def _valid_rows(sweep: Sweep):
    # The number of valid tokens fixes the tiles, and masked ones cost no matmul.
    return valid_rows(sweep.row_idx, sweep.n_valid)


def _forward_tile(sweep: Sweep, z, idx, outputs):
    """The forward sweep of one tile; its per-token results land in `outputs` (logp, lse, entropy, term, coef)."""
    terms = sweep.terms and dataclasses.replace(
        sweep.terms, **{name: take(getattr(sweep.terms, name), idx) for name in _PER_TOKEN_TERMS}
    )
    parts = logits_sweep.logits_logprob_fwd(z, take(sweep.targets, idx), temperature=sweep.temperature,
                                 return_entropy=sweep.return_entropy, terms=terms)
    for full, part in zip(outputs, parts):
        if full is not None:
            put(full, idx, part)


def _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, temperature, d_hidden, d_weight):
    """Turn the tile into d logits in place, then add its share of d hidden and d weight."""
    _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, temperature)
    if d_hidden is not None:
        put(d_hidden, idx, z @ weight)
    if d_weight is not None:
        _accumulate(d_weight, z.T, h)


def _gradient_buffers(hidden, weight, need_hidden, need_weight, rows):
    # Every tile writes its tokens' rows of d hidden: zeros are needed only for masked tokens' rows.
    # d weight sums over tiles, in fp32 for half-precision weights.
    alloc = torch.empty if rows is None else torch.zeros
    d_hidden = alloc(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    acc_dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
    d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    return d_hidden, d_weight


def _hidden_backward_flat(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, temperature,
                          need_hidden, need_weight):
    """The backward in bounded memory, at the price of a second recompute (10NHV in all, not 8NHV).

    Token-major pass: each [tokens, V] tile becomes d logits in place and yields its tokens' rows of
    d hidden whole. Vocabulary-major pass: for each block of vocabulary rows, every token tile's
    [tokens, block] logits become d logits (the global lse and entropy make each block's gradient
    exact on its own) and sum into that block's fp32 d weight, written out in the weight's dtype.
    """
    alloc = torch.empty if rows is None else torch.zeros
    d_hidden = alloc(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = weight.new_empty(weight.shape) if need_weight else None
    with _no_autocast(hidden):
        if need_hidden:
            for idx, _, z in _projected_tiles(hidden, weight, rows, FLAT_TILE_BYTES):
                _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, temperature)
                put(d_hidden, idx, z @ weight)
        if need_weight:
            V, H = weight.shape
            block = max(1, FLAT_BLOCK_BYTES // (4 * H))
            for v0 in range(0, V, block):
                rows_of_block = weight[v0:v0 + block]
                acc = torch.zeros(rows_of_block.shape, dtype=torch.float32 if weight.element_size() < 4 else
                                  weight.dtype, device=weight.device)
                # Ids local to the block: a target elsewhere matches no column, as in a vocabulary shard.
                local = targets - v0
                for idx, h, z in _projected_tiles(hidden, rows_of_block, rows, FLAT_TILE_BYTES):
                    _tile_to_gradient_(z, idx, local, lse, g_logp, entropy, g_entropy, temperature)
                    _accumulate(acc, z.T, h)
                d_weight[v0:v0 + block] = acc
    return d_hidden, d_weight


def _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, temperature):
    """The logits tile of tokens `idx`, turned in place into d loss / d logits."""
    logits_sweep.logits_logprob_bwd(
        z, take(targets, idx), take(lse, idx), take(g_logp, idx), entropy=take(entropy, idx),
        g_entropy=take(g_entropy, idx), temperature=temperature, out=z,
    )


def _sweep_outputs(N, device, sweep: Sweep, rows):
    """Per-token outputs; the tiles write every valid token's, so only masked tokens need zeros."""
    alloc = torch.empty if rows is None else torch.zeros
    f32 = dict(dtype=torch.float32, device=device)
    entropy = alloc(N, **f32) if sweep.return_entropy else None
    term, coef = (alloc(N, **f32), alloc(N, **f32)) if sweep.terms is not None else (None, None)
    return alloc(N, **f32), alloc(N, **f32), entropy, term, coef


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
        rows, (logp, lse, entropy, term, coef) = _hidden_forward(hidden, weight, sweep)
        if sweep.shard is not None:
            logp, lse, entropy = vocab_parallel.combine(sweep.shard, logp, lse, entropy, sweep.targets, rows)
        ctx.save_for_backward(hidden, weight, sweep.targets, rows, lse, entropy, coef)
        ctx.temperature = sweep.temperature
        ctx.shard = sweep.shard
        ctx.flat_memory = sweep.flat_memory
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
        backward = _hidden_backward_flat if ctx.flat_memory else _hidden_backward
        d_hidden, d_weight = backward(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy,
                                      ctx.temperature, need_hidden, need_weight)
        if d_hidden is not None and ctx.shard is not None:
            vocab_parallel.reduce_hidden_grad(ctx.shard, d_hidden)
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None


def _hidden_forward(hidden, weight, sweep: Sweep):
    """(valid rows, (logp, lse, entropy, term, coef)) of the hidden path's forward sweep, tile by tile."""
    _check_hidden(hidden, weight, sweep.targets)
    rows = _valid_rows(sweep)
    outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep, rows)
    with _no_autocast(hidden):
        for idx, _, z in _projected_tiles(hidden, weight, rows):
            _forward_tile(sweep, z, idx, outputs)
    return rows, outputs


def _hidden_backward(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, temperature, need_hidden,
                     need_weight):
    """(d hidden or None, d weight or None, fp32 for half-precision weights): each tile recomputed, turned
    into d logits in place, then the two gradient matmuls."""
    d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight, rows)
    with _no_autocast(hidden):
        for idx, h, z in _projected_tiles(hidden, weight, rows):
            _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, temperature,
                           d_hidden, d_weight)
    return d_hidden, d_weight


class HiddenGradientInForwardFunction(torch.autograd.Function):
    """An objective's loss from hidden [N, H] and weight [V, H], its gradients made during the forward sweep.

    `tile_gradients(idx, outputs)` gives d loss / d logp and d loss / d entropy (or None) of a tile's tokens
    from the sweep's outputs so far (logp, lse, entropy, term, coef): a token-level objective's are known
    before the sweep (the loss is linear in its terms and the entropy); a sequence-level one's are known
    once the tile's whole sequences have their log-probs, so its tiles hold whole sequences (`tiles`). Each
    tile then becomes its own gradient right after its forward sweep: three matmuls of 2NHV, no logits
    recomputed. With `sweep.flat_memory` only d hidden is formed so (on tiles of FLAT_TILE_BYTES), and d
    weight waits for the backward's vocabulary-major pass (`_hidden_backward_flat`): 8NHV and no V x H fp32
    accumulator. Returns (surrogate, entropy, logp, term): the surrogate, zero-valued, carries the gradients
    (scaled by its incoming gradient); the others are detached.
    """

    @staticmethod
    def forward(ctx, hidden, weight, sweep: Sweep, tiles, tile_gradients):
        _check_hidden(hidden, weight, sweep.targets)
        # None: every token is valid and the tiles write every row; else masked rows start at zero.
        rows = _valid_rows(sweep) if tiles is None else torch.cat(tiles)
        outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep, rows)
        logp, lse, entropy, term, _ = outputs
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        flat = sweep.flat_memory
        d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight and not flat, rows)
        g_logp = torch.zeros_like(logp)
        g_entropy = None
        if tiles is None:
            tiled = _projected_tiles(hidden, weight, rows, FLAT_TILE_BYTES if flat else None)
        else:
            tiled = _tiles_over(hidden, weight, tiles, max(t.numel() for t in tiles))
        with _no_autocast(hidden):
            for idx, h, z in tiled:
                _forward_tile(sweep, z, idx, outputs)
                g_logp_tile, g_entropy_tile = tile_gradients(idx, outputs)
                put(g_logp, idx, g_logp_tile)
                if g_entropy_tile is not None:
                    g_entropy = torch.zeros_like(logp) if g_entropy is None else g_entropy
                    put(g_entropy, idx, g_entropy_tile)
                _backward_tile(z, h, idx, weight, sweep.targets, lse, g_logp, entropy, g_entropy,
                               sweep.temperature, d_hidden, d_weight)
        ctx.weight_in_backward = flat and need_weight
        if ctx.weight_in_backward:
            ctx.temperature = sweep.temperature
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
        scale = lambda d: None if d is None else d * g_surrogate.to(d.dtype)  # noqa: E731
        if not ctx.weight_in_backward:
            d_hidden, d_weight = ctx.saved_tensors
            return scale(d_hidden), scale(d_weight), None, None, None
        d_hidden, hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy = ctx.saved_tensors
        # The per-token gradients take the scale, so the vocabulary-major pass writes d weight final.
        _, d_weight = _hidden_backward_flat(hidden, weight, targets, rows, lse, entropy, scale(g_logp),
                                            scale(g_entropy), ctx.temperature, False, True)
        return scale(d_hidden), d_weight, None, None, None


class LogitsLogprobFunction(torch.autograd.Function):
    """(out, entropy, logp) from logits [N, V]; out is logp, or the terms when fused."""

    @staticmethod
    def forward(ctx, logits, sweep: Sweep):
        ctx.set_materialize_grads(False)
        logp, lse, entropy, term, coef = logits_sweep.logits_logprob_fwd(
            logits, sweep.targets, temperature=sweep.temperature, row_idx=sweep.row_idx, n_valid=sweep.n_valid,
            return_entropy=sweep.return_entropy, terms=sweep.terms,
        )
        if sweep.shard is not None:
            logp, lse, entropy = vocab_parallel.combine(
                sweep.shard, logp, lse, entropy, sweep.targets, _valid_rows(sweep)
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
        d_logits = logits_sweep.logits_logprob_bwd(
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


class LogitsGradientInForwardFunction(torch.autograd.Function):
    """A token-level objective's loss from logits [N, V], with d logits written by the forward kernel
    (`kernels.logits_loss_fwd`): the loss is linear in the terms and the entropy, whose weights (w_term,
    w_entropy: fp32 [N]) are known before the sweep. Returns (surrogate, entropy, logp, term) as
    `HiddenGradientInForwardFunction` does; the backward scales the stored d logits by the incoming gradient
    in place (no pass at all when it is 1, the usual `loss.backward()`), so it runs once per forward.
    """

    @staticmethod
    def forward(ctx, logits, sweep: Sweep, w_term, w_entropy):
        logp, _, entropy, term, _, d_logits = logits_sweep.logits_loss_fwd(
            logits, sweep.targets, sweep.terms, w_term, w_entropy, temperature=sweep.temperature,
            row_idx=sweep.row_idx, n_valid=sweep.n_valid, return_entropy=sweep.return_entropy or w_entropy is not None,
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
        if ctx.spent:
            raise RuntimeError(
                "the logits' gradient formed in the forward was scaled in place by the first backward; a second "
                "backward through the same policy_loss call (retain_graph=True) is not supported on this route: "
                "call policy_loss again, or pass logits that do not require grad for one of the two"
            )
        ctx.spent = True
        (d_logits,) = ctx.saved_tensors
        return logits_sweep.scale_(d_logits, g_surrogate.detach().float()), None, None, None


# The plain sweep as two custom ops with shape-only versions, for torch.compile: the tile loop, its
# host sync (the number of valid tokens) and the kernel launches stay out of the graph as opaque
# calls. Eager calls keep the autograd Functions above; a compiled policy_loss takes this route.
@torch.library.custom_op("softpo::triton_logprob", mutates_args=())
def _logprob_op(
    targets: torch.Tensor, valid: torch.Tensor | None, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, temperature: float, return_entropy: bool, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N] or [0], lse [N]), fp32."""
    row_idx, n_valid = valid_first(valid)
    sweep = Sweep(targets, row_idx, n_valid, temperature, return_entropy)
    with _on_device(targets.device):
        if logits is not None:
            logp, lse, entropy, _, _ = logits_sweep.logits_logprob_fwd(
                logits, targets, temperature=temperature, row_idx=row_idx, n_valid=n_valid,
                return_entropy=return_entropy,
            )
        else:
            _, (logp, lse, entropy, _, _) = _hidden_forward(hidden, weight, sweep)
    return logp, lse.new_empty(0) if entropy is None else entropy, lse


@_logprob_op.register_fake
def _(targets, valid, hidden, weight, logits, temperature, return_entropy, flat_memory):
    N = targets.shape[0]
    f32 = dict(dtype=torch.float32)
    entropy = targets.new_empty(N if return_entropy else 0, **f32)
    return targets.new_empty(N, **f32), entropy, targets.new_empty(N, **f32)


@torch.library.custom_op("softpo::triton_logprob_backward", mutates_args=())
def _logprob_backward_op(
    targets: torch.Tensor, valid: torch.Tensor | None, hidden: torch.Tensor | None, weight: torch.Tensor | None,
    logits: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor,
    g_entropy: torch.Tensor | None, temperature: float, need_hidden: bool, need_weight: bool, flat_memory: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d logits, empty) or (d hidden or empty, d weight or empty), in the inputs' dtypes."""
    row_idx, n_valid = valid_first(valid)
    entropy = entropy if g_entropy is not None else None
    with _on_device(targets.device):
        if logits is not None:
            d_logits = logits_sweep.logits_logprob_bwd(logits, targets, lse, g_logp, entropy=entropy, g_entropy=g_entropy,
                                            temperature=temperature, row_idx=row_idx, n_valid=n_valid)
            return d_logits, lse.new_empty(0)
        rows = valid_rows(row_idx, n_valid)
        backward = _hidden_backward_flat if flat_memory else _hidden_backward
        d_hidden, d_weight = backward(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, temperature,
                                      need_hidden, need_weight)
    return (hidden.new_empty(0) if d_hidden is None else d_hidden,
            weight.new_empty(0) if d_weight is None else d_weight.to(weight.dtype))


@_logprob_backward_op.register_fake
def _(targets, valid, hidden, weight, logits, lse, entropy, g_logp, g_entropy, temperature, need_hidden,
      need_weight, flat_memory):
    if logits is not None:
        return logits.new_empty(logits.shape), lse.new_empty(0)
    # The op allocates contiguous gradients; so must its shape-only twin.
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0))


def _setup_logprob(ctx, inputs, output):
    targets, valid, hidden, weight, logits, temperature, _, flat_memory = inputs
    _, entropy, lse = output
    ctx.save_for_backward(targets, valid, hidden, weight, logits, lse, entropy)
    ctx.temperature, ctx.flat_memory = temperature, flat_memory


def _logprob_backward(ctx, g_logp, g_entropy, _g_lse):
    targets, valid, hidden, weight, logits, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_logits = ctx.needs_input_grad[2:5]
    if not (need_hidden or need_weight or need_logits):
        return (None,) * 8
    g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
    # An entropy that was not computed, or not used, sends no gradient.
    g_entropy = g_entropy.float().contiguous() if entropy.numel() and g_entropy is not None else None
    first, second = _logprob_backward_op(targets, valid, hidden, weight, logits, lse, entropy, g_logp, g_entropy,
                                         ctx.temperature, bool(need_hidden), bool(need_weight), ctx.flat_memory)
    if logits is not None:
        return None, None, None, None, first, None, None, None
    return None, None, first if need_hidden else None, second if need_weight else None, None, None, None, None


_logprob_op.register_autograd(_logprob_backward, setup_context=_setup_logprob)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, which need not hold the tensors (a model split over
    GPUs in one process). The backward needs no guard: autograd runs it on its gradients' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _apply(targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward, terms,
           gradients=None, shard=None, flat_memory=False):
    """The autograd Function that fits the inputs, applied on the tensors' device."""
    assert (logits is None) != (hidden is None or weight is None), "logits, or hidden and weight"
    assert gradients is None or hidden is not None
    assert not inplace_backward or logits is not None, "inplace_backward is the logits path's"
    assert valid is None or (valid.dtype == torch.bool and valid.shape == targets.shape)
    row_idx, n_valid = valid_first(valid)
    sweep = Sweep(
        targets.contiguous(), row_idx, n_valid, float(temperature), bool(return_entropy), bool(inplace_backward), terms,
        shard, bool(flat_memory),
    )
    if gradients is not None:
        with _on_device(targets.device):
            return HiddenGradientInForwardFunction.apply(hidden, weight, sweep, *gradients)
    if logits is not None:
        with _on_device(targets.device):
            return LogitsLogprobFunction.apply(logits, sweep)
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
    shard: vocab_parallel.VocabShard | None = None,
    flat_memory: bool = False,
):
    """Per-token log-prob of targets under softmax(z / temperature), z = hidden @ weight.T or logits.

    targets int64 [N] (in [0, V) where valid); hidden [N, H] with weight [V, H], or logits [N, V];
    valid bool [N] or None (all valid). Returns (logp fp32 [N], entropy fp32 [N] or None), both
    differentiable; masked tokens give 0 and no gradient. inplace_backward=True (logits only) writes
    d logits over the logits' storage during backward. With `shard`, weight / logits hold this rank's
    vocabulary rows, targets are ids local to them, and the results are the whole vocabulary's.
    """
    if torch.compiler.is_compiling() and shard is None and not inplace_backward:
        logp, entropy, _ = _logprob_op(targets.contiguous(), valid, hidden, weight, logits, float(temperature),
                                       bool(return_entropy), bool(flat_memory))
        return logp, entropy if return_entropy else None
    logp, entropy, _ = _apply(
        targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward, None, shard=shard,
        flat_memory=flat_memory,
    )
    return logp, entropy


def terms_args(config: LossConfig, advantages, old_logp=None, ref_logp=None, is_weight=None,
               is_weight_as_given=False) -> token_epilogue.TermsArgs:
    """The kernel epilogue's arguments for a token-level policy objective.

    is_weight: the raw sampler ratio, which the epilogue bounds as the config says (its torch twin is
    objectives.bound_rollout_weights), or with is_weight_as_given a weight the caller already bounded.
    """
    assert config.per_token_terms, config.name
    assert config.beta == 0 or ref_logp is not None, "beta > 0 needs ref_logp"
    per_token = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    gate = {"clip": token_epilogue.GATE_CLIP, "soft": token_epilogue.GATE_SOFT, "cispo": token_epilogue.GATE_TRUNCATED}[config.gate]
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


def triton_fused_token_loss(
    config: LossConfig,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    w_term: torch.Tensor,
    w_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    is_weight_as_given: bool = False,
    flat_memory: bool = False,
):
    """The token-level objective's sweep with its gradients formed in the forward: on the hidden path tile
    by tile, on the logits path row by row in the forward kernel (`LogitsGradientInForwardFunction`).

    w_term, w_entropy: d loss / d term and d loss / d entropy, fp32 [N] (objectives.loss_weights);
    the entropy is computed when w_entropy is given or return_entropy is set. The other arguments are
    those of `triton_fused_token_terms`. Returns (surrogate, terms, logp, entropy or None): a
    differentiable scalar whose gradient is the loss's gradient with respect to hidden and weight, and
    the per-token values (detached) from which the caller computes the loss's value and metrics.
    """
    for w in (w_term, w_entropy):
        assert w is None or (w.shape == targets.shape and w.dtype == torch.float32 and w.device == targets.device)
    terms = terms_args(config, advantages, old_logp, ref_logp, is_weight, is_weight_as_given)
    w_term = w_term.contiguous()
    if logits is not None:
        row_idx, n_valid = valid_first(valid)
        sweep = Sweep(targets.contiguous(), row_idx, n_valid, float(temperature), bool(return_entropy), terms=terms)
        with _on_device(targets.device):
            surrogate, entropy, logp, term = LogitsGradientInForwardFunction.apply(
                logits, sweep, w_term, None if w_entropy is None else w_entropy.contiguous())
        return surrogate, term, logp, entropy

    def tile_gradients(idx, outputs):
        # The term's gradient is its weight times d term / d logp, which the epilogue just wrote (coef).
        return take(w_term, idx) * take(outputs[4], idx), take(w_entropy, idx)

    surrogate, entropy, logp, term = _apply(
        targets, hidden, weight, None, temperature, return_entropy or w_entropy is not None, valid, False, terms,
        gradients=(None, tile_gradients), flat_memory=flat_memory,
    )
    return surrogate, term, logp, entropy


def triton_sequence_loss(
    targets: torch.Tensor,
    tiles: list,
    tile_gradients,
    *,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    flat_memory: bool = False,
):
    """A sequence-level objective on the hidden path with its gradients formed in the forward.

    tiles: `sequence_tiles` of the batch (valid tokens of whole sequences); tile_gradients(idx, logp [N],
    entropy [N] or None) -> (d loss / d logp, d loss / d entropy or None) of the tokens `idx`, from the
    objective on the log-probs known so far (every sequence of the tile is complete). Returns
    (surrogate, logp, entropy or None) as `triton_fused_token_loss` does.
    """

    def from_outputs(idx, outputs):
        return tile_gradients(idx, outputs[0], outputs[2])

    surrogate, entropy, logp, _ = _apply(
        targets, hidden, weight, None, temperature, return_entropy, None, False, None,
        gradients=(tiles, from_outputs), flat_memory=flat_memory,
    )
    return surrogate, logp, entropy


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
    is_weight_as_given: bool = False,
    inplace_backward: bool = False,
    flat_memory: bool = False,
):
    """One sweep yielding the per-token terms of a token-level objective (softpo.objectives.token_terms).

    advantages, old_logp, ref_logp, is_weight: fp32 [N] (None: on-policy ratio 1 / no KL / weight 1);
    is_weight_as_given: see `terms_args`.
    Returns (terms fp32 [N] differentiable, logp fp32 [N] detached, entropy fp32 [N] differentiable or
    None). The backward is the log-prob sweep with grad_logp = grad_terms * d term / d logp.
    """
    terms = terms_args(config, advantages, old_logp, ref_logp, is_weight, is_weight_as_given)
    term, entropy, logp = _apply(
        targets, hidden, weight, logits, temperature, return_entropy, valid, inplace_backward, terms,
        flat_memory=flat_memory,
    )
    return term, logp, entropy
