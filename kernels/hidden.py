"""Hidden path: per-token log-prob, lse and entropy straight from hidden [N, H] and weight [V, H].

Logits tiles [BLOCK_N, BLOCK_V] are computed in-kernel (tl.dot over H chunks, fp32 accumulation)
and folded into an online log-sum-exp; no N x V tensor exists in either pass. The backward
recomputes the tiles from the saved lse and runs two kernels, one owning rows of d hidden and one
owning rows of d weight, so every sum has a fixed order and results are bitwise reproducible.
Offsets are int64 throughout: V * H and N * V pass 2**31 at production sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DOT_DTYPES, _finish_lse, _online_lse, _row_block, interpreting, launch
from .terms import _terms_epilogue, terms_kwargs

# Rows (max V, max H, config): the first row that admits the problem is the default, and all rows
# form the SOFTPO_AUTOTUNE sweep. Tiles are keyed on V, H and dtype, never on the token count.
# Chosen so that ptxas (sm_90) reports no register spills; speeds are not yet measured.
_C = triton.Config
_SMALL = _C({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=4, num_stages=2)
_FWD_CONFIGS = [
    (4096, 256, _SMALL),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
]
# d hidden re-reads and re-writes its fp32 rows once per vocabulary tile: FLOPs per byte of that
# traffic are BLOCK_V / 2, so a wide BLOCK_V pays, as far as registers allow.
_DH_CONFIGS = [
    (4096, 256, _SMALL),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3)),
]
# d weight likewise per token tile: BLOCK_N / 2 FLOPs per byte.
_DW_CONFIGS = [
    (4096, 256, _SMALL),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 256, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3)),
]
# fp32 operands (tf32x3: three tensor-core products) need more registers: narrower tiles.
_FP32_CONFIGS = [
    (4096, 256, _SMALL),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=2)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=4, num_stages=2)),
]
# Small tiles under the interpreter so that odd shapes still cross several tiles.
_INTERPRET_CONFIG = _C({"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=4, num_stages=1)
_TUNED: dict = {}


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b; DOT_PRECISION "upcast" works around the interpreter's bf16 dot, which reads raw bits."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, active, cols, H,
    stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
    V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """z = hidden[rows] @ weight[cols]^T / temperature in fp32, -inf in columns past V."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    col_in = cols < V
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H).to(tl.int64)
        k_in = ks < H
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
            mask=active[:, None] & k_in[None, :], other=0.0,
        )
        w = tl.load(
            weight_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wh,
            mask=col_in[None, :] & k_in[:, None], other=0.0,
        )
        acc = _dot(h, w, acc, DOT_PRECISION)
    return tl.where(col_in[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _grad_tile(z, cols, targets, lse, entropy, g_logp, g_ent, inv_temperature, HAS_ENT_GRAD: tl.constexpr):
    """d loss / d raw logits of one tile: (g_logp (1[v = y] - p) - g_ent p (log p + H)) / temperature."""
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    onehot = cols[None, :] == targets[:, None]
    grad = g_logp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_ENT_GRAD:
        # p underflows to 0 in absent columns, where log p is -inf.
        grad -= g_ent[:, None] * tl.where(p > 0, p * (log_p + entropy[:, None]), 0.0)
    return grad * inv_temperature


@triton.jit
def _hidden_fwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr, row_idx_ptr, n_valid_ptr,
    logp_ptr, lse_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
    N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temperature, lo, hi, delta, tau_pos, tau_neg, beta,
    HAS_ROW_IDX: tl.constexpr, STORE_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_TERMS: tl.constexpr, GATE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_ISW: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    pos, rows, in_range, active, n_valid = _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N, HAS_ROW_IDX)
    targets = tl.load(targets_ptr + rows, mask=active, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    # Blocks made only of masked tokens run no vocabulary tile at all.
    v_stop = tl.where(start < n_valid, V, 0)
    for v0 in range(0, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, active, cols, H, stride_hn, stride_hh, stride_wv, stride_wh,
            inv_temperature, V, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )
        m, s, t = _online_lse(m, s, t, z)
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    lse, entropy = _finish_lse(m, s, t)
    logp = tl.where(active, z_target - lse, 0.0)
    tl.store(logp_ptr + rows, logp, mask=in_range)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=in_range)
    if STORE_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(active, entropy, 0.0), mask=in_range)
    if HAS_TERMS:
        _terms_epilogue(
            logp, rows, in_range, active, adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
            lo, hi, delta, tau_pos, tau_neg, beta, GATE, HAS_OLD, HAS_DELTA, HAS_ISW, KL, KL_RATIO,
        )


