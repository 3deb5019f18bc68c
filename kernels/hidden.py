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

from ._common import (
    DOT_DTYPES,
    _grad_tile,
    _lse_merge,
    _online_lse,
    _row_block,
    check_rows,
    interpreting,
    launch,
    pick_config,
)
from .terms import _finish_rows, terms_kwargs

# Rows (max V, max H, config): the first row that admits the problem is the default, and all rows
# form the SOFTPO_AUTOTUNE sweep. Tiles are keyed on V, H and dtype, never on the token count.
# Chosen so that ptxas (sm_90) reports no register spills (4 bytes for d hidden at BLOCK_V 256);
# speeds are not yet measured.
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
_FP32_FWD_CONFIGS = [
    (4096, 256, _SMALL),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=2)),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=8, num_stages=2)),
]
_FP32_BWD_CONFIGS = [
    (4096, 256, _SMALL),
    (1 << 62, 1 << 62, _C({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=8, num_stages=2)),
]
DW_SCRATCH_BYTES = 1 << 28
DH_SPLIT_BYTES = 1 << 30
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
def _hidden_fwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr, row_idx_ptr, n_valid_ptr, state_ptr,
    logp_ptr, lse_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
    N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temperature, lo, hi, delta, tau_pos, tau_neg, beta,
    HAS_ROW_IDX: tl.constexpr, SPLIT: tl.constexpr, STORE_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_TERMS: tl.constexpr, GATE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_ISW: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (token blocks, vocabulary splits). With SPLIT, each program writes its rows' partial lse
    state (max, sum, entropy sum, target logit) to state [4, splits, N] for `_lse_combine_kernel`."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    pos, rows, in_range, active, n_valid = _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N, HAS_ROW_IDX)
    targets = tl.load(targets_ptr + rows, mask=active, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    v_per_split = tl.cdiv(tl.cdiv(V, n_splits), BLOCK_V) * BLOCK_V
    v_begin = split * v_per_split
    # Blocks made only of masked tokens run no vocabulary tile at all.
    v_end = tl.where(start < n_valid, tl.minimum(V, v_begin + v_per_split), v_begin)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, active, cols, H, stride_hn, stride_hh, stride_wv, stride_wh,
            inv_temperature, V, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )
        m, s, t = _online_lse(m, s, t, z)
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    if SPLIT:
        plane = n_splits.to(tl.int64) * N
        state = state_ptr + split.to(tl.int64) * N + rows
        tl.store(state, m, mask=in_range)
        tl.store(state + plane, s, mask=in_range)
        tl.store(state + 2 * plane, t, mask=in_range)
        tl.store(state + 3 * plane, z_target, mask=in_range)
    else:
        _finish_rows(
            m, s, t, z_target, rows, in_range, active, logp_ptr, lse_ptr, entropy_ptr,
            adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr, lo, hi, delta, tau_pos, tau_neg, beta,
            STORE_ENTROPY, HAS_TERMS, GATE, HAS_OLD, HAS_DELTA, HAS_ISW, KL, KL_RATIO,
        )


@triton.jit
def _lse_combine_kernel(
    state_ptr, row_idx_ptr, n_valid_ptr,
    logp_ptr, lse_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
    N, n_splits,
    lo, hi, delta, tau_pos, tau_neg, beta,
    HAS_ROW_IDX: tl.constexpr, STORE_ENTROPY: tl.constexpr,
    HAS_TERMS: tl.constexpr, GATE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_ISW: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Merge the vocabulary splits' partial states in split order (deterministic), then finish."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    pos, rows, in_range, active, n_valid = _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N, HAS_ROW_IDX)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    plane = n_splits.to(tl.int64) * N
    state = state_ptr + rows
    for _ in range(0, n_splits):
        m2 = tl.load(state, mask=active, other=float("-inf"))
        s2 = tl.load(state + plane, mask=active, other=0.0)
        t2 = tl.load(state + 2 * plane, mask=active, other=0.0)
        m, s, t = _lse_merge(m, s, t, m2, s2, t2)
        z_target += tl.load(state + 3 * plane, mask=active, other=0.0)
        state += N
    _finish_rows(
        m, s, t, z_target, rows, in_range, active, logp_ptr, lse_ptr, entropy_ptr,
        adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr, lo, hi, delta, tau_pos, tau_neg, beta,
        STORE_ENTROPY, HAS_TERMS, GATE, HAS_OLD, HAS_DELTA, HAS_ISW, KL, KL_RATIO,
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
    """d hidden (fp32, zero-initialized) [splits, N, H]: grid (token blocks, vocabulary splits); each
    program owns BLOCK_N rows of its split's plane and sweeps that split's share of the vocabulary."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    dh_ptr += split.to(tl.int64) * N * stride_dn
    pos, rows, in_range, active, n_valid = _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N, HAS_ROW_IDX)
    targets = tl.load(targets_ptr + rows, mask=active, other=0)
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=active, other=0.0)
    entropy = lse
    g_ent = lse
    if HAS_ENT_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=active, other=0.0)
    v_per_split = tl.cdiv(tl.cdiv(V, n_splits), BLOCK_V) * BLOCK_V
    v_begin = split * v_per_split
    v_end = tl.where(start < n_valid, tl.minimum(V, v_begin + v_per_split), v_begin)
    for v0 in range(v_begin, v_end, BLOCK_V):
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
    N, V, H, v_start,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dv,
    inv_temperature,
    HAS_ROW_IDX: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """d weight (fp32, zero-initialized) of the V vocabulary rows that start at v_start in the full
    vocabulary (weight_ptr points at the first): each program owns BLOCK_V rows, sweeps the valid tokens."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = cols < V
    if HAS_ROW_IDX:
        n_valid = tl.load(n_valid_ptr).to(tl.int64)
    else:
        n_valid = N
    for n0 in range(0, n_valid, BLOCK_N):
        pos, rows, in_range, active, _ = _row_block(row_idx_ptr, n_valid_ptr, n0, N, BLOCK_N, HAS_ROW_IDX)
        targets = tl.load(targets_ptr + rows, mask=active, other=0) - v_start
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
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {hidden.shape} and {weight.shape}")
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}] to match hidden, got {tuple(weight.shape)}")
    if hidden.dtype not in DOT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one of {DOT_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if V < 1 or H < 1:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on {hidden.device}, got {weight.device}")
    check_rows(N, hidden.device, targets, row_idx, n_valid)
    return N, V, H


def _dot_precision(dtype):
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    # fp32 inputs are meant to give fp32 results: plain TF32 would lose ~3 decimal digits, three
    # TF32 products recover them on tensor cores.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _configs(configs, fp32_configs, dtype):
    return fp32_configs if dtype == torch.float32 else configs


def _vocab_splits(N, V, H, dtype, device, configs, fp32_configs):
    """Vocabulary splits that give enough programs to fill every SM twice when tokens are few."""
    if interpreting() or device.type != "cuda":
        return 1
    meta = pick_config(_configs(configs, fp32_configs, dtype), V, H).kwargs
    programs = triton.cdiv(N, meta["BLOCK_N"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # Each split keeps at least 16 vocabulary tiles, so the partial states stay cheap next to the sweep.
    return max(1, min(triton.cdiv(2 * sms, programs), V // (16 * meta["BLOCK_V"])))


def hidden_logprob_fwd(hidden, weight, targets, *, temperature=1.0, row_idx=None, n_valid=None,
                       return_entropy=False, terms=None, vocab_splits=None):
    """Per-token logp, lse (and entropy) of targets under softmax(hidden @ weight.T / temperature).

    hidden [N, H], weight [V, H] (same dtype, any strides), targets int64 [N] in [0, V) where valid.
    row_idx int64 [N] (a permutation of 0..N-1 with the valid tokens first) and n_valid (one-element
    tensor) select the valid tokens; masked tokens get 0 everywhere. `terms` (kernels.terms.TermsArgs)
    adds the epilogue. vocab_splits: programs per token block, each sweeping a share of the
    vocabulary (None: enough to fill the GPU). Returns (logp, lse, entropy or None, term or None,
    coef or None), fp32 [N].
    """
    N, V, H = _check_common(hidden, weight, targets, row_idx, n_valid)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if vocab_splits is None:
        vocab_splits = _vocab_splits(N, V, H, hidden.dtype, hidden.device, _FWD_CONFIGS, _FP32_FWD_CONFIGS)
    if not (isinstance(vocab_splits, int) and 1 <= vocab_splits <= 65535):
        raise ValueError(f"vocab_splits must be an int in [1, 65535], got {vocab_splits!r}")
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp = torch.empty(N, **f32)
    lse = torch.empty(N, **f32)
    entropy = torch.empty(N, **f32) if return_entropy else None
    term_kwargs, term, coef = terms_kwargs(terms, N, logp)
    if N == 0:
        return logp, lse, entropy, term, coef
    split = vocab_splits > 1
    state = torch.empty(4, vocab_splits, N, **f32) if split else logp
    rows = dict(
        row_idx_ptr=targets if row_idx is None else row_idx, n_valid_ptr=targets if n_valid is None else n_valid,
        logp_ptr=logp, lse_ptr=lse, entropy_ptr=logp if entropy is None else entropy,
        HAS_ROW_IDX=row_idx is not None, STORE_ENTROPY=return_entropy, **term_kwargs,
    )
    kwargs = dict(
        rows, hidden_ptr=hidden, weight_ptr=weight, targets_ptr=targets, state_ptr=state,
        N=N, V=V, H=H,
        stride_hn=hidden.stride(0), stride_hh=hidden.stride(1), stride_wv=weight.stride(0), stride_wh=weight.stride(1),
        inv_temperature=1.0 / temperature, SPLIT=split, DOT_PRECISION=_dot_precision(hidden.dtype),
    )
    launch(
        _hidden_fwd_kernel, _TUNED, _configs(_FWD_CONFIGS, _FP32_FWD_CONFIGS, hidden.dtype), _INTERPRET_CONFIG,
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), vocab_splits), V, H, kwargs, key=["V", "H"],
    )
    if split:
        BLOCK_N = 16 if interpreting() else 128
        _lse_combine_kernel[(triton.cdiv(N, BLOCK_N),)](
            state_ptr=state, N=N, n_splits=vocab_splits, BLOCK_N=BLOCK_N, **rows,
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
                          temperature=1.0, row_idx=None, n_valid=None, vocab_splits=None):
    """d hidden [N, H] in the hidden's dtype (summed in fp32) from per-token g_logp and optional g_entropy.

    vocab_splits > 1 gives each token block several programs, each summing a share of the
    vocabulary into its own fp32 plane; the planes are then added in a fixed order.
    """
    N, V, H = _check_common(hidden, weight, targets, row_idx, n_valid)
    if vocab_splits is None:
        vocab_splits = _vocab_splits(N, V, H, hidden.dtype, hidden.device, _DH_CONFIGS, _FP32_BWD_CONFIGS)
        # The planes cost N * H * 4 bytes each: stay within DH_SPLIT_BYTES.
        vocab_splits = max(1, min(vocab_splits, DH_SPLIT_BYTES // max(1, 4 * N * H)))
    if not (isinstance(vocab_splits, int) and 1 <= vocab_splits <= 65535):
        raise ValueError(f"vocab_splits must be an int in [1, 65535], got {vocab_splits!r}")
    dh = torch.zeros(vocab_splits, N, H, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return dh[0].to(hidden.dtype)
    kwargs = _bwd_kwargs(
        hidden, weight, targets, row_idx, n_valid, lse, entropy, g_logp, g_entropy, temperature, N, V, H
    )
    launch(
        _hidden_bwd_dh_kernel, _TUNED, _configs(_DH_CONFIGS, _FP32_BWD_CONFIGS, hidden.dtype), _INTERPRET_CONFIG,
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), vocab_splits), V, H,
        dict(kwargs, dh_ptr=dh, stride_dn=dh.stride(1)), key=["V", "H"], reset_to_zero=["dh_ptr"],
    )
    return (dh[0] if vocab_splits == 1 else dh.sum(0)).to(hidden.dtype)


def hidden_logprob_bwd_dw(hidden, weight, targets, lse, g_logp, *, entropy=None, g_entropy=None,
                          temperature=1.0, row_idx=None, n_valid=None):
    """d weight [V, H] in the weight's dtype from per-token g_logp and optional g_entropy (fp32 [N]).

    Sums run in fp32. For half-precision weights the fp32 accumulator is a scratch of at most
    DW_SCRATCH_BYTES reused across vocabulary chunks, not a [V, H] fp32 copy (2.5 GB at V = 151936,
    H = 4096); each element's sum has the same order whatever the chunking.
    """
    N, V, H = _check_common(hidden, weight, targets, row_idx, n_valid)
    if N == 0:
        return torch.zeros(V, H, dtype=weight.dtype, device=weight.device)
    kwargs = _bwd_kwargs(
        hidden, weight, targets, row_idx, n_valid, lse, entropy, g_logp, g_entropy, temperature, N, V, H
    )
    dw = torch.empty(V, H, dtype=weight.dtype, device=weight.device)
    direct = weight.dtype == torch.float32
    chunk = V if direct else max(1, min(V, DW_SCRATCH_BYTES // (4 * H)))
    scratch = None if direct else torch.empty(chunk, H, dtype=torch.float32, device=weight.device)
    configs = _configs(_DW_CONFIGS, _FP32_BWD_CONFIGS, hidden.dtype)
    for v0 in range(0, V, chunk):
        rows = min(chunk, V - v0)
        acc = dw[v0 : v0 + rows] if direct else scratch[:rows]
        acc.zero_()
        launch(
            _hidden_bwd_dw_kernel, _TUNED, configs, _INTERPRET_CONFIG,
            lambda meta: (triton.cdiv(rows, meta["BLOCK_V"]),), rows, H,
            dict(kwargs, weight_ptr=weight[v0 : v0 + rows], V=rows, v_start=v0, dw_ptr=acc, stride_dv=acc.stride(0)),
            key=["V", "H"], reset_to_zero=["dw_ptr"],
        )
        if not direct:
            dw[v0 : v0 + rows].copy_(acc)
    return dw
