"""Pieces every vocabulary sweep shares: the online log-sum-exp, the row block, config selection."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    return os.environ.get("SOFTPO_AUTOTUNE", "0") == "1"


DOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _online_lse(m, s, t, z):
    """Fold a [BLOCK_N, BLOCK_V] tile z (-inf where absent) into each row's running max m,
    s = sum exp(z - m) and t = sum exp(z - m) * (z - m).

    Keeping t relative to the running max gives the entropy as log(s) - t / s, free of the
    cancellation in lse - sum p z when logits are large.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # A row with no finite logit yet keeps a finite reference, so no inf - inf appears.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    shift = tl.where(s > 0, (m - m_ref) * s, 0.0)
    d = z - m_ref[:, None]
    e = tl.exp(d)
    t = alpha * (t + shift) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t


@triton.jit
def _finish_lse(m, s, t):
    """lse and entropy from the running state of `_online_lse`."""
    log_s = tl.log(s)
    return m + log_s, log_s - t / s


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


def pick_config(configs, V: int, H: int = 0):
    """The first config whose (max_v, max_h) bounds admit this problem; the last one otherwise."""
    for max_v, max_h, config in configs:
        if V <= max_v and H <= max_h:
            return config
    return configs[-1][2]


def launch(kernel, tuned_cache: dict, configs, interpret_config, grid, V: int, H: int, kwargs, key, **autotune_kwargs):
    """Launch `kernel` with its default config, the interpreter's small one, or the autotuned best.

    `grid` takes the config's meta-parameters. Autotuning is keyed on V and H only: token counts
    change every step and would retune forever.
    """
    if interpreting():
        config = interpret_config
    elif autotuning():
        cache_key = (kernel, id(configs), repr(sorted(autotune_kwargs.items())))
        if cache_key not in tuned_cache:
            tuned_cache[cache_key] = triton.autotune(
                configs=[c for _, _, c in configs], key=key, **autotune_kwargs
            )(kernel)
        tuned_cache[cache_key][grid](**kwargs)
        return
    else:
        config = pick_config(configs, V, H)
    meta = dict(config.kwargs)
    kernel[grid(meta)](**kwargs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
