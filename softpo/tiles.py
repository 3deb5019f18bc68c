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

from . import sampling
from .kernels import logits as logits_sweep
from .rows import chunks, put, take, valid_first, valid_rows
from .sweep import SWEEP_DTYPES, Sweep, invariant_rows

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


@dataclasses.dataclass(frozen=True)
class TileSampler:
    """The sampler's distribution as the tiles hand it to the kernels, and what the backward needs of the
    forward: temperature (a float or fp32 [N]), transform, thresholds (fp32 [N] or None), lse's rounding
    error (fp32 [N] or None) and, under batch_invariant, the fixed number of rows per matmul (`block`)."""

    temperature: float | torch.Tensor = 1.0
    transform: sampling.SamplerTransform = sampling.SamplerTransform()
    threshold: torch.Tensor | None = None
    lse_low: torch.Tensor | None = None
    block: int | None = None

    def kernel_kwargs(self, idx, lse_low=True) -> dict:
        """The logits launchers' transform keywords for the tokens `idx` of a tile."""
        temperature = take(self.temperature, idx) if isinstance(self.temperature, torch.Tensor) else self.temperature
        kwargs = dict(temperature=temperature, threshold=take(self.threshold, idx), **self.transform.kernel_kwargs())
        if lse_low:
            kwargs["lse_low"] = take(self.lse_low, idx)
        return kwargs


def _as_sampler(sampler) -> TileSampler:
    # A bare temperature (the compiled op's backward) is a sampler without transform.
    return sampler if isinstance(sampler, TileSampler) else TileSampler(temperature=sampler)


def _mm(a, b, out=None, block=None):
    """a @ b (into out). With `block`, in fixed [block, K] pieces, the last one padded with zero rows: the
    matmul library then reduces each row in the same order whatever the number of rows."""
    if block is None:
        return torch.mm(a, b, out=out)
    out = a.new_empty(a.shape[0], b.shape[1]) if out is None else out
    for r0 in range(0, a.shape[0], block):
        piece = a[r0:r0 + block]
        if piece.shape[0] == block:
            torch.mm(piece, b, out=out[r0:r0 + block])
        else:
            padded = torch.cat([piece, piece.new_zeros(block - piece.shape[0], a.shape[1])])
            out[r0:] = (padded @ b)[: piece.shape[0]]
    return out


def _check_hidden(hidden, weight, targets):
    assert hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1] >= 1
    assert hidden.dtype in SWEEP_DTYPES and weight.dtype == hidden.dtype and weight.shape[0] >= 1
    assert weight.device == hidden.device == targets.device


def _projected_tiles(hidden, weight, rows, tile_bytes=None, block=None):
    """(idx, hidden rows, logits tile) for each tile of valid tokens; one tile buffer serves them all."""
    N, V = hidden.shape[0], weight.shape[0]
    n = N if rows is None else rows.numel()
    if n == 0:
        return
    step = _tile_rows(n, V, hidden.element_size(), tile_bytes)
    yield from _tiles_over(hidden, weight, chunks(n, step, rows), step, block)


