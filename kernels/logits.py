"""Logits path: per-token log-prob, lse and entropy from logits [N, V] of any float dtype and row stride.

Tokens sit on grid axis 0 (limit 2**31 - 1), so any number of rows works. The forward reads each
row once; the backward reads it once more and writes d logits, optionally into the logits' own
storage (each element is read and then written by the same program, so in place is safe). For a loss
linear in the token-level terms, the forward itself can write d logits (`logits_loss_fwd`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _grad_tile, _online_lse, _process, _row_block, _split_lse, check_rows, interpreting, launch
from .terms import _finish_rows, terms_kwargs

LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

# (max V, config). Both passes stream the logits once and are bound by memory: one row per
# program with a wide vocabulary tile keeps enough bytes in flight (bench/tune_logits.py; on an H100
# at N=16384, V=151936 bf16 the forward reads at 2.3 TB/s and the backward reads and writes at 2.85
# TB/s, against a 3.0 TB/s copy; bench/NOTES.md).
_C = triton.Config
_SMALL_V = (2048, _C({"BLOCK_N": 8, "BLOCK_V": 256}, num_warps=4, num_stages=2))
_FWD_CONFIGS = [
    _SMALL_V,
    (1 << 62, _C({"BLOCK_N": 1, "BLOCK_V": 4096}, num_warps=4, num_stages=2)),
    (1 << 62, _C({"BLOCK_N": 1, "BLOCK_V": 2048}, num_warps=4, num_stages=2)),
    (1 << 62, _C({"BLOCK_N": 4, "BLOCK_V": 2048}, num_warps=8, num_stages=2)),
]
_BWD_CONFIGS = [
    _SMALL_V,
    (1 << 62, _C({"BLOCK_N": 1, "BLOCK_V": 4096}, num_warps=8, num_stages=2)),
    (1 << 62, _C({"BLOCK_N": 1, "BLOCK_V": 8192}, num_warps=8, num_stages=2)),
    (1 << 62, _C({"BLOCK_N": 4, "BLOCK_V": 2048}, num_warps=8, num_stages=2)),
]
_INTERPRET_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_V": 64}, num_warps=4, num_stages=1)
_TUNED: dict = {}


@triton.jit
def _row_transform(inv_temp_ptr, threshold_ptr, rows, active, inv_temperature, logit_scale, BLOCK_N: tl.constexpr,
                   HAS_ROW_TEMPERATURE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_THRESHOLD: tl.constexpr):
    """The rows' factor after the softcap (1 / temperature, times logit_scale without a softcap) and threshold."""
    if HAS_ROW_TEMPERATURE:
        factor = tl.load(inv_temp_ptr + rows, mask=active, other=1.0)
    else:
        factor = tl.full((BLOCK_N,), inv_temperature, tl.float32)
    if HAS_SOFTCAP:
        # The scale goes inside the tanh.
        factor = factor * 1.0
    else:
        factor = factor * logit_scale
    threshold = factor
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + rows, mask=active, other=float("-inf"))
    return factor, threshold


@triton.jit
def _load_z(logits_ptr, rows, active, cols, V, stride_ln, stride_lv, factor, threshold, logit_scale, softcap,
            inv_softcap, HAS_SOFTCAP: tl.constexpr, KEEP_MINUS_INF: tl.constexpr, HAS_THRESHOLD: tl.constexpr):
    """A tile of processed logits in fp32, -inf where absent or below the threshold, and d z / d logits."""
    x = tl.load(
        logits_ptr + rows[:, None] * stride_ln + cols[None, :] * stride_lv,
        mask=active[:, None] & (cols < V)[None, :], other=float("-inf"),
    )
    return _process(x.to(tl.float32), factor[:, None], threshold[:, None], logit_scale, softcap, inv_softcap,
                    HAS_SOFTCAP, KEEP_MINUS_INF, HAS_THRESHOLD)


@triton.jit
def _target_excluded(logits_ptr, rows, active, targets, V, stride_ln, stride_lv, factor, threshold, logit_scale,
                     softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr, KEEP_MINUS_INF: tl.constexpr):
    """Whether each row's target lies in its vocabulary range but below the threshold (log-prob -inf)."""
    in_vocab = active & (targets >= 0) & (targets < V)
    x = tl.load(logits_ptr + rows * stride_ln + targets * stride_lv, mask=in_vocab, other=0.0)
    z, _ = _process(x.to(tl.float32), factor, threshold, logit_scale, softcap, inv_softcap,
                    HAS_SOFTCAP, KEEP_MINUS_INF, True)
    return in_vocab & (z == float("-inf"))


