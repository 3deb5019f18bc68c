"""The distribution a sampler draws from, and the per-row truncation thresholds that define it.

RL rollouts sample from processed logits, in the order of transformers' `generate`:
z = x logit_scale, then z = softcap tanh(z / softcap), then z / temperature (per row), then the warpers
top-k, top-p, min-p, each seeing the previous one's -inf'd logits. Log-probs, entropy and gradients are those
of softmax over the kept tokens. Every truncation keeps the tokens whose processed logit is at least a per-row
threshold, so it reaches the sweeps as one float per row:

- top-k keeps the tokens tied with the k-th largest value (TopKLogitsWarper's `scores < kth` rule);
- top-p keeps token i (logits sorted in decreasing order) while the mass before it, under the top-k-kept
  softmax, is below p (TopPLogitsWarper with min_tokens_to_keep=1); tokens tied with the last kept one are
  kept as well (the warper splits a tie by the order of its sort, which the order of the logits decides);
- min-p keeps p_v >= min_p max p, that is z_v >= max z + log(min_p): the row max survives any top-k or top-p.

`ThresholdSearch` finds the thresholds from chunks of processed logits of a set of rows (vocabulary chunks,
tiles or a vocab-parallel shard's slice); the sweeps then drop z < threshold. Pure torch; no sweep imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Candidates kept per row for top-p without top-k: a nucleus wider than this needs a second sweep of its rows.
TOP_P_CANDIDATES = 256
# Bytes of the dense buffer that holds whole rows for the exact fallback, a group of rows at a time.
FALLBACK_BYTES = 1 << 28


@dataclass(frozen=True)
class SamplerTransform:
    """The sampler's settings besides temperature. top_k: None or 0 keep all; top_p: None or 1.0 keep all;
    min_p: None or 0 keep all."""

    logit_scale: float = 1.0
    softcap: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def top_k_active(self, V: int) -> bool:
        return bool(self.top_k) and self.top_k < V

    def top_p_active(self) -> bool:
        return self.top_p is not None and self.top_p < 1.0

    def min_p_active(self) -> bool:
        return bool(self.min_p)

    def truncates(self, V: int) -> bool:
        """Whether rows need a threshold (and so a search before the sweep)."""
        return self.top_k_active(V) or self.top_p_active() or self.min_p_active()

    def is_identity(self) -> bool:
        """Whether the logits reach the softmax as given (temperature aside)."""
        return self.logit_scale == 1.0 and self.softcap is None

    def kernel_kwargs(self) -> dict:
        """The keywords of the logits launchers (`softpo.kernels.logits`) that this transform sets."""
        return dict(logit_scale=self.logit_scale, softcap=self.softcap)


def _finite_float(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_args(*, logit_scale=1.0, softcap=None, top_k=None, top_p=None, min_p=None) -> SamplerTransform:
    """Validate the sampler's settings (ValueError naming the argument) and return them as one value."""
    if not _finite_float(logit_scale) or logit_scale == 0:
        raise ValueError(f"logit_scale must be a finite nonzero float, got {logit_scale!r}")
    if softcap is not None and not (_finite_float(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0: no truncation), got {top_k!r}")
    if top_p is not None and not (_finite_float(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")
    if min_p is not None and not (_finite_float(min_p) and 0 <= min_p <= 1):
        raise ValueError(f"min_p must be None or a float in [0, 1], got {min_p!r}")
    return SamplerTransform(
        logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap),
        top_k=top_k or None, top_p=None if top_p is None else float(top_p), min_p=min_p or None,
    )


def check_temperature(temperature, targets_shape):
    """A float, or a float tensor with one value per sequence ([B] for targets [B, T], expanded over T) or
    one per token (the targets' shape); every value finite and > 0. Returns a float or an fp32 tensor of
    the targets' shape. A tensor costs one host sync (its values are checked)."""
    if not isinstance(temperature, torch.Tensor):
        if not _finite_float(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite float > 0 or a tensor of them, got {temperature!r}")
        return float(temperature)
    shape = tuple(targets_shape)
    if not temperature.dtype.is_floating_point:
        raise ValueError(f"temperature must be a float tensor, got {temperature.dtype}")
    if temperature.dim() == 0:
        return check_temperature(temperature.item(), shape)
    if tuple(temperature.shape) == shape:
        per_token = temperature
    elif len(shape) == 2 and tuple(temperature.shape) == shape[:1]:
        per_token = temperature[:, None].expand(shape)
    else:
        raise ValueError(f"temperature must have shape {shape[:1]} (per sequence) or {shape} (per token), "
                         f"got {tuple(temperature.shape)}")
    if not bool((torch.isfinite(temperature) & (temperature > 0)).all()):
        raise ValueError("temperature must be finite and > 0 everywhere")
    return per_token.to(torch.float32).contiguous()


def inverse_temperature(temperature, rows: torch.Tensor | None = None, like: torch.Tensor | None = None):
    """1 / temperature as the kernels form it: a float for a float; for a per-token tensor, its flat values
    at `rows` (all when None), inverted in fp32 (float64 for a float64 tensor: the chunked path's references)."""
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / temperature
    flat = temperature.reshape(-1)
    picked = flat if rows is None else flat[rows]
    inv = 1.0 / picked.to(torch.float64 if picked.dtype == torch.float64 else torch.float32)
    return inv if like is None else inv.to(like.device)


def _factor(z: torch.Tensor, transform: SamplerTransform, inv_temperature):
    """The rows' multiplier after the softcap, broadcastable to z [n, v], in fp32 as the kernels form it (float64
    for float64 z: the chunked path's references keep their precision)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    inv = torch.as_tensor(inv_temperature, dtype=dtype, device=z.device)
    if transform.softcap is None:
        inv = inv * torch.tensor(transform.logit_scale, dtype=dtype)
    inv = inv.to(z.dtype)
    return inv[:, None] if inv.dim() == 1 else inv


def process(x: torch.Tensor, transform: SamplerTransform, inv_temperature) -> torch.Tensor:
    """Processed logits of a chunk x [n, v]: scale, softcap, then / temperature (inv_temperature a float or
    [n]); a -inf logit stays -inf. Same operations in the same order as the kernels, differentiable."""
    factor = _factor(x, transform, inv_temperature)
    if transform.softcap is None:
        z = x * factor
    else:
        cap = transform.softcap
        z = cap * torch.tanh(x * transform.logit_scale * (1.0 / cap)) * factor
    if transform.softcap is not None or transform.logit_scale < 0:
        z = torch.where(x == float("-inf"), x, z)
    return z


def process_grad(x: torch.Tensor, transform: SamplerTransform, inv_temperature) -> torch.Tensor:
    """d process(x) / d x elementwise, broadcastable to x: for sweeps that form d logits by hand."""
    factor = _factor(x, transform, inv_temperature)
    if transform.softcap is None:
        return factor
    tanh = torch.tanh(x * transform.logit_scale * (1.0 / transform.softcap))
    return (transform.logit_scale * factor) * (1.0 - tanh * tanh)


def _between(kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """A threshold between the last kept value and the first dropped one (kept > dropped), or the kept value
    when they tie or nothing finite is dropped. The midpoint leaves room for the last-ulp differences
    between torch's and Triton's evaluation of the same transform."""
    mid = kept * 0.5 + dropped * 0.5
    usable = (dropped < mid) & (mid <= kept) & torch.isfinite(mid)
    return torch.where(usable, mid, kept)


def _thresholds_from_sorted(vals, lse_all, transform: SamplerTransform, V: int, complete: bool):
    """(threshold, resolved) from each row's largest processed logits in decreasing order, vals [n, C].

    complete: vals hold whole rows (C = V). lse_all: log-sum-exp of the whole row, or None when top-p
    is off or top-k on. A row is unresolved when its kept set may reach past its candidates.
    """
    n, C = vals.shape
    minus_inf = torch.full((n,), float("-inf"), dtype=vals.dtype, device=vals.device)
    resolved = torch.ones(n, dtype=torch.bool, device=vals.device)
    row_max = vals[:, 0]
    threshold = minus_inf
    if transform.top_k_active(V):
        k = transform.top_k
        kth = vals[:, k - 1]
        threshold = _between(kth, vals[:, k])
    # -inf logits are never kept: they carry no mass, and a row's candidates may run into them.
    kept = (vals >= threshold[:, None]) & (vals > float("-inf"))
    if transform.top_p_active():
        p = transform.top_p
        n_kept = kept.sum(1)
        # Every kept token lies among the candidates when the last candidate is dropped.
        all_inside = torch.ones_like(resolved) if complete else ~kept[:, -1]
        if transform.top_k_active(V):
            lse_kept = torch.logsumexp(torch.where(kept, vals, minus_inf[:, None]).double(), 1)
            resolved &= all_inside
        else:
            lse_kept = lse_all.double()
        q = torch.where(kept, torch.exp(vals.double() - lse_kept[:, None]), 0.0)
        before = torch.cumsum(q, 1) - q
        n_keep = (kept & (before < p)).sum(1).clamp(min=1)
        inside = n_keep < n_kept
        last = vals.gather(1, (n_keep - 1)[:, None])[:, 0]
        nxt = vals.gather(1, n_keep.clamp(max=C - 1)[:, None])[:, 0]
        threshold_p = torch.where(inside, _between(last, nxt), minus_inf)
        # The nucleus covers every candidate: it ends beyond them unless they are the whole kept set.
        resolved &= inside | all_inside
        threshold = torch.maximum(threshold, threshold_p)
    if transform.min_p_active():
        threshold = torch.maximum(threshold, row_max + math.log(transform.min_p))
    # The row max is always kept (min_tokens_to_keep = 1).
    return torch.minimum(threshold, row_max), resolved


class ThresholdSearch:
    """Per-row truncation thresholds of `transform` from chunks of processed logits of n rows, exactly.

    One sweep (`update` with every chunk of the rows, columns in any order and split) keeps each row's
    largest values (top_k + 1, or TOP_P_CANDIDATES for top-p alone) and, for top-p alone, its
    log-sum-exp. `finish` gives the thresholds and the rows whose top-p nucleus (or top-k tie) reaches past
    the candidates; those rows need `resolve` with their whole rows (a second sweep of just those rows).
    For a vocab-parallel shard: `merge` the shards' states (all-gathered) before `finish`.
    """

    def __init__(self, transform: SamplerTransform, n: int, V: int, like: torch.Tensor,
                 top_p_candidates: int = TOP_P_CANDIDATES):
        self.transform = transform
        self.V = V
        C = 1
        if transform.top_k_active(V):
            C = transform.top_k + 1
        elif transform.top_p_active():
            C = top_p_candidates
        self.C = min(C, V)
        self.candidates = like.new_full((n, self.C), float("-inf"))
        need_lse = transform.top_p_active() and not transform.top_k_active(V)
        self.lse = like.new_full((n,), float("-inf")) if need_lse else None

    def update(self, z: torch.Tensor) -> None:
        """Fold in processed logits z [n, v] of some columns of the rows."""
        z = z.to(self.candidates.dtype)
        top = torch.topk(z, min(self.C, z.shape[1]), dim=1).values
        self.candidates = torch.topk(torch.cat([self.candidates, top], 1), self.C, dim=1).values
        if self.lse is not None:
            self.lse = torch.logaddexp(self.lse, torch.logsumexp(z, 1))

    def merge(self, candidates: list[torch.Tensor], lses: list[torch.Tensor] | None = None) -> None:
        """Combine the states of several column sets of the same rows (e.g. all-gathered from vocab shards)."""
        self.candidates = torch.topk(torch.cat(candidates, 1), self.C, dim=1).values
        if self.lse is not None:
            self.lse = torch.logsumexp(torch.stack(lses), 0)

    def finish(self):
        """(threshold [n], unresolved row positions): thresholds of unresolved rows are only lower bounds."""
        complete = self.C == self.V
        threshold, resolved = _thresholds_from_sorted(self.candidates, self.lse, self.transform, self.V, complete)
        return threshold, (~resolved).nonzero().squeeze(-1)

    def resolve(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact thresholds of whole rows [r, V] of processed logits (the fallback of unresolved rows)."""
        vals = torch.sort(rows.to(self.candidates.dtype), dim=1, descending=True).values
        lse = torch.logsumexp(vals, 1) if self.lse is not None else None
        return _thresholds_from_sorted(vals, lse, self.transform, self.V, True)[0]


def find_thresholds(transform: SamplerTransform, n: int, V: int, chunks_for, like: torch.Tensor,
                    top_p_candidates: int = TOP_P_CANDIDATES) -> torch.Tensor | None:
    """Per-row thresholds [n] (None when the transform keeps every token), in like's dtype.

    chunks_for(rows) yields the processed logits [len(rows), v] of those row positions (all n rows when
    rows is None), chunk by chunk over the whole vocabulary. Called once for all rows, then once per group of
    rows whose nucleus lies past the candidates, to sort them whole.
    """
    if not transform.truncates(V):
        return None
    search = ThresholdSearch(transform, n, V, like, top_p_candidates)
    for z in chunks_for(None):
        search.update(z)
    threshold, unresolved = search.finish()
    group = max(1, FALLBACK_BYTES // (V * like.element_size()))
    for g0 in range(0, unresolved.numel(), group):
        rows = unresolved[g0: g0 + group]
        whole = torch.cat([z.to(like.dtype) for z in chunks_for(rows)], 1)
        threshold[rows] = search.resolve(whole)
    return threshold