@triton.jit
def _hidden_bwd_dh_kernel(
    hidden_ptr, weight_ptr, targets_ptr, row_idx_ptr, n_valid_ptr,
    lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dh_ptr,
    N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dn,
    inv_temperature,
    HAS_ROW_IDX: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """d hidden [N, H] (fp32, zero-initialized): each program owns BLOCK_N rows, sweeps the vocabulary."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    pos, rows, in_range, active, n_valid = _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N, HAS_ROW_IDX)
    targets = tl.load(targets_ptr + rows, mask=active, other=0)
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=active, other=0.0)
    entropy = lse
    g_ent = lse
    if HAS_ENT_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=active, other=0.0)
    v_stop = tl.where(start < n_valid, V, 0)
    for v0 in range(0, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, active, cols, H, stride_hn, stride_hh, stride_wv, stride_wh,
            inv_temperature, V, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )
        grad = _grad_tile(z, cols, targets, lse, entropy, g_logp, g_ent, inv_temperature, HAS_ENT_GRAD)
        grad = grad.to(weight_ptr.dtype.element_ty)
        col_in = cols < V
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H).to(tl.int64)
            k_in = ks < H
            w = tl.load(
                weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                mask=col_in[:, None] & k_in[None, :], other=0.0,
            )
            # This program alone owns these rows of d hidden: a plain read-modify-write, no atomics.
            dh_ptrs = dh_ptr + rows[:, None] * stride_dn + ks[None, :]
            dh_mask = active[:, None] & k_in[None, :]
            dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
            dh = _dot(grad, w, dh, DOT_PRECISION)
            tl.store(dh_ptrs, dh, mask=dh_mask)


@triton.jit
def _hidden_bwd_dw_kernel(
    hidden_ptr, weight_ptr, targets_ptr, row_idx_ptr, n_valid_ptr,
    lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dw_ptr,
    N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dv,
    inv_temperature,
    HAS_ROW_IDX: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """d weight [V, H] (fp32, zero-initialized): each program owns BLOCK_V rows, sweeps the valid tokens."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = cols < V
    if HAS_ROW_IDX:
        n_valid = tl.load(n_valid_ptr).to(tl.int64)
    else:
        n_valid = N
    for n0 in range(0, n_valid, BLOCK_N):
        pos, rows, in_range, active, _ = _row_block(row_idx_ptr, n_valid_ptr, n0, N, BLOCK_N, HAS_ROW_IDX)
        targets = tl.load(targets_ptr + rows, mask=active, other=0)
        lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
        g_logp = tl.load(g_logp_ptr + rows, mask=active, other=0.0)
        entropy = lse
        g_ent = lse
        if HAS_ENT_GRAD:
            entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
            g_ent = tl.load(g_ent_ptr + rows, mask=active, other=0.0)
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, active, cols, H, stride_hn, stride_hh, stride_wv, stride_wh,
            inv_temperature, V, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )
        grad = _grad_tile(z, cols, targets, lse, entropy, g_logp, g_ent, inv_temperature, HAS_ENT_GRAD)
        grad_t = tl.trans(grad.to(hidden_ptr.dtype.element_ty))
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H).to(tl.int64)
            k_in = ks < H
            h = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                mask=active[:, None] & k_in[None, :], other=0.0,
            )
            dw_ptrs = dw_ptr + cols[:, None] * stride_dv + ks[None, :]
            dw_mask = col_in[:, None] & k_in[None, :]
            dw = tl.load(dw_ptrs, mask=dw_mask, other=0.0)
            dw = _dot(grad_t, h, dw, DOT_PRECISION)
            tl.store(dw_ptrs, dw, mask=dw_mask)


def _check_common(hidden, weight, targets, row_idx, n_valid):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}] to match hidden, got {tuple(weight.shape)}")
    if hidden.dtype not in DOT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one of {DOT_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if V < 1 or H < 1:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if targets.shape != (N,) or targets.dtype != torch.int64 or not targets.is_contiguous():
        raise ValueError(f"targets must be contiguous int64 [{N}], got {targets.dtype} {tuple(targets.shape)}")
    if (row_idx is None) != (n_valid is None):
        raise ValueError("row_idx and n_valid must be given together")
    if row_idx is not None:
        if row_idx.shape != (N,) or row_idx.dtype != torch.int64 or not row_idx.is_contiguous():
            raise ValueError(f"row_idx must be contiguous int64 [{N}], got {row_idx.dtype} {tuple(row_idx.shape)}")
        if n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"n_valid must be a one-element int32/int64 tensor, got {n_valid.dtype} {tuple(n_valid.shape)}")
    for name, t in (("weight", weight), ("targets", targets), ("row_idx", row_idx), ("n_valid", n_valid)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} must be on {hidden.device}, got {t.device}")
    return N, V, H


def _dot_precision(dtype):
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    # fp32 inputs are meant to give fp32 results: plain TF32 would lose ~3 decimal digits, three
    # TF32 products recover them on tensor cores.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _configs(configs, dtype):
    return _FP32_CONFIGS if dtype == torch.float32 else configs


