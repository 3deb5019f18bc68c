"""The hidden path's tile engine: logits tiles of `hidden @ weight.T` from the matmul library, each swept by
the logits kernels (`softpo.kernels.logits`) and, for gradients, turned into its own gradient in place.

The projection runs on tiles of at most TILE_BYTES ([tokens, V] logits in the inputs' dtype, as a plain
`hidden @ weight.T` would round them), masked tokens dropped first; one tile buffer serves every tile.
d weight accumulates over tiles in fp32 for half-precision weights. With flat memory the backward takes
two passes on tiles of FLAT_TILE_BYTES (token-major d hidden, vocabulary-major d weight one block of rows
at a time), and no V x H fp32 accumulator is held.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .kernels import logits as logits_sweep
from .rows import chunks, put, take, valid_first, valid_rows
from .sweep import SWEEP_DTYPES, Sweep

# Bytes of the one vocabulary-sized buffer of the hidden path: a [tokens, V] logits tile in the inputs' dtype.
# A larger tile gives the d-weight matmul a longer reduction (tokens) per pass over its fp32 accumulator.
TILE_BYTES = 1 << 30
# Flat memory: the backward's two passes use tiles this size, and d weight is summed in fp32 one block of
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
    assert hidden.dtype in SWEEP_DTYPES and weight.dtype == hidden.dtype and weight.shape[0] >= 1
    assert weight.device == hidden.device == targets.device


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


def sequence_tiles(valid, seq_len: int, V: int, element_size: int, flat_memory: bool = False,
                   counts: list[int] | None = None):
    """Tiles of whole sequences for the gradient-in-forward route of sequence-level objectives: positions of
    the valid tokens of consecutive sequences (rows of [B, seq_len], or packed sequences back to back), as
    many as fit one tile (TILE_BYTES, or FLAT_TILE_BYTES with flat_memory). None when one sequence alone
    exceeds a tile; then the objective needs the two-pass route. counts: each sequence's number of valid
    tokens when the caller has read them (no host sync here), else read here from rows of seq_len (packed
    sequences need them given)."""
    N = valid.numel()
    if counts is None:
        rows = valid.nonzero().squeeze(-1)
        counts = torch.bincount(rows // seq_len, minlength=N // seq_len).tolist()
    else:
        rows = valid_first(valid)[0][: sum(counts)]
    if rows.numel() == 0:
        return None
    capacity = _tile_rows(N, V, element_size, FLAT_TILE_BYTES if flat_memory else None)
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
    return valid_rows(sweep.row_idx, sweep.n_valid, sweep.valid_count)


def _forward_tile(sweep: Sweep, z, idx, outputs):
    """The forward sweep of one tile; its per-token results land in `outputs` (logp, lse, entropy, term, coef)."""
    # The epilogue's per-token inputs are its tensor fields; the rest are settings shared by every token.
    terms = sweep.terms and dataclasses.replace(sweep.terms, **{
        field.name: take(value, idx) for field in dataclasses.fields(sweep.terms)
        if isinstance(value := getattr(sweep.terms, field.name), torch.Tensor)
    })
    parts = logits_sweep.logits_logprob_fwd(z, take(sweep.targets, idx), temperature=sweep.temperature,
                                            return_entropy=sweep.return_entropy, terms=terms)
    for full, part in zip(outputs, parts):
        if full is not None:
            put(full, idx, part)


def _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, temperature):
    """The logits tile of tokens `idx`, turned in place into d loss / d logits."""
    logits_sweep.logits_logprob_bwd(
        z, take(targets, idx), take(lse, idx), take(g_logp, idx), entropy=take(entropy, idx),
        g_entropy=take(g_entropy, idx), temperature=temperature, out=z,
    )


def _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, temperature, d_hidden, d_weight):
    """Turn the tile into d logits in place, then add its share of d hidden and d weight."""
    _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, temperature)
    if d_hidden is not None:
        put(d_hidden, idx, z @ weight)
    if d_weight is not None:
        _accumulate(d_weight, z.T, h)


def _per_row_buffer(shape, rows, **kwargs):
    # Every tile writes its tokens' rows: zeros are needed only for masked tokens' rows.
    return (torch.empty if rows is None else torch.zeros)(shape, **kwargs)


def _weight_accumulator(weight):
    """A zero d weight to sum tiles into: fp32 for half-precision weights."""
    return torch.zeros(weight.shape, dtype=torch.float32 if weight.element_size() < 4 else weight.dtype,
                       device=weight.device)


def _gradient_buffers(hidden, weight, need_hidden, need_weight, rows):
    d_hidden = _per_row_buffer(hidden.shape, rows, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    return d_hidden, _weight_accumulator(weight) if need_weight else None


def _hidden_backward_flat(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, temperature,
                          need_hidden, need_weight):
    """The backward in bounded memory, at the price of a second recompute (10NHV in all, not 8NHV).

    Token-major pass: each [tokens, V] tile becomes d logits in place and yields its tokens' rows of
    d hidden whole. Vocabulary-major pass: for each block of vocabulary rows, every token tile's
    [tokens, block] logits become d logits (the global lse and entropy make each block's gradient
    exact on its own) and sum into that block's fp32 d weight, written out in the weight's dtype.
    """
    d_hidden = _per_row_buffer(hidden.shape, rows, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
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
                acc = _weight_accumulator(rows_of_block)
                # Ids local to the block: a target elsewhere matches no column, as in a vocabulary shard.
                local = targets - v0
                for idx, h, z in _projected_tiles(hidden, rows_of_block, rows, FLAT_TILE_BYTES):
                    _tile_to_gradient_(z, idx, local, lse, g_logp, entropy, g_entropy, temperature)
                    _accumulate(acc, z.T, h)
                d_weight[v0:v0 + block] = acc
    return d_hidden, d_weight


def _sweep_outputs(N, device, sweep: Sweep, rows):
    """Per-token outputs (logp, lse, entropy, term, coef); the tiles write every valid token's."""
    f32 = dict(dtype=torch.float32, device=device)
    entropy = _per_row_buffer(N, rows, **f32) if sweep.return_entropy else None
    term, coef = (_per_row_buffer(N, rows, **f32), _per_row_buffer(N, rows, **f32)) if sweep.terms is not None \
        else (None, None)
    return _per_row_buffer(N, rows, **f32), _per_row_buffer(N, rows, **f32), entropy, term, coef