def _tiles_over(hidden, weight, indices, max_rows, block=None):
    """(idx, hidden rows, logits tile) for each index in `indices` (at most `max_rows` rows each)."""
    tile = torch.empty(max_rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for idx in indices:
        h = take(hidden, idx)
        z = tile[: h.shape[0]]
        _mm(h, weight.T, out=z, block=block)
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


def _search_tile(sampler: TileSampler, z, idx, V) -> torch.Tensor:
    """The thresholds of a tile's rows from the tile itself (it holds whole rows): one more read of the tile,
    no matmul. Under batch_invariant the search runs on fixed-size row blocks."""
    inv = sampling.inverse_temperature(sampler.temperature, None, z)
    inv = take(inv, idx) if isinstance(inv, torch.Tensor) else inv
    step = 1 << 14  # columns per chunk: the fp32 processed copy stays small
    n = z.shape[0]
    block = sampler.block or max(n, 1)
    out = z.new_empty(n, dtype=torch.float32)
    for r0 in range(0, n, block):
        zr = z[r0:r0 + block]
        inv_r = inv[r0:r0 + block] if isinstance(inv, torch.Tensor) else inv
        pad = block - zr.shape[0]

        def chunks_for(sub, zr=zr, inv_r=inv_r, pad=pad):
            for v0 in range(0, V, step):
                x = sampling.process(zr[:, v0:v0 + step].float(), sampler.transform, inv_r)
                if pad:
                    # Rows of -inf: the search's shapes stay fixed and the padding keeps no candidate.
                    x = torch.cat([x, x.new_full((pad, x.shape[1]), float("-inf"))])
                yield x if sub is None else x[sub]

        found = sampling.find_thresholds(sampler.transform, zr.shape[0] + pad, V, chunks_for, out)
        out[r0:r0 + block] = found[: zr.shape[0]]
    return out


def _forward_tile(sweep: Sweep, z, idx, outputs, sampler: TileSampler):
    """The forward sweep of one tile; its per-token results land in `outputs` (logp, lse, entropy, term, coef)
    and sampler.lse_low (and sampler.threshold, found here unless the sweep found it before)."""
    # The epilogue's per-token inputs are its tensor fields; the rest are settings shared by every token.
    terms = sweep.terms and dataclasses.replace(sweep.terms, **{
        field.name: take(value, idx) for field in dataclasses.fields(sweep.terms)
        if isinstance(value := getattr(sweep.terms, field.name), torch.Tensor)
    })
    if sampler.threshold is not None and sweep.shard is None and sampler.transform.truncates(z.shape[1]):
        put(sampler.threshold, idx, _search_tile(sampler, z, idx, z.shape[1]))
    lse_low = z.new_empty(z.shape[0], dtype=torch.float32)
    kwargs = sampler.kernel_kwargs(idx, lse_low=False)
    parts = logits_sweep.logits_logprob_fwd(z, take(sweep.targets, idx), return_entropy=sweep.return_entropy,
                                            terms=terms, lse_low=lse_low, **kwargs)
    for full, part in zip(outputs, parts):
        if full is not None:
            put(full, idx, part)
    put(sampler.lse_low, idx, lse_low)


def _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, sampler):
    """The logits tile of tokens `idx`, turned in place into d loss / d logits."""
    logits_sweep.logits_logprob_bwd(
        z, take(targets, idx), take(lse, idx), take(g_logp, idx), entropy=take(entropy, idx),
        g_entropy=take(g_entropy, idx), out=z, **_as_sampler(sampler).kernel_kwargs(idx),
    )


def _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, sampler, d_hidden, d_weight):
    """Turn the tile into d logits in place, then add its share of d hidden and d weight."""
    _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, sampler)
    if d_hidden is not None:
        put(d_hidden, idx, _mm(z, weight, block=_as_sampler(sampler).block))
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


