"""The chunked torch vocabulary sweep: the CPU path, and the fallback wherever Triton is not used.

Same contract as the Triton kernels: per-token log-prob of the target under softmax(z / temperature),
optional entropy, and gradients back to hidden/weight or logits, without ever holding a tokens x
vocabulary tensor. Tokens are processed in chunks and the vocabulary in chunks with an online
log-sum-exp; the backward recomputes each logits tile from the saved per-token lse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import sampling, vocab_parallel
from .rows import chunks
from .sweep import SweepArgs, accumulation_dtype, lse_rounding

# A tile of TOKEN_CHUNK x VOCAB_CHUNK fp32 logits is 16 MiB: small enough that the allocator reuses
# it from chunk to chunk instead of mapping fresh pages each time (glibc maps blocks above 32 MiB),
# large enough that each matmul runs at full speed. Extra memory is a few tiles, whatever N and V are.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 4096


@dataclass(frozen=True, kw_only=True)
class ChunkedArgs(SweepArgs):
    """A sweep's settings and its chunk sizes. With flat_memory the backward sums d weight one vocabulary
    chunk at a time (vocabulary-major), not in a V x H accumulator."""

    token_chunk: int = TOKEN_CHUNK
    vocab_chunk: int = VOCAB_CHUNK


class OnlineLogSumExp:
    """Running max m, s = sum exp(z - m) and (optionally) t = sum exp(z - m) (z - m) over vocabulary
    tiles, per row. Keeping t relative to the max gives the entropy as log s - t / s, free of the
    cancellation in lse - sum p z when logits are large; -inf logits contribute nothing.

    The one place where tiles are folded into a log-sum-exp; both input paths use it.
    """

    def __init__(self, n: int, like: torch.Tensor, track_entropy: bool):
        self.max = like.new_full((n,), float("-inf"))
        self.sum = like.new_zeros(n)
        self.t = like.new_zeros(n) if track_entropy else None

    def update(self, z: torch.Tensor) -> None:
        """Fold in one [n, v] tile of scaled logits. The tile is overwritten."""
        new_max = torch.maximum(self.max, z.amax(dim=-1))
        # Rows with no finite logit yet keep a finite reference, so no inf - inf appears.
        ref = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
        shift = self.max - ref
        rescale = torch.exp(shift)
        # -inf becomes the most negative finite value: its exp is 0 and 0 * it is 0, not NaN.
        d = z.sub_(ref.unsqueeze(-1)).clamp_(min=torch.finfo(z.dtype).min)
        if self.t is None:
            self.sum = self.sum * rescale + d.exp_().sum(-1)
        else:
            e = torch.exp(d)
            tile_sum = e.sum(-1)
            earlier = torch.where(self.sum > 0, self.t + shift * self.sum, self.t)
            self.t = rescale * earlier + e.mul_(d).sum(-1)
            self.sum = self.sum * rescale + tile_sum
        self.max = new_max

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)

    def entropy(self) -> torch.Tensor:
        return torch.log(self.sum) - self.t / self.sum


def _pick_targets(z, targets, col_offset, picked):
    """Write z[i, targets[i] - col_offset] into picked[i] for rows whose target lies in this tile."""
    local = targets - col_offset
    inside = (local >= 0) & (local < z.shape[1])
    tile_pick = z.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(inside, tile_pick, picked)


def _grad_tile_(z, lse, lse_low, entropy, targets, col_offset, g_logp, g_entropy):
    """Turn a tile of processed logits, in place, into d loss / d z for that tile.

    d logp / d z_v = 1[v = y] - p_v and d H / d z_v = -p_v (log p_v + H). log p = (z - lse) - lse_low:
    lse's rounding error restores the precision of (z - max) - log sum at large logit offsets.
    """
    log_p = z.sub_(lse.unsqueeze(-1)).sub_(lse_low.unsqueeze(-1))
    if g_entropy is None:
        grad = log_p.exp_().mul_(-g_logp.unsqueeze(-1))
    else:
        p = torch.exp(log_p)
        # A -inf logit has p = 0 and log p = -inf, and 0 * inf is NaN. Any p > 0 has log p above -746
        # (float64's smallest), so this clamp only touches p = 0, whose gradient it keeps at 0.
        log_p.clamp_(min=-1e4)
        weighted = log_p.add_(entropy.unsqueeze(-1)).mul_(g_entropy.unsqueeze(-1)).add_(g_logp.unsqueeze(-1))
        grad = weighted.mul_(p).neg_()
    local = targets - col_offset
    inside = (local >= 0) & (local < grad.shape[1])
    rows = inside.nonzero().squeeze(-1)
    grad[rows, local[rows]] += g_logp[rows]
    return grad


def _folds(args: SweepArgs) -> bool:
    """Whether the transform is one positive factor per row (logit_scale / temperature, no softcap): it is then
    folded into the [n, H] hidden chunk or the copy of the logits, so the tiles arrive processed."""
    return args.transform.softcap is None and args.transform.logit_scale > 0


def _row_factor(args: SweepArgs, rows, like):
    """The factor folded into the raw tiles of the tokens `rows` (all when None): a float, or [n] in like's
    dtype; 1 when the tiles take the transform themselves (`_Sampler`)."""
    if not _folds(args):
        return 1.0
    inv = sampling.inverse_temperature(args.temperature, rows, like)
    if not isinstance(inv, torch.Tensor):
        return inv * args.transform.logit_scale
    return (inv * args.transform.logit_scale).to(like.dtype)


def _column(factor):
    """A row factor as a [n, 1] column (a float stays a float)."""
    return factor[:, None] if isinstance(factor, torch.Tensor) else factor


class _Sampler:
    """A token chunk's raw tiles -> the sampler's logits (`softpo.sampling`), and the chain rule back.

    Without a softcap the transform arrives folded into the tiles (`_folds`); with one, raw tiles are processed
    here. Then the rows' thresholds truncate them, in place.
    """

    def __init__(self, args: SweepArgs, rows, like, threshold=None):
        self.folded = _folds(args)
        self.transform = args.transform
        self.inv = None if self.folded else sampling.inverse_temperature(args.temperature, rows, like)
        if isinstance(self.inv, torch.Tensor):
            self.inv = self.inv.to(like.dtype)
        self.threshold = None if threshold is None else threshold[rows]

    def process(self, x):
        """The processed raw tile x, overwritten (every tile is a fresh copy)."""
        if self.folded:
            return x
        if self.transform.softcap is None:
            return sampling.process(x, self.transform, self.inv)
        z, _ = self._softcap_(x, keep_tanh=False)
        return z

    def _softcap_(self, x, keep_tanh: bool):
        """(z, tanh(x logit_scale / softcap) or None) of the raw tile x, in the kernels' order of operations and in
        place over x (z in a buffer of its own when the tanh is kept, for the chain rule)."""
        cap = self.transform.softcap
        minus_inf = torch.isneginf(x)  # a banned column stays banned (read before x is overwritten)
        tanh = x.mul_(self.transform.logit_scale).mul_(1.0 / cap).tanh_()
        z = (tanh * cap if keep_tanh else tanh.mul_(cap)).mul_(sampling._factor(x, self.transform, self.inv))
        return z.masked_fill_(minus_inf, float("-inf")), tanh if keep_tanh else None

    def _truncate_(self, z):
        if self.threshold is not None:
            z.masked_fill_(z < self.threshold[:, None].to(z.dtype), float("-inf"))
        return z

    def __call__(self, x):
        """The sampler's logits of the raw tile x, overwritten."""
        return self._truncate_(self.process(x))

    def gradient(self, x, lse, lse_low, entropy, targets, v0, g_logp, g_entropy):
        """d loss / d x of the raw tile x, overwritten."""
        if self.folded or self.transform.softcap is None:
            grad = _grad_tile_(self(x), lse, lse_low, entropy, targets, v0, g_logp, g_entropy)
            return grad if self.folded else grad.mul_(sampling.process_grad(x, self.transform, self.inv))
        z, tanh = self._softcap_(x, keep_tanh=True)
        grad = _grad_tile_(self._truncate_(z), lse, lse_low, entropy, targets, v0, g_logp, g_entropy)
        # d z / d x = logit_scale factor (1 - tanh^2), formed over the tanh's buffer.
        chain_factor = self.transform.logit_scale * sampling._factor(tanh, self.transform, self.inv)
        return grad.mul_(tanh.mul_(tanh).neg_().add_(1.0).mul_(chain_factor))


