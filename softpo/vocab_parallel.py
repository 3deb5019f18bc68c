"""The vocabulary sweep over a tensor-parallel lm_head: each rank holds a contiguous shard of rows.

With a process group of P ranks, rank r holds `weight` rows [start_r, start_r + V_r) of the [V, H]
lm_head (or the matching logits columns) and the same hidden states and global target ids as every
other rank. Each rank sweeps its own shard with the ordinary kernels; only per-token numbers cross
ranks:

- forward: every rank's (lse_r, entropy_r) and the target logit from the rank that owns it are
  combined in fp32 by one all-reduce of the max and one packed all-reduce of sums. The combined
  entropy is the entropy of a mixture of the shards' softmaxes, sum_r w_r (H_r - log w_r) with
  w_r = exp(lse_r - lse): no term cancels, however large the logits.
- backward: with the global lse and entropy each rank turns its own logits into their gradient, so
  d logits and d weight never leave the rank; d hidden is a sum over the shards (one all-reduce,
  or left partial for callers that reduce-scatter it under sequence parallelism).

Before the sweep one all-gather lets every rank check every rank's shard, hidden size and targets, so
bad input raises the same ValueError everywhere instead of hanging a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.distributed as dist

from .sweep import lse_rounding


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in a vocab-parallel lm_head: rows [start, start + size) of `vocab`."""

    group: object
    start: int
    size: int
    vocab: int
    reduce_hidden_grad: bool = True

    def owned(self, local_targets: torch.Tensor) -> torch.Tensor:
        return (local_targets >= 0) & (local_targets < self.size)


# The per-rank facts the agreement gathers, one int64 each.
_ERROR, _START_GIVEN, _START, _SIZE, _HIDDEN, _TARGET_MIN, _TARGET_MAX = range(7)
# ...and what must be the same on every rank: the tokens (count, valid count, a checksum of which are valid
# and of their targets) and whether entropy is swept; the combine's collectives are sized by them.
_SAME_ON_EVERY_RANK = slice(7, 12)