def _hidden_backward_flat(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, sampler,
                          need_hidden, need_weight):
    """The backward in bounded memory, at the price of a second recompute (10NHV in all, not 8NHV).

    Token-major pass: each [tokens, V] tile becomes d logits in place and yields its tokens' rows of
    d hidden whole. Vocabulary-major pass: for each block of vocabulary rows, every token tile's
    [tokens, block] logits become d logits (the global lse and entropy make each block's gradient
    exact on its own) and sum into that block's fp32 d weight, written out in the weight's dtype.
    """
    sampler = _as_sampler(sampler)
    d_hidden = _per_row_buffer(hidden.shape, rows, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = weight.new_empty(weight.shape) if need_weight else None
    with _no_autocast(hidden):
        if need_hidden:
            for idx, _, z in _projected_tiles(hidden, weight, rows, FLAT_TILE_BYTES, sampler.block):
                _tile_to_gradient_(z, idx, targets, lse, g_logp, entropy, g_entropy, sampler)
                put(d_hidden, idx, _mm(z, weight, block=sampler.block))
        if need_weight:
            V, H = weight.shape
            block = max(1, FLAT_BLOCK_BYTES // (4 * H))
            for v0 in range(0, V, block):
                rows_of_block = weight[v0:v0 + block]
                acc = _weight_accumulator(rows_of_block)
                # Ids local to the block: a target elsewhere matches no column, as in a vocabulary shard.
                local = targets - v0
                for idx, h, z in _projected_tiles(hidden, rows_of_block, rows, FLAT_TILE_BYTES):
                    _tile_to_gradient_(z, idx, local, lse, g_logp, entropy, g_entropy, sampler)
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


def tile_sampler(hidden, weight, sweep: Sweep, rows) -> TileSampler:
    """The sweep's sampler with buffers for what the forward finds: lse's rounding error, and the thresholds
    (found tile by tile; over a vocabulary shard, before the sweep by `softpo.vocab_parallel`)."""
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    threshold = None
    V = weight.shape[0] if sweep.shard is None else sweep.shard.vocab
    if sweep.transform.truncates(V):
        threshold = torch.full((N,), float("-inf"), **f32)
        if sweep.shard is not None:
            _shard_thresholds(hidden, weight, sweep, rows, threshold)
    return TileSampler(temperature=sweep.temperature, transform=sweep.transform, threshold=threshold,
                       lse_low=torch.zeros(N, **f32), block=invariant_rows(hidden.device) if sweep.batch_invariant
                       else None)


def _shard_thresholds(hidden, weight, sweep: Sweep, rows, threshold):
    """Thresholds over a vocabulary shard: a search pass of its own (one more matmul per tile), in row chunks
    that every rank takes alike (they do not depend on the shard's size), merged over the group."""
    from . import vocab_parallel

    n = hidden.shape[0] if rows is None else rows.numel()
    step = 1024
    for idx in chunks(n, step, rows):
        h = take(hidden, idx)
        inv = sampling.inverse_temperature(sweep.temperature, None, h)
        inv = take(inv, idx) if isinstance(inv, torch.Tensor) else inv

        def chunks_for(sub, h=h, inv=inv):
            for v0 in range(0, weight.shape[0], 1 << 14):
                z = sampling.process((h @ weight[v0:v0 + (1 << 14)].T).float(), sweep.transform, inv)
                yield z if sub is None else z[sub]

        put(threshold, idx, vocab_parallel.find_thresholds(sweep.shard, sweep.transform, h.shape[0], chunks_for,
                                                           threshold))


def hidden_forward(hidden, weight, sweep: Sweep):
    """(valid rows, (logp, lse, entropy, term, coef), sampler) of the hidden path's forward sweep, tile by tile;
    the sampler (`TileSampler`) carries what the backward needs besides."""
    _check_hidden(hidden, weight, sweep.targets)
    rows = _valid_rows(sweep)
    outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep, rows)
    sampler = tile_sampler(hidden, weight, sweep, rows)
    with _no_autocast(hidden):
        for idx, _, z in _projected_tiles(hidden, weight, rows, block=sampler.block):
            _forward_tile(sweep, z, idx, outputs, sampler)
    return rows, outputs, sampler


def hidden_backward(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, sampler, need_hidden,
                    need_weight, flat_memory=False):
    """(d hidden or None, d weight or None, fp32 for half-precision weights): each tile recomputed, turned
    into d logits in place, then the two gradient matmuls (flat_memory: `_hidden_backward_flat`).
    sampler: the forward's `TileSampler` (or a bare temperature)."""
    sampler = _as_sampler(sampler)
    if flat_memory:
        return _hidden_backward_flat(hidden, weight, targets, rows, lse, entropy, g_logp, g_entropy, sampler,
                                     need_hidden, need_weight)
    d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight, rows)
    with _no_autocast(hidden):
        for idx, h, z in _projected_tiles(hidden, weight, rows, block=sampler.block):
            _backward_tile(z, h, idx, weight, targets, lse, g_logp, entropy, g_entropy, sampler,
                           d_hidden, d_weight)
    return d_hidden, d_weight


def gradient_in_forward(hidden, weight, sweep: Sweep, tiles, tile_gradients, need_hidden, need_weight):
    """The forward sweep with each tile turned into its gradient right after it is swept.

    tiles: lists of positions (whole sequences), or None for tiles of the valid tokens in order;
    tile_gradients(idx, outputs) -> (d loss / d logp, d loss / d entropy or None) of the tile's tokens, from the
    outputs so far. With flat_memory d weight is left to the backward. Returns (rows, outputs, d hidden,
    d weight, g_logp, g_entropy, sampler).
    """
    _check_hidden(hidden, weight, sweep.targets)
    # None: every token is valid and the tiles write every row; else masked rows start at zero.
    rows = _valid_rows(sweep) if tiles is None else torch.cat(tiles)
    outputs = _sweep_outputs(hidden.shape[0], hidden.device, sweep, rows)
    sampler = tile_sampler(hidden, weight, sweep, rows)
    logp, lse, entropy, _, _ = outputs
    d_hidden, d_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight and not sweep.flat_memory,
                                           rows)
    g_logp = torch.zeros_like(logp)
    g_entropy = None
    if tiles is None:
        tiled = _projected_tiles(hidden, weight, rows, FLAT_TILE_BYTES if sweep.flat_memory else None, sampler.block)
    else:
        tiled = _tiles_over(hidden, weight, tiles, max(t.numel() for t in tiles), sampler.block)
    with _no_autocast(hidden):
        for idx, h, z in tiled:
            _forward_tile(sweep, z, idx, outputs, sampler)
            g_logp_tile, g_entropy_tile = tile_gradients(idx, outputs)
            put(g_logp, idx, g_logp_tile)
            if g_entropy_tile is not None:
                g_entropy = torch.zeros_like(logp) if g_entropy is None else g_entropy
                put(g_entropy, idx, g_entropy_tile)
            _backward_tile(z, h, idx, weight, sweep.targets, lse, g_logp, entropy, g_entropy,
                           sampler, d_hidden, d_weight)
    return rows, outputs, d_hidden, d_weight, g_logp, g_entropy, sampler