def _thresholds(args, n, V, raw_tile, sampler, like):
    """The sampler's truncation thresholds [n] of a token chunk (None: nothing truncated), from one extra
    read of its tiles (a second one for rows whose nucleus lies past the candidates)."""
    V_all = V if args.shard is None else args.shard.vocab
    if not args.transform.truncates(V_all):
        return None

    def chunks_for(sub):
        for v0 in range(0, V, args.vocab_chunk):
            z = sampler.process(raw_tile(v0, min(v0 + args.vocab_chunk, V)))
            yield z if sub is None else z[sub]

    if args.shard is not None:
        return vocab_parallel.find_thresholds(args.shard, args.transform, n, chunks_for, like)
    return sampling.find_thresholds(args.transform, n, V, chunks_for, like)


def _forward_sweep(valid_rows, targets, V, N, acc, args, tiles_for):
    """The forward sweep shared by both inputs. `tiles_for(rows)` returns a function of (v0, v1) giving that
    token chunk's [n, v1 - v0] raw tile in `acc` (already / temperature for a plain sweep). With a vocabulary
    shard, targets are local ids and the results are combined over the shard's group.

    Returns (logp, entropy or None, stats [2, N]: lse and its rounding error, thresholds [N] or None)."""
    device = targets.device
    logp = torch.zeros(N, dtype=acc, device=device)
    entropy = torch.zeros(N, dtype=acc, device=device) if args.return_entropy else None
    stats = torch.zeros(2, N, dtype=acc, device=device)
    threshold = None
    for rows in chunks(valid_rows.numel(), args.token_chunk, valid_rows):
        t = targets[rows]
        tile = tiles_for(rows)
        sampler = _Sampler(args, rows, stats)
        found = _thresholds(args, rows.numel(), V, tile, sampler, stats)
        if found is not None:
            threshold = torch.full((N,), float("-inf"), dtype=acc, device=device) if threshold is None else threshold
            threshold[rows] = found
            sampler.threshold = found
        state = OnlineLogSumExp(rows.numel(), stats, args.return_entropy)
        target_logit = torch.zeros(rows.numel(), dtype=acc, device=device)
        for v0 in range(0, V, args.vocab_chunk):
            z = sampler(tile(v0, min(v0 + args.vocab_chunk, V)))
            target_logit = _pick_targets(z, t, v0, target_logit)
            state.update(z)
        log_s = torch.log(state.sum)
        lse, lse_low = lse_rounding(state.max, log_s)
        stats[0, rows], stats[1, rows] = lse, lse_low
        # Relative to the row's max: target - lse would round to the ulp of lse at large logit offsets.
        logp[rows] = (target_logit - state.max) - log_s
        if entropy is not None:
            entropy[rows] = state.entropy()
    if args.shard is not None:
        logp, lse, entropy, lse_low = vocab_parallel.combine(args.shard, logp, stats[0], entropy, targets, valid_rows,
                                                             stats[1])
        stats = torch.stack([lse, lse_low])
    return logp, entropy, stats, threshold