def agree(
    group,
    error: str | None,
    *,
    vocab_start: int | None,
    local_vocab: int,
    hidden_size: int,
    targets: torch.Tensor | None,
    where: torch.Tensor | None = None,
    reduce_hidden_grad: bool = True,
    entropy: bool = False,
) -> VocabShard:
    """Exchange this rank's validation outcome, shard layout and target range, and decide together.

    `error`: this rank's validation message, or None; `hidden_size` is -1 for the logits input;
    `targets` (global ids, where `where`) is None when validation failed. Every rank returns the same
    layout or raises the same ValueError (naming the rank at fault). One all-gather when all is well.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed initialized (init_process_group)")
    bad_start = vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int))
    if error is None and bad_start:
        error = f"vocab_start must be an int or None, got {vocab_start!r}"
    if targets is not None:
        device = targets.device
    else:
        # NCCL only moves CUDA tensors; gloo takes CPU ones.
        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    # Built on the device and read back once, after the all-gather: no host sync per fact.
    settings = torch.tensor(
        [error is not None, vocab_start is not None, vocab_start if isinstance(vocab_start, int) else 0,
         local_vocab, hidden_size], dtype=torch.int64, device=device,
    )
    if error is None:
        flat_targets = targets.reshape(-1).long()
        valid = torch.ones_like(flat_targets, dtype=torch.bool) if where is None else where.reshape(-1)
        position = torch.arange(1, flat_targets.numel() + 1, device=device)
        # With no valid token the range reads [max int64, min int64]: no target, nothing out of range.
        big, small = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
        padded_valid = torch.cat([valid, valid.new_zeros(1)])  # one absent row: the reductions never see []
        padded = torch.cat([flat_targets, flat_targets.new_zeros(1)])
        low = torch.where(padded_valid, padded, big).min()
        high = torch.where(padded_valid, padded, small).max()
        facts = torch.stack([
            low, high, torch.tensor(flat_targets.numel(), device=device), valid.sum(),
            (position * valid).sum(), (position * flat_targets * valid).sum(),
            torch.tensor(int(bool(entropy)), device=device),
        ])
    else:
        facts = torch.zeros(7, dtype=torch.int64, device=device)
    info = torch.cat([settings, facts.to(torch.int64)])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=group)
    table = torch.stack(gathered).tolist()
    rank = dist.get_rank(group)
    if any(row[_ERROR] for row in table):
        # The failure path alone pays for a second collective: every rank learns the message.
        messages = [None] * world
        dist.all_gather_object(messages, error, group=group)
        bad = next(r for r, row in enumerate(table) if row[_ERROR])
        raise ValueError(f"rank {bad} of the process group: {messages[bad]}")
    _check_layout(table)
    starts, vocab = _starts(table)
    _check_same_tokens(table)
    return VocabShard(group, starts[rank], local_vocab, vocab, reduce_hidden_grad)


def _check_same_tokens(table) -> None:
    if any(row[_SAME_ON_EVERY_RANK] != table[0][_SAME_ON_EVERY_RANK] for row in table):
        raise ValueError(
            "targets, mask and the entropy flag must be the same on every rank of a vocab-parallel group "
            "(each rank holds a shard of the vocabulary for the same tokens); they differ"
        )


def _check_layout(table) -> None:
    hidden = {row[_HIDDEN] for row in table}
    if len(hidden) > 1:
        per_rank = [row[_HIDDEN] for row in table]
        raise ValueError(f"hidden size H differs across ranks ({per_rank}); a vocab-parallel lm_head shares H")
    given = {bool(row[_START_GIVEN]) for row in table}
    if len(given) > 1:
        raise ValueError("vocab_start must be given on every rank of the process group or on none")


def _starts(table) -> tuple[list[int], int]:
    """Each rank's first row and the whole vocabulary size, after checking the shards tile [0, V)."""
    sizes = [row[_SIZE] for row in table]
    if table[0][_START_GIVEN]:
        starts = [row[_START] for row in table]
    else:
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
    vocab = sum(sizes)
    end = 0
    for start, size in sorted(zip(starts, sizes)):
        if start != end:
            kind = "overlap" if start < end else "leave a gap"
            raise ValueError(
                f"vocabulary shards {kind} at row {min(start, end)}: vocab_start per rank {starts}, "
                f"shard sizes {sizes}; they must tile [0, V) exactly"
            )
        end = start + size
    for rank, row in enumerate(table):
        if row[_TARGET_MIN] < 0 or row[_TARGET_MAX] >= vocab:
            bad = row[_TARGET_MIN] if row[_TARGET_MIN] < 0 else row[_TARGET_MAX]
            raise ValueError(f"targets must lie in [0, V={vocab}); rank {rank} holds {bad}")
    return starts, vocab