@triton.jit
def _store_grad_rows(
    logits_ptr, dlogits_ptr, rows, in_range, active, targets, m, log_s, entropy, g_logp, g_ent,
    V, stride_ln, stride_lv, stride_dn, stride_dv, factor, threshold, logit_scale, softcap, inv_softcap,
    HAS_SOFTCAP: tl.constexpr, KEEP_MINUS_INF: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Sweep the rows once more and write their d logits; masked rows get zeros (outputs are never pre-zeroed)."""
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z, chain = _load_z(logits_ptr, rows, active, cols, V, stride_ln, stride_lv, factor, threshold, logit_scale,
                           softcap, inv_softcap, HAS_SOFTCAP, KEEP_MINUS_INF, HAS_THRESHOLD)
        grad = _grad_tile(z, chain, cols, targets, m, log_s, entropy, g_logp, g_ent, HAS_ENT_GRAD)
        grad = tl.where(active[:, None], grad, 0.0)
        tl.store(
            dlogits_ptr + rows[:, None] * stride_dn + cols[None, :] * stride_dv,
            grad.to(dlogits_ptr.dtype.element_ty),
            mask=in_range[:, None] & (cols < V)[None, :],
        )


@triton.jit
def _logits_fwd_kernel(
    logits_ptr, targets_ptr, row_idx_ptr, n_valid_ptr, inv_temp_ptr, threshold_ptr,
    logp_ptr, lse_ptr, lse_low_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
    w_term_ptr, w_ent_ptr, dlogits_ptr,
    N, V,
    stride_ln, stride_lv, stride_dn, stride_dv,
    inv_temperature, logit_scale, softcap, inv_softcap,
    lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
    HAS_ROW_IDX: tl.constexpr, STORE_ENTROPY: tl.constexpr,
    HAS_TERMS: tl.constexpr, GATE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_ISW: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr, IS_BOUND: tl.constexpr,
    GRAD_IN_FWD: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
    HAS_ROW_TEMPERATURE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, KEEP_MINUS_INF: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, STORE_LSE_LOW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    pos, rows, in_range, active, n_valid = _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N, HAS_ROW_IDX)
    targets = tl.load(targets_ptr + rows, mask=active, other=0)
    factor, threshold = _row_transform(inv_temp_ptr, threshold_ptr, rows, active, inv_temperature, logit_scale,
                                       BLOCK_N, HAS_ROW_TEMPERATURE, HAS_SOFTCAP, HAS_THRESHOLD)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    v_stop = tl.where(start < n_valid, V, 0)
    for v0 in range(0, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z, _ = _load_z(logits_ptr, rows, active, cols, V, stride_ln, stride_lv, factor, threshold, logit_scale,
                       softcap, inv_softcap, HAS_SOFTCAP, KEEP_MINUS_INF, HAS_THRESHOLD)
        m, s, t = _online_lse(m, s, t, z)
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    log_s, lse, entropy, coef = _finish_rows(
        m, s, t, z_target, rows, in_range, active, logp_ptr, lse_ptr, entropy_ptr,
        adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr, lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
        STORE_ENTROPY, HAS_TERMS, GATE, HAS_OLD, HAS_DELTA, HAS_ISW, KL, KL_RATIO, IS_BOUND,
    )
    if STORE_LSE_LOW:
        tl.store(lse_low_ptr + rows, tl.where(active, _split_lse(m, log_s), 0.0), mask=in_range)
    if GRAD_IN_FWD:
        # The loss is linear in the terms and the entropy, with weights known before the sweep, so the rows'
        # gradient follows from their lse at once, while their logits may still sit in L2.
        g_logp = tl.load(w_term_ptr + rows, mask=active, other=0.0) * coef
        g_ent = g_logp
        if HAS_ENT_GRAD:
            g_ent = tl.load(w_ent_ptr + rows, mask=active, other=0.0)
        if HAS_THRESHOLD:
            # A target outside the kept set has log-prob -inf whatever the logits: no gradient flows from it, and
            # its row leaves the loss as if masked, entropy bonus included.
            g_logp = tl.where(z_target == float("-inf"), 0.0, g_logp)
            if HAS_ENT_GRAD:
                g_ent = tl.where(z_target == float("-inf"), 0.0, g_ent)
        _store_grad_rows(
            logits_ptr, dlogits_ptr, rows, in_range, active, targets, m, log_s, entropy, g_logp, g_ent,
            V, stride_ln, stride_lv, stride_dn, stride_dv, factor, threshold, logit_scale, softcap, inv_softcap,
            HAS_SOFTCAP, KEEP_MINUS_INF, HAS_THRESHOLD, HAS_ENT_GRAD, BLOCK_V,
        )


@triton.jit
def _logits_bwd_kernel(
    logits_ptr, targets_ptr, row_idx_ptr, n_valid_ptr, inv_temp_ptr, threshold_ptr,
    lse_ptr, lse_low_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dlogits_ptr,
    N, V,
    stride_ln, stride_lv, stride_dn, stride_dv,
    inv_temperature, logit_scale, softcap, inv_softcap,
    HAS_ROW_IDX: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
    HAS_ROW_TEMPERATURE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, KEEP_MINUS_INF: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, HAS_LSE_LOW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    pos, rows, in_range, active, n_valid = _row_block(row_idx_ptr, n_valid_ptr, start, N, BLOCK_N, HAS_ROW_IDX)
    targets = tl.load(targets_ptr + rows, mask=active, other=0)
    factor, threshold = _row_transform(inv_temp_ptr, threshold_ptr, rows, active, inv_temperature, logit_scale,
                                       BLOCK_N, HAS_ROW_TEMPERATURE, HAS_SOFTCAP, HAS_THRESHOLD)
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    # log p = (z - lse) - lse_low: with the forward's rounding error of lse, as precise as (z - max) - log sum.
    lse_low = tl.zeros_like(lse)
    if HAS_LSE_LOW:
        lse_low = tl.load(lse_low_ptr + rows, mask=active, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=active, other=0.0)
    if HAS_THRESHOLD:
        excluded = _target_excluded(logits_ptr, rows, active, targets, V, stride_ln, stride_lv, factor, threshold,
                                    logit_scale, softcap, inv_softcap, HAS_SOFTCAP, KEEP_MINUS_INF)
        g_logp = tl.where(excluded, 0.0, g_logp)
    entropy = lse
    g_ent = lse
    if HAS_ENT_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=active, other=0.0)
    _store_grad_rows(
        logits_ptr, dlogits_ptr, rows, in_range, active, targets, lse, lse_low, entropy, g_logp, g_ent,
        V, stride_ln, stride_lv, stride_dn, stride_dv, factor, threshold, logit_scale, softcap, inv_softcap,
        HAS_SOFTCAP, KEEP_MINUS_INF, HAS_THRESHOLD, HAS_ENT_GRAD, BLOCK_V,
    )


def _check(logits, targets, row_idx, n_valid):
    # softpo.api validated the inputs; these asserts only document the launchers' contract.
    assert logits.dim() == 2 and logits.shape[1] >= 1, tuple(logits.shape)
    assert logits.dtype in LOGIT_DTYPES, logits.dtype
    N, V = logits.shape
    check_rows(N, logits.device, targets, row_idx, n_valid)
    return N, V


def _row_tensor(x, N, device, name):
    assert x.shape == (N,) and x.dtype == torch.float32 and x.is_contiguous() and x.device == device, (
        f"{name}: want contiguous float32 [{N}] on {device}")
    return x


def transform_kwargs(N, device, temperature=1.0, logit_scale=1.0, softcap=None, threshold=None):
    """Kernel arguments of the sampler's transform of the logits (what `softpo.sampling.process` computes):
    z = x logit_scale, then softcap tanh(z / softcap), then z / temperature, then z < threshold dropped.

    temperature: a float > 0 or fp32 [N] (per row); threshold: fp32 [N] in processed-logit space or None.
    """
    row_temperature = isinstance(temperature, torch.Tensor)
    if row_temperature:
        # One division per row here; the kernels multiply.
        inv_temp = 1.0 / _row_tensor(temperature, N, device, "temperature")
    else:
        assert temperature > 0, temperature
    assert logit_scale != 0 and (softcap is None or softcap > 0), (logit_scale, softcap)
    has_threshold = threshold is not None
    return dict(
        inv_temp_ptr=inv_temp if row_temperature else None,
        threshold_ptr=_row_tensor(threshold, N, device, "threshold") if has_threshold else None,
        inv_temperature=1.0 if row_temperature else 1.0 / temperature, logit_scale=float(logit_scale),
        softcap=float(softcap or 1.0), inv_softcap=1.0 / float(softcap or 1.0),
        HAS_ROW_TEMPERATURE=row_temperature, HAS_SOFTCAP=softcap is not None,
        # Only a softcap or a negative scale could turn a -inf logit (or an absent column) into a finite one.
        KEEP_MINUS_INF=softcap is not None or logit_scale < 0, HAS_THRESHOLD=has_threshold,
    )


def _fill_pointers(kwargs, dummy):
    return {k: dummy if (k.endswith("_ptr") and v is None) else v for k, v in kwargs.items()}


def logits_logprob_fwd(logits, targets, *, temperature=1.0, row_idx=None, n_valid=None,
                       return_entropy=False, terms=None, logit_scale=1.0, softcap=None, threshold=None,
                       lse_low=None):
    """Per-token logp, lse (and entropy) of targets under the distribution a sampler draws from:
    softmax over the kept tokens of z = softcap tanh(logits logit_scale / softcap) / temperature.

    logits [N, V] with any strides; targets int64 [N] (a target outside [0, V) selects no logit: its
    logp is -lse); row_idx / n_valid: the valid-first row order (`softpo.rows.valid_first`), masked
    rows skipped; terms: the epilogue's inputs (`kernels.terms.TermsArgs`) or None.
    temperature: a float or fp32 [N] (one per row); logit_scale: a float != 0 applied first; softcap: None
    or a float > 0; threshold: None or fp32 [N], processed logits below it are dropped (top-k, top-p, min-p;
    `softpo.sampling` finds it): a target below it gets logp -inf. lse_low: None or an fp32 [N] buffer that
    receives the rounding error of lse, for `logits_logprob_bwd(lse_low=)`.
    Returns (logp, lse, entropy or None, term or None, coef or None), fp32 [N]; lse and entropy are those of
    the kept tokens.
    """
    transform = transform_kwargs(logits.shape[0], logits.device, temperature, logit_scale, softcap, threshold)
    return _logits_fwd(logits, targets, transform, row_idx, n_valid, return_entropy, terms, lse_low=lse_low)[:5]


def logits_loss_fwd(logits, targets, terms, w_term, w_entropy=None, *, temperature=1.0, row_idx=None,
                    n_valid=None, return_entropy=False, logit_scale=1.0, softcap=None, threshold=None, lse_low=None):
    """`logits_logprob_fwd` with terms that also writes d loss / d logits, for a loss linear in the terms and
    the entropy: loss = sum(w_term * term) + sum(w_entropy * entropy) (plus what does not depend on logits).

    w_term, w_entropy: fp32 [N] (w_entropy None: no entropy in the loss). Each row is read once more right
    after its log-sum-exp and its gradient written, so forward and backward take two reads and one write of
    the logits instead of three reads and one write. Returns (logp, lse, entropy or None, term, coef,
    d_logits [N, V] in the logits' dtype, contiguous; masked rows zero). The sampler's transform as in
    `logits_logprob_fwd`; rows whose target lies below the threshold get no gradient (they leave the loss).
    """
    assert terms is not None, "the gradient is that of the terms' loss"
    for w in (w_term, w_entropy):
        assert w is None or (w.shape == targets.shape and w.dtype == torch.float32 and w.is_contiguous())
    transform = transform_kwargs(logits.shape[0], logits.device, temperature, logit_scale, softcap, threshold)
    return _logits_fwd(logits, targets, transform, row_idx, n_valid, return_entropy, terms, (w_term, w_entropy),
                       lse_low)


def _logits_fwd(logits, targets, transform, row_idx, n_valid, return_entropy, terms, loss_weights=None,
                lse_low=None):
    N, V = _check(logits, targets, row_idx, n_valid)
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(N, **f32)
    lse = torch.empty(N, **f32)
    entropy = torch.empty(N, **f32) if return_entropy else None
    if lse_low is not None:
        _row_tensor(lse_low, N, logits.device, "lse_low")
    term_kwargs, term, coef = terms_kwargs(terms, N, logp)
    w_term, w_entropy = (None, None) if loss_weights is None else loss_weights
    d_logits = None if loss_weights is None else torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    if N == 0:
        return logp, lse, entropy, term, coef, d_logits
    kwargs = dict(
        logits_ptr=logits, targets_ptr=targets, row_idx_ptr=row_idx, n_valid_ptr=n_valid,
        logp_ptr=logp, lse_ptr=lse, lse_low_ptr=lse_low, entropy_ptr=entropy,
        w_term_ptr=w_term, w_ent_ptr=w_entropy, dlogits_ptr=d_logits,
        N=N, V=V, stride_ln=logits.stride(0), stride_lv=logits.stride(1),
        stride_dn=V if d_logits is None else d_logits.stride(0), stride_dv=1,
        HAS_ROW_IDX=row_idx is not None, STORE_ENTROPY=return_entropy,
        GRAD_IN_FWD=d_logits is not None, HAS_ENT_GRAD=w_entropy is not None, STORE_LSE_LOW=lse_low is not None,
        **term_kwargs, **transform,
    )
    # Absent optional tensors: any pointer of the right kind, never read behind its flag.
    kwargs = _fill_pointers(kwargs, logp)
    kwargs.update(
        row_idx_ptr=targets if row_idx is None else row_idx, n_valid_ptr=targets if n_valid is None else n_valid,
        dlogits_ptr=logits if d_logits is None else d_logits,
    )
    launch(
        _logits_fwd_kernel, _TUNED, _FWD_CONFIGS, _INTERPRET_CONFIG,
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), V, kwargs, key=["V"],
    )
    return logp, lse, entropy, term, coef, d_logits


def logits_logprob_bwd(logits, targets, lse, g_logp, *, entropy=None, g_entropy=None, temperature=1.0,
                       row_idx=None, n_valid=None, out=None, logit_scale=1.0, softcap=None, threshold=None,
                       lse_low=None):
    """d logits [N, V] in the logits' dtype from per-token g_logp and optional g_entropy (fp32 [N]).

    `out` (same shape and dtype as logits) receives the result; passing `logits` itself writes the
    gradient over the logits in place. Masked rows get zeros. temperature, logit_scale, softcap and
    threshold as in the forward; lse_low: the forward's rounding error of lse (None: taken as 0, which
    loses precision once logits are large). A target below its threshold contributes no gradient.
    """
    N, V = _check(logits, targets, row_idx, n_valid)
    assert g_logp.shape == (N,) and g_logp.dtype == torch.float32 and g_logp.is_contiguous()
    assert g_entropy is None or entropy is not None, "g_entropy needs the forward's entropy"
    transform = transform_kwargs(N, logits.device, temperature, logit_scale, softcap, threshold)
    if lse_low is not None:
        _row_tensor(lse_low, N, logits.device, "lse_low")
    if out is None:
        out = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    assert out.shape == logits.shape and out.dtype == logits.dtype and out.device == logits.device
    inplace = out.data_ptr() == logits.data_ptr()
    assert not inplace or out.stride() == logits.stride(), "in place needs the logits' strides"
    if N == 0:
        return out
    kwargs = dict(
        logits_ptr=logits, targets_ptr=targets,
        row_idx_ptr=targets if row_idx is None else row_idx, n_valid_ptr=targets if n_valid is None else n_valid,
        lse_ptr=lse, lse_low_ptr=lse_low, entropy_ptr=entropy,
        g_logp_ptr=g_logp, g_ent_ptr=g_entropy, dlogits_ptr=out,
        N=N, V=V, stride_ln=logits.stride(0), stride_lv=logits.stride(1),
        stride_dn=out.stride(0), stride_dv=out.stride(1),
        HAS_ROW_IDX=row_idx is not None, HAS_ENT_GRAD=g_entropy is not None, HAS_LSE_LOW=lse_low is not None,
        **transform,
    )
    kwargs = _fill_pointers(kwargs, lse)
    # When tuning in place, every trial must start from the logits, not the previous trial's gradient.
    tune = dict(restore_value=["logits_ptr"]) if inplace else {}
    launch(
        _logits_bwd_kernel, _TUNED, _BWD_CONFIGS, _INTERPRET_CONFIG,
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), V, kwargs, key=["V"], **tune,
    )
    return out


@triton.jit
def _scale_kernel(x_ptr, g_ptr, numel, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    # Read on the device, so that the common upstream gradient of 1 costs neither a pass nor a host sync.
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < numel)
        tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=offs < numel)


def scale_(x, g):
    """x *= g in place, x contiguous of any float dtype, g a one-element tensor on x's device; nothing is
    read or written when g == 1."""
    assert x.is_contiguous() and g.numel() == 1 and g.device == x.device
    if x.numel() == 0:
        return x
    BLOCK = 1024 if interpreting() else 8192
    _scale_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, g.reshape(1), x.numel(), BLOCK=BLOCK)
    return x
