"""Pieces every vocabulary sweep shares: the online log-sum-exp, the row block, config selection."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    return os.environ.get("SOFTPO_AUTOTUNE", "0") == "1"


@triton.jit
def _lse_merge(m, s, t, m2, s2, t2):
    """Merge two log-sum-exp states of the same rows.

    A state is the running max m, s = sum exp(z - m) and t = sum exp(z - m) * (z - m) over the
    logits z seen so far. Keeping t relative to the max gives the entropy as log(s) - t / s, free of
    the cancellation in lse - sum p z when logits are large.
    """
    m_new = tl.maximum(m, m2)
    # Rows with no finite logit yet keep a finite reference, so no inf - inf appears.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp(m - m_ref)
    a2 = tl.exp(m2 - m_ref)
    t = a * (t + tl.where(s > 0, (m - m_ref) * s, 0.0)) + a2 * (t2 + tl.where(s2 > 0, (m2 - m_ref) * s2, 0.0))
    return m_new, a * s + a2 * s2, t


@triton.jit
def _online_lse(m, s, t, z):
    """Fold a [BLOCK_N, BLOCK_V] tile of logits z (-inf where absent) into the rows' state."""
    m2 = tl.max(z, axis=1)
    d = z - tl.where(m2 == float("-inf"), 0.0, m2)[:, None]
    e = tl.exp(d)
    return _lse_merge(m, s, t, m2, tl.sum(e, axis=1), tl.sum(tl.where(e > 0, e * d, 0.0), axis=1))


@triton.jit
def _finish_lse(m, s, t):
    """(log s, lse, entropy) from a log-sum-exp state.

    lse = m + log s rounds to the ulp of m: once logits are large (2**24 in fp32) that ulp exceeds the
    log-probs themselves, so users form log p = (z - m) - log s, never z - lse.
    """
    log_s = tl.log(s)
    return log_s, m + log_s, log_s - t / s


@triton.jit
def _split_lse(m, log_s):
    """The rounding error lo of hi = fl(m + log s) (Knuth's two-sum): a later sweep recovers
    (z - hi) - lo = (z - m) - log s to fp32 precision from the two per-row floats lse and lo."""
    hi = m + log_s
    b = hi - m
    lo = (m - (hi - b)) + (log_s - b)
    # Rows without a finite logit: lse is -inf and has no rounding error.
    return tl.where(hi == float("-inf"), 0.0, lo)


if interpreting():
    @triton.jit
    def _tanh(x):
        """tanh for the interpreter, which has no libdevice (numpy's exp makes this accurate to a few ulp)."""
        a = tl.abs(x)
        big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
        x2 = x * x
        # Near 0, where 1 - 2 / (e + 1) cancels, the series to x**9 (error below 1e-11 for |x| < 0.125).
        small = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
        return tl.where(a < 0.125, small, tl.where(x < 0, -big, big))
else:
    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)


@triton.jit
def _process(x, factor, threshold, logit_scale, softcap, inv_softcap,
             HAS_SOFTCAP: tl.constexpr, KEEP_MINUS_INF: tl.constexpr, HAS_THRESHOLD: tl.constexpr):
    """Logits x (fp32) as the sampler saw them, z, and d z / d x.

    z = softcap tanh(x logit_scale / softcap) factor with a softcap, else x factor, where factor is the
    row's 1 / temperature (times logit_scale without a softcap), broadcastable to x. A -inf logit (a
    banned or absent column) stays -inf under any transform; with a threshold, z below it becomes -inf.
    """
    if HAS_SOFTCAP:
        tanh = _tanh(x * logit_scale * inv_softcap)
        z = softcap * tanh * factor
        chain = (logit_scale * factor) * (1.0 - tanh * tanh)
    else:
        z = x * factor
        chain = tl.broadcast_to(factor, z.shape)
    if KEEP_MINUS_INF:
        z = tl.where(x == float("-inf"), float("-inf"), z)
    if HAS_THRESHOLD:
        z = tl.where(z >= threshold, z, float("-inf"))
    return z, chain


@triton.jit
def _grad_tile(z, chain, cols, targets, m, log_s, entropy, g_logp, g_ent, HAS_ENT_GRAD: tl.constexpr):
    """d loss / d raw logits of one tile of processed logits z: the gradient wrt z,
    g_logp (1[v = y] - p) - g_ent p (log p + H), times chain = d z / d raw logit.

    log p = (z - m) - log s with the row's max m and log sum s (or m = lse and log s = its rounding error).
    """
    log_p = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(log_p)
    onehot = cols[None, :] == targets[:, None]
    grad = g_logp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_ENT_GRAD:
        # p underflows to 0 in absent columns, where log p is -inf.
        grad -= g_ent[:, None] * tl.where(p > 0, p * (log_p + entropy[:, None]), 0.0)
    return grad * chain


@triton.jit
def _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N: tl.constexpr, HAS_ROW_IDX: tl.constexpr):
    """Rows handled at positions start..start+BLOCK_N of the sweep order.

    With a row index the valid tokens come first in the order, so blocks past n_valid hold only
    masked tokens and skip their work. Returns (pos, rows, in_range, active, n_valid).
    """
    pos = start + tl.arange(0, BLOCK_N).to(tl.int64)
    in_range = pos < N
    if HAS_ROW_IDX:
        n_valid = tl.load(n_valid_ptr).to(tl.int64)
        rows = tl.load(row_idx_ptr + pos, mask=in_range, other=0).to(tl.int64)
    else:
        n_valid = N
        rows = pos
    active = pos < n_valid
    return pos, rows, in_range, active, n_valid


def check_rows(N: int, device, targets, row_idx, n_valid) -> None:
    """The per-token index inputs every launcher takes (asserted: the public API validated them)."""
    assert targets.shape == (N,) and targets.dtype == torch.int64 and targets.is_contiguous()
    assert (row_idx is None) == (n_valid is None), "row_idx and n_valid go together"
    if row_idx is not None:
        assert row_idx.shape == (N,) and row_idx.dtype == torch.int64 and row_idx.is_contiguous()
        assert n_valid.numel() == 1 and n_valid.dtype in (torch.int32, torch.int64)
    assert all(t is None or t.device == device for t in (targets, row_idx, n_valid))


def pick_config(configs, V: int):
    """The first config whose max_v bound admits this vocabulary; the last one otherwise."""
    for max_v, config in configs:
        if V <= max_v:
            return config
    return configs[-1][1]


def launch(kernel, tuned_cache: dict, configs, interpret_config, grid, V: int, kwargs, key, **autotune_kwargs):
    """Launch `kernel` with its default config, the interpreter's small one, or the autotuned best.

    `grid` takes the config's meta-parameters. Autotuning is keyed on V only: token counts
    change every step and would retune forever.
    """
    if interpreting():
        config = interpret_config
    elif autotuning():
        cache_key = (kernel, id(configs), repr(sorted(autotune_kwargs.items())))
        if cache_key not in tuned_cache:
            tuned_cache[cache_key] = triton.autotune(
                configs=[c for _, c in configs], key=key, **autotune_kwargs
            )(kernel)
        tuned_cache[cache_key][grid](**kwargs)
        return
    else:
        config = pick_config(configs, V)
    meta = dict(config.kwargs)
    kernel[grid(meta)](**kwargs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