def combine(shard: VocabShard, logp, lse, entropy, local_targets, valid_rows, lse_low=None):
    """Per-token results of this rank's shard -> those of the whole vocabulary, on every rank.

    logp, lse, entropy (or None), lse_low (lse's rounding error, or None for 0): [N] in the accumulation dtype,
    as a local sweep returns them for `local_targets` (global ids minus this shard's start). Rows outside
    `valid_rows` (an index, or None for all) come back as zeros. Returns (logp, lse, entropy, lse_low) of the
    whole vocabulary. Two collectives: the max of lse, then one packed sum.

    Every quantity is kept relative to the largest shard's lse, with the shards' rounding errors: the owner's
    log-prob becomes logp_r - log(sum_r' exp(lse_r' - lse_r)), never (logp_r + lse_r) - lse, which would round
    to the ulp of lse at large logit offsets.
    """
    rows = slice(None) if valid_rows is None else valid_rows
    lse_r = lse[rows]
    peak = lse_r.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=shard.group)
    # A row every shard sees as all -inf keeps a finite reference, so no inf - inf appears.
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    # This shard's lse relative to the peak, with its rounding error: exact differences of nearby values.
    offset = lse_r - peak
    if lse_low is not None:
        offset = offset + torch.where(torch.isfinite(lse_r), lse_low[rows], torch.zeros_like(offset))
    weight = torch.exp(offset)
    present = weight > 0
    owned = shard.owned(local_targets[rows])
    # The owner's target relative to the peak; a shard whose logits are all -inf has lse = -inf, and then its
    # target logit is -inf too.
    target = torch.where(lse_r == float("-inf"), lse_r, logp[rows] + offset)
    parts = [weight, torch.where(owned, target, torch.zeros_like(target))]
    if entropy is not None:
        zero = torch.zeros_like(weight)
        parts += [torch.where(present, weight * entropy[rows], zero), torch.where(present, weight * offset, zero)]
    packed = torch.stack(parts)
    dist.all_reduce(packed, group=shard.group)
    total = packed[0]
    log_total = torch.log(total)
    lse_hi, lse_lo = lse_rounding(peak, log_total)
    lse_out, lse_low_out = torch.zeros_like(lse), torch.zeros_like(lse)
    lse_out[rows], lse_low_out[rows] = lse_hi, lse_lo
    logp_out = torch.zeros_like(logp)
    logp_out[rows] = packed[1] - log_total
    entropy_out = None
    if entropy is not None:
        # H = sum_r w_r (H_r - log w_r), w_r = exp(lse_r - peak) / total.
        entropy_out = torch.zeros_like(entropy)
        entropy_out[rows] = log_total + (packed[2] - packed[3]) / total
    return logp_out, lse_out, entropy_out, lse_low_out


def find_thresholds(shard: VocabShard, transform, n: int, chunks_for, like: torch.Tensor):
    """The sampler's truncation thresholds [n] of n rows whose columns are spread over the group's shards.

    chunks_for(rows) yields this shard's processed logits of those rows (all when None), chunk by chunk. Each
    rank searches its own columns (`softpo.sampling.ThresholdSearch`), one all-gather merges the candidates
    (and, for top-p alone, the shards' log-sum-exps), and rows whose nucleus lies past the candidates are
    gathered whole (just those rows) and sorted. Every rank calls this alike and gets the same thresholds.
    """
    from .sampling import ThresholdSearch

    search = ThresholdSearch(transform, n, shard.vocab, like)
    for z in chunks_for(None):
        search.update(z)
    state = search.candidates if search.lse is None else torch.cat([search.candidates, search.lse[:, None]], 1)
    gathered = [torch.empty_like(state) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(gathered, state.contiguous(), group=shard.group)
    C = search.C
    search.merge([g[:, :C] for g in gathered], None if search.lse is None else [g[:, C] for g in gathered])
    threshold, unresolved = search.finish()
    if unresolved.numel():
        whole = torch.cat([z.to(like.dtype) for z in chunks_for(unresolved)], 1)
        # Shards differ in size: pad to the largest with -inf, which no threshold keeps.
        width = torch.tensor([whole.shape[1]], device=whole.device)
        widths = [torch.empty_like(width) for _ in gathered]
        dist.all_gather(widths, width, group=shard.group)
        widest = max(int(w) for w in widths)
        padded = torch.cat([whole, whole.new_full((whole.shape[0], widest - whole.shape[1]), float("-inf"))], 1)
        parts = [torch.empty_like(padded) for _ in gathered]
        dist.all_gather(parts, padded, group=shard.group)
        threshold[unresolved] = search.resolve(torch.cat(parts, 1))
    return threshold


def reduce_hidden_grad(shard: VocabShard, d_hidden: torch.Tensor) -> torch.Tensor:
    """d hidden from this shard alone -> the sum over shards (unless the caller reduces it)."""
    if not shard.reduce_hidden_grad:
        return d_hidden
    if d_hidden.element_size() >= 4:
        dist.all_reduce(d_hidden, group=shard.group)
        return d_hidden
    # Half-precision partials are summed in fp32: a sum of P rounded partials would round P times.
    total = d_hidden.float()
    dist.all_reduce(total, group=shard.group)
    return d_hidden.copy_(total)