def hidden_forward(hidden, weight, sweep: Sweep):
    """(valid rows, (logp, lse, entropy, term, coef)) of the hidden path's forward sweep, tile by tile."""
    _check_hidden(hidden, weight, sweep.targets)
    rows = _valid_rows(sweep)
    outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep, rows)
    with _no_autocast(hidden):
        for idx, _, z in _projected_tiles(hidden, weight, rows):
            _forward_tile(sweep, z, idx, outputs)
    return rows, outputs


def hidden_backward(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, temperature, need_hidden,
                    need_weight, flat_memory=False):
    """(d hidden or None, d weight or None, fp32 for half-precision weights): each tile recomputed, turned
    into d logits in place, then the two gradient matmuls (flat_memory: `_hidden_backward_flat`)."""
    if flat_memory:
        return _hidden_backward_flat(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, temperature,
                                     need_hidden, need_weight)
    d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight, rows)
    with _no_autocast(hidden):
        for idx, h, z in _projected_tiles(hidden, weight, rows):
            _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, temperature,
                           d_hidden, d_weight)
    return d_hidden, d_weight


def gradient_in_forward(hidden, weight, sweep: Sweep, tiles, tile_gradients, need_hidden, need_weight):
    """The forward sweep with each tile turned into its gradient right after it is swept.

    tiles: lists of positions (whole sequences), or None for tiles of the valid tokens in order;
    tile_gradients(idx, outputs) -> (d loss / d logp, d loss / d entropy or None) of the tile's tokens, from the
    outputs so far. With flat_memory d weight is left to the backward. Returns (rows, outputs, d hidden,
    d weight, g_logp, g_entropy).
    """
    _check_hidden(hidden, weight, sweep.targets)
    # None: every token is valid and the tiles write every row; else masked rows start at zero.
    rows = _valid_rows(sweep) if tiles is None else torch.cat(tiles)
    outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep, rows)
    logp, lse, entropy, _, _ = outputs
    d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight and not sweep.flat_memory,
                                           rows)
    g_logp = torch.zeros_like(logp)
    g_entropy = None
    if tiles is None:
        tiled = _projected_tiles(hidden, weight, rows, FLAT_TILE_BYTES if sweep.flat_memory else None)
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
    return rows, outputs, d_hidden, d_weight, g_logp, g_entropy