def _backward_sweep(valid_rows, targets, V, stats, entropy_all, g_logp, g_entropy, args, tiles_for, consume,
                    threshold=None):
    """Recompute each tile, turn it into d loss / d (raw tile) and hand it to `consume(rows, v0, v1, grad)`."""
    acc = stats.dtype
    if g_logp is None:
        g_logp = torch.zeros_like(stats[0])
    for rows in chunks(valid_rows.numel(), args.token_chunk, valid_rows):
        t = targets[rows]
        gl = g_logp[rows].to(acc)
        ge = g_entropy[rows].to(acc) if g_entropy is not None else None
        ent = entropy_all[rows] if ge is not None else None
        tile = tiles_for(rows)
        sampler = _Sampler(args, rows, stats, threshold)
        for v0 in range(0, V, args.vocab_chunk):
            v1 = min(v0 + args.vocab_chunk, V)
            consume(rows, v0, v1, sampler.gradient(tile(v0, v1), stats[0, rows], stats[1, rows], ent, t, v0, gl, ge))


def _supported(g_logp, logp):
    """g_logp with zeros where the target lies outside the sampler's kept set (logp -inf): the one-hot term
    of the tile gradient would otherwise be added for a log-prob that does not depend on the logits."""
    if g_logp is None:
        return None
    return torch.where(logp == float("-inf"), torch.zeros_like(g_logp), g_logp)


def _row_chunk(args: ChunkedArgs) -> ChunkedArgs:
    # One row per chunk under batch_invariant: every matmul and reduction then has the same shape for each row.
    return dataclasses.replace(args, token_chunk=1) if args.batch_invariant else args


class ChunkedHiddenLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, valid_rows, args: ChunkedArgs):
        # An unused entropy output then arrives as None and its gradient term is skipped.
        ctx.set_materialize_grads(False)
        args = _row_chunk(args)
        acc = accumulation_dtype(hidden.dtype)
        tiles_for = _hidden_tiles(hidden, weight, acc, args)
        logp, entropy, stats, threshold = _forward_sweep(
            valid_rows, targets, weight.shape[0], hidden.shape[0], acc, args, tiles_for
        )
        ctx.save_for_backward(hidden, weight, targets, valid_rows, stats, entropy, logp, threshold)
        ctx.args = args
        return logp if not args.return_entropy else (logp, entropy)

    @staticmethod
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, targets, valid_rows, stats, entropy_all, logp, threshold = ctx.saved_tensors
        args: ChunkedArgs = ctx.args
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden, d_weight = _hidden_grads(hidden, weight, targets, valid_rows, stats, entropy_all,
                                           _supported(g_logp, logp), g_entropy, args, need_hidden, need_weight,
                                           threshold)
        if need_hidden and args.shard is not None:
            vocab_parallel.reduce_hidden_grad(args.shard, d_hidden)
        return (
            d_hidden.to(hidden.dtype) if need_hidden else None,
            d_weight.to(weight.dtype) if need_weight else None,
            None,
            None,
            None,
        )




def _hidden_grads(hidden, weight, targets, valid_rows, stats, entropy_all, g_logp, g_entropy, args,
                  need_hidden, need_weight, threshold=None):
    """(d hidden, d weight) (None where not needed): each tile recomputed and turned into its gradient.

    Default: one token-major pass, both gradients in accumulation-dtype buffers. flat_memory: d hidden
    token-major, written chunk by chunk in its own dtype, then d weight in a vocabulary-major pass that
    recomputes the tiles and sums one vocabulary chunk at a time.
    """
    acc = stats.dtype
    flat = args.flat_memory
    d_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype if flat else acc, device=hidden.device) \
        if need_hidden else None
    d_weight = None
    if need_weight:
        d_weight = weight.new_empty(weight.shape) if flat else torch.zeros(weight.shape, dtype=acc, device=weight.device)
    V = weight.shape[0]
    state = {}

    def tiles_for(rows):
        state["factor"] = _column(_row_factor(args, rows, stats))
        state["h"] = hidden[rows].to(acc) * state["factor"]
        state["dh"] = torch.zeros_like(state["h"]) if need_hidden else None
        return lambda v0, v1: state["h"] @ weight[v0:v1].to(acc).T

    def consume(rows, v0, v1, grad):
        w = weight[v0:v1].to(acc)
        if need_hidden:
            state["dh"].addmm_(grad, w)
            if v1 == V:  # the chunk's last tile: its hidden gradient is complete
                d_hidden[rows] = (state["dh"] * state["factor"]).to(d_hidden.dtype)
        if need_weight and not flat:
            # h already carries the folded factor, the chain-rule factor of z = factor h w^T.
            d_weight[v0:v1].addmm_(grad.T, state["h"])

    if need_hidden or not flat:
        _backward_sweep(valid_rows, targets, V, stats, entropy_all, g_logp, g_entropy, args, tiles_for, consume,
                        threshold)
    if need_weight and flat:
        _weight_grad_by_vocabulary(hidden, weight, targets, valid_rows, stats, entropy_all, g_logp, g_entropy,
                                   args, d_weight, threshold)
    return d_hidden, d_weight


def _weight_grad_by_vocabulary(hidden, weight, targets, valid_rows, stats, entropy_all, g_logp, g_entropy, args,
                               d_weight, threshold=None):
    """d weight one vocabulary chunk at a time: every token chunk's tile of that chunk becomes its gradient
    (the global lse and entropy make it exact on its own) and sums into a chunk-sized accumulator."""
    acc = stats.dtype
    g_logp = torch.zeros_like(stats[0]) if g_logp is None else g_logp.to(acc)
    g_entropy = None if g_entropy is None else g_entropy.to(acc)
    for v0 in range(0, weight.shape[0], args.vocab_chunk):
        w = weight[v0:v0 + args.vocab_chunk].to(acc)
        block = torch.zeros(w.shape, dtype=acc, device=w.device)
        for rows in chunks(valid_rows.numel(), args.token_chunk, valid_rows):
            h = hidden[rows].to(acc) * _column(_row_factor(args, rows, stats))
            ge = None if g_entropy is None else g_entropy[rows]
            sampler = _Sampler(args, rows, stats, threshold)
            grad = sampler.gradient(h @ w.T, stats[0, rows], stats[1, rows], None if ge is None else entropy_all[rows],
                                    targets[rows], v0, g_logp[rows], ge)
            block.addmm_(grad.T, h)
        d_weight[v0:v0 + args.vocab_chunk] = block