def hidden_logprob_fwd(hidden, weight, targets, *, temperature=1.0, row_idx=None, n_valid=None,
                       return_entropy=False, terms=None):
    """Per-token logp, lse (and entropy) of targets under softmax(hidden @ weight.T / temperature).

    hidden [N, H], weight [V, H] (same dtype, any strides), targets int64 [N] in [0, V) where valid.
    row_idx int64 [N] (a permutation of 0..N-1 with the valid tokens first) and n_valid (one-element
    tensor) select the valid tokens; masked tokens get 0 everywhere. `terms` (kernels.terms.TermsArgs)
    adds the epilogue. Returns (logp, lse, entropy or None, term or None, coef or None), fp32 [N].
    """
    N, V, H = _check_common(hidden, weight, targets, row_idx, n_valid)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp = torch.empty(N, **f32)
    lse = torch.empty(N, **f32)
    entropy = torch.empty(N, **f32) if return_entropy else None
    term_kwargs, term, coef = terms_kwargs(terms, N, logp)
    if N == 0:
        return logp, lse, entropy, term, coef
    kwargs = dict(
        hidden_ptr=hidden, weight_ptr=weight, targets_ptr=targets,
        row_idx_ptr=targets if row_idx is None else row_idx, n_valid_ptr=targets if n_valid is None else n_valid,
        logp_ptr=logp, lse_ptr=lse, entropy_ptr=logp if entropy is None else entropy,
        N=N, V=V, H=H,
        stride_hn=hidden.stride(0), stride_hh=hidden.stride(1), stride_wv=weight.stride(0), stride_wh=weight.stride(1),
        inv_temperature=1.0 / temperature,
        HAS_ROW_IDX=row_idx is not None, STORE_ENTROPY=return_entropy, DOT_PRECISION=_dot_precision(hidden.dtype),
        **term_kwargs,
    )
    launch(
        _hidden_fwd_kernel, _TUNED, _configs(_FWD_CONFIGS, hidden.dtype), _INTERPRET_CONFIG,
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), V, H, kwargs, key=["V", "H"],
    )
    return logp, lse, entropy, term, coef


def _bwd_kwargs(hidden, weight, targets, row_idx, n_valid, lse, entropy, g_logp, g_entropy, temperature, N, V, H):
    if g_logp.shape != (N,) or g_logp.dtype != torch.float32 or not g_logp.is_contiguous():
        raise ValueError(f"g_logp must be contiguous float32 [{N}], got {g_logp.dtype} {tuple(g_logp.shape)}")
    if g_entropy is not None and entropy is None:
        raise ValueError("entropy (from the forward) is required with g_entropy")
    return dict(
        hidden_ptr=hidden, weight_ptr=weight, targets_ptr=targets,
        row_idx_ptr=targets if row_idx is None else row_idx, n_valid_ptr=targets if n_valid is None else n_valid,
        lse_ptr=lse, entropy_ptr=lse if entropy is None else entropy,
        g_logp_ptr=g_logp, g_ent_ptr=g_logp if g_entropy is None else g_entropy,
        N=N, V=V, H=H,
        stride_hn=hidden.stride(0), stride_hh=hidden.stride(1), stride_wv=weight.stride(0), stride_wh=weight.stride(1),
        inv_temperature=1.0 / temperature,
        HAS_ROW_IDX=row_idx is not None, HAS_ENT_GRAD=g_entropy is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype),
    )


def hidden_logprob_bwd_dh(hidden, weight, targets, lse, g_logp, *, entropy=None, g_entropy=None,
                          temperature=1.0, row_idx=None, n_valid=None):
    """d hidden [N, H] (fp32) from per-token g_logp and optional g_entropy (fp32 [N])."""
    N, V, H = _check_common(hidden, weight, targets, row_idx, n_valid)
    dh = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return dh
    kwargs = _bwd_kwargs(hidden, weight, targets, row_idx, n_valid, lse, entropy, g_logp, g_entropy, temperature, N, V, H)
    launch(
        _hidden_bwd_dh_kernel, _TUNED, _configs(_DH_CONFIGS, hidden.dtype), _INTERPRET_CONFIG,
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), V, H, dict(kwargs, dh_ptr=dh, stride_dn=dh.stride(0)),
        key=["V", "H"], reset_to_zero=["dh_ptr"],
    )
    return dh


def hidden_logprob_bwd_dw(hidden, weight, targets, lse, g_logp, *, entropy=None, g_entropy=None,
                          temperature=1.0, row_idx=None, n_valid=None):
    """d weight [V, H] (fp32) from per-token g_logp and optional g_entropy (fp32 [N])."""
    N, V, H = _check_common(hidden, weight, targets, row_idx, n_valid)
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return dw
    kwargs = _bwd_kwargs(hidden, weight, targets, row_idx, n_valid, lse, entropy, g_logp, g_entropy, temperature, N, V, H)
    launch(
        _hidden_bwd_dw_kernel, _TUNED, _configs(_DW_CONFIGS, hidden.dtype), _INTERPRET_CONFIG,
        lambda meta: (triton.cdiv(V, meta["BLOCK_V"]),), V, H, dict(kwargs, dw_ptr=dw, stride_dv=dw.stride(0)),
        key=["V", "H"], reset_to_zero=["dw_ptr"],
    )
    return dw