def _hidden_tiles(hidden, weight, acc, args: SweepArgs):
    def tiles_for(rows):
        # Scaling the [n, H] hidden chunk instead of each [n, v] tile applies the folded factor once.
        h = hidden[rows].to(acc) * _column(_row_factor(args, rows, hidden.new_empty(0, dtype=acc)))
        return lambda v0, v1: h @ weight[v0:v1].to(acc).T

    return tiles_for


def _logits_tiles(logits, acc, args: SweepArgs):
    def tiles_for(rows):
        factor = _column(_row_factor(args, rows, logits.new_empty(0, dtype=acc)))

        def tile(v0, v1):
            # Indexing by a row tensor already copies, so the sweep may scale and overwrite the tile in place.
            z = logits[rows, v0:v1].to(acc)
            return z if isinstance(factor, float) and factor == 1.0 else z.mul_(factor)

        return tile

    return tiles_for


class ChunkedLogitsLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, valid_rows, args: ChunkedArgs):
        ctx.set_materialize_grads(False)
        args = _row_chunk(args)
        acc = accumulation_dtype(logits.dtype)
        logp, entropy, stats, threshold = _forward_sweep(
            valid_rows, targets, logits.shape[1], logits.shape[0], acc, args,
            _logits_tiles(logits, acc, args),
        )
        ctx.save_for_backward(logits, targets, valid_rows, stats, entropy, logp, threshold)
        ctx.args = args
        return logp if not args.return_entropy else (logp, entropy)

    @staticmethod
    def backward(ctx, g_logp, g_entropy=None):
        logits, targets, valid_rows, stats, entropy_all, logp, threshold = ctx.saved_tensors
        d_logits = _logits_grad(logits, targets, valid_rows, stats, entropy_all, _supported(g_logp, logp), g_entropy,
                                ctx.args, threshold)
        return d_logits, None, None, None


def _logits_grad(logits, targets, valid_rows, stats, entropy_all, g_logp, g_entropy, args, threshold=None):
    """d logits in the logits' dtype, zero on rows outside `valid_rows`."""
    d_logits = torch.zeros_like(logits)
    # The tile gradient is linear in each row's incoming gradients: scaling those by the chain-rule factor of
    # z = factor logits (the folded one) saves a pass over every tile.
    factor = _row_factor(args, None, stats)
    g_logp = g_logp * factor if g_logp is not None else None
    g_entropy = g_entropy * factor if g_entropy is not None else None

    def consume(rows, v0, v1, grad):
        d_logits[rows, v0:v1] = grad.to(logits.dtype)

    _backward_sweep(valid_rows, targets, logits.shape[1], stats, entropy_all, g_logp, g_entropy, args,
                    _logits_tiles(logits, stats.dtype, args), consume, threshold)
    return d_logits


def chunked_token_logprobs(
    targets: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    valid: torch.Tensor | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    shard: vocab_parallel.VocabShard | None = None,
    flat_memory: bool = False,
    transform: sampling.SamplerTransform = sampling.SamplerTransform(),
    batch_invariant: bool = False,
):
    """Flat inputs (targets [N], hidden [N, H] + weight [V, H] or logits [N, V], valid [N] bool) ->
    (logp [N], entropy [N] or None), fp32 (float64 for float64 inputs). Rows where `valid` is False get 0 and zero gradient.
    With `shard`, weight / logits hold this rank's vocabulary rows and targets are ids local to them.
    flat_memory: the hidden path's d weight summed one vocabulary chunk at a time (see `_hidden_grads`).
    temperature: a float or fp32 [N]; transform, batch_invariant: the sampler's distribution (`SweepArgs`).
    These are the autograd Functions; `softpo.ops` holds the same sweep as custom ops for torch.compile."""
    N = targets.shape[0]
    args = ChunkedArgs(
        temperature=temperature if isinstance(temperature, torch.Tensor) else float(temperature),
        return_entropy=bool(return_entropy), token_chunk=token_chunk or TOKEN_CHUNK,
        vocab_chunk=vocab_chunk or VOCAB_CHUNK, shard=shard, flat_memory=bool(flat_memory), transform=transform,
        batch_invariant=bool(batch_invariant),
    )
    # Positions even when every token is valid: indexing by positions copies, and the sweep overwrites
    # its tiles in place.
    valid_rows = torch.arange(N, device=targets.device) if valid is None else valid.nonzero().squeeze(-1)
    if logits is not None:
        out = ChunkedLogitsLogprobFunction.apply(logits, targets, valid_rows, args)
    else:
        out = ChunkedHiddenLogprobFunction.apply(hidden, weight, targets, valid_rows, args)
    return out if return_entropy else (out, None)
