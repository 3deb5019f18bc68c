"""Per-token policy terms evaluated in the epilogue of a forward sweep.

Each function returns (value, coef) with coef = d value / d logp, so that the backward sweep only
needs grad_logp = grad_term * coef. Each is the twin of a torch function in softpo.objectives and
is pinned to it by tests/test_gates.py; ties follow torch's autograd conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import _finish_lse, interpreting

GATE_CLIP, GATE_SOFT, GATE_TRUNCATED = 0, 1, 2
KL_NONE, KL_K1, KL_K2, KL_K3 = 0, 1, 2, 3
IS_AS_GIVEN, IS_TRUNCATE, IS_MASK = 0, 1, 2
# The same codes as compile-time constants, for the kernels' branches.
_CLIP: tl.constexpr = tl.constexpr(GATE_CLIP)
_SOFT: tl.constexpr = tl.constexpr(GATE_SOFT)
_NO_KL: tl.constexpr = tl.constexpr(KL_NONE)
_K1: tl.constexpr = tl.constexpr(KL_K1)
_K2: tl.constexpr = tl.constexpr(KL_K2)
_TRUNCATE: tl.constexpr = tl.constexpr(IS_TRUNCATE)
_MASK: tl.constexpr = tl.constexpr(IS_MASK)
# softpo.objectives.LOG_RATIO_LIMIT: exponentials of log-ratios are taken at most at this exponent.
LOG_RATIO_LIMIT: tl.constexpr = tl.constexpr(20.0)


@triton.jit
def _bounded_exp(x, limit):
    """(exp(min(x, limit)), its derivative): like torch's clamp, the derivative is 0 beyond the limit."""
    e = tl.exp(tl.minimum(x, limit))
    return e, tl.where(x <= limit, e, 0.0)


@triton.jit
def _clip_gate(r, dr, adv, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """-min(u A, clamp(r, lo, hi) A), u = min(r, delta) with a dual clip, else r; dr = d r / d logp."""
    c = tl.minimum(tl.maximum(r, lo), hi)
    dc = tl.where((r >= lo) & (r <= hi), dr, 0.0)
    if HAS_DELTA:
        u = tl.minimum(r, delta)
        du = tl.where(r <= delta, dr, 0.0)
    else:
        u = r
        du = dr
    a = u * adv
    b = c * adv
    # Ties (torch.minimum splits their gradient evenly) need A = 0 or u = c inside the clip range,
    # where du = dc: taking dc for them is exact.
    return -tl.minimum(a, b), -adv * tl.where(a < b, du, dc)


@triton.jit
def _soft_gate(r, dr, adv, tau_pos, tau_neg):
    """-sigmoid(tau (r - 1)) 4 / tau A, tau chosen by the sign of A."""
    tau = tl.where(adv > 0, tau_pos, tau_neg)
    x = tau * (r - 1.0)
    s = tl.sigmoid(x)
    # sigmoid(-x) rather than 1 - s, which loses all precision once the gate saturates.
    return -s * (4.0 / tau) * adv, -4.0 * s * tl.sigmoid(-x) * dr * adv


@triton.jit
def _truncated_gate(r, adv, logp, floor, cap):
    """-stopgrad(clamp(r, floor, cap)) A logp: REINFORCE weighted by the clamped ratio."""
    w = tl.minimum(tl.maximum(r, floor), cap)
    return -w * adv * logp, -w * adv


@triton.jit
def _kl_estimate(logp, ref, KL: tl.constexpr):
    """(value, d value / d logp, their sum) of an estimate of KL(pi || pi_ref) from d = log pi_ref - log pi
    (Schulman's k1, k2, k3). The sum is formed without cancellation for the bias-corrected KL."""
    d = ref - logp
    if KL == _K1:
        value = -d
        deriv = tl.full(d.shape, 1.0, tl.float32)
        total = 1.0 - d
    elif KL == _K2:
        value = d * d * 0.5
        deriv = -d
        total = value - d
    else:
        e, de = _bounded_exp(d, LOG_RATIO_LIMIT)
        # e - d - 1 loses every digit as d -> 0; there the series of exp(d) - 1 - d, exact to 4e-7.
        series = d * d * (0.5 + d * (1.0 / 6 + d * (1.0 / 24 + d * (1.0 / 120 + d * (1.0 / 720)))))
        value = tl.where(tl.abs(d) < 0.25, series, e - d - 1.0)
        deriv = 1.0 - de
        total = tl.where(d <= LOG_RATIO_LIMIT, -d, e - d)
    return value, deriv, total


@triton.jit
def _bound_weight(w, is_lo, is_hi, IS_BOUND: tl.constexpr):
    """The sampler-mismatch weight clipped to (IS_TRUNCATE) or zeroed outside (IS_MASK) [is_lo, is_hi]."""
    if IS_BOUND == _TRUNCATE:
        w = tl.minimum(tl.maximum(w, is_lo), is_hi)
    elif IS_BOUND == _MASK:
        w = tl.where((w < is_lo) | (w > is_hi), 0.0, w)
    return w


@triton.jit
def _token_terms(
    logp, adv, old, ref, isw,
    lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
    GATE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_ISW: tl.constexpr,
    KL: tl.constexpr, KL_RATIO: tl.constexpr, IS_BOUND: tl.constexpr,
):
    """(term, d term / d logp) of one token-level policy objective; absent inputs are ignored."""
    if HAS_OLD:
        r, dr = _bounded_exp(logp - old, LOG_RATIO_LIMIT)
    else:
        # On-policy: the ratio is exactly 1 and its derivative wrt logp is r = 1.
        r = tl.full(logp.shape, 1.0, tl.float32)
        dr = r
    if GATE == _CLIP:
        value, coef = _clip_gate(r, dr, adv, lo, hi, delta, HAS_DELTA)
    elif GATE == _SOFT:
        value, coef = _soft_gate(r, dr, adv, tau_pos, tau_neg)
    else:
        value, coef = _truncated_gate(r, adv, logp, lo, hi)
    if HAS_ISW:
        isw = _bound_weight(isw, is_lo, is_hi, IS_BOUND)
        value = value * isw
        coef = coef * isw
    if KL != _NO_KL:
        kl, dkl, kl_plus_dkl = _kl_estimate(logp, ref, KL)
        if KL_RATIO:
            # d (kl r) = dkl r + kl dr, where dr is r below the ratio's cap and 0 above it.
            dkl = r * tl.where(dr == r, kl_plus_dkl, dkl)
            kl = kl * r
        value = value + beta * kl
        coef = coef + beta * dkl
    return value, coef


@triton.jit
def _terms_epilogue(
    logp, rows, in_range, active,
    adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
    lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
    GATE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_ISW: tl.constexpr,
    KL: tl.constexpr, KL_RATIO: tl.constexpr, IS_BOUND: tl.constexpr,
):
    """Load a block's per-token inputs at `rows`, evaluate the terms, store term and coef (0 if masked);
    returns coef."""
    adv = tl.load(adv_ptr + rows, mask=active, other=0.0).to(tl.float32)
    old = logp
    ref = logp
    isw = logp
    if HAS_OLD:
        old = tl.load(old_ptr + rows, mask=active, other=0.0).to(tl.float32)
    if KL != _NO_KL:
        ref = tl.load(ref_ptr + rows, mask=active, other=0.0).to(tl.float32)
    if HAS_ISW:
        isw = tl.load(isw_ptr + rows, mask=active, other=0.0).to(tl.float32)
    value, coef = _token_terms(
        logp, adv, old, ref, isw, lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
        GATE, HAS_OLD, HAS_DELTA, HAS_ISW, KL, KL_RATIO, IS_BOUND,
    )
    coef = tl.where(active, coef, 0.0)
    tl.store(term_ptr + rows, tl.where(active, value, 0.0), mask=in_range)
    tl.store(coef_ptr + rows, coef, mask=in_range)
    return coef


@triton.jit
def _finish_rows(
    m, s, t, z_target, rows, in_range, active,
    logp_ptr, lse_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
    lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
    STORE_ENTROPY: tl.constexpr, HAS_TERMS: tl.constexpr, GATE: tl.constexpr, HAS_OLD: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_ISW: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr,
    IS_BOUND: tl.constexpr,
):
    """End of every forward sweep: logp, lse, entropy and the epilogue from the rows' lse state.
    Returns (log s, lse, entropy, coef), coef 0 without terms."""
    log_s, lse, entropy = _finish_lse(m, s, t)
    # Relative to the row's max: z_target - lse would cancel once logits are large.
    logp = tl.where(active, (z_target - m) - log_s, 0.0)
    tl.store(logp_ptr + rows, logp, mask=in_range)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=in_range)
    if STORE_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(active, entropy, 0.0), mask=in_range)
    coef = tl.zeros_like(logp)
    if HAS_TERMS:
        coef = _terms_epilogue(
            logp, rows, in_range, active, adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
            lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
            GATE, HAS_OLD, HAS_DELTA, HAS_ISW, KL, KL_RATIO, IS_BOUND,
        )
    return log_s, lse, entropy, coef


@triton.jit
def _token_terms_kernel(
    logp_ptr, valid_ptr,
    adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
    N,
    lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi,
    GATE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_ISW: tl.constexpr,
    KL: tl.constexpr, KL_RATIO: tl.constexpr, IS_BOUND: tl.constexpr,
    HAS_TERMS: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < N
    active = in_range
    if HAS_VALID:
        active = active & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
    logp = tl.load(logp_ptr + rows, mask=active, other=0.0).to(tl.float32)
    _terms_epilogue(
        logp, rows, in_range, active, adv_ptr, old_ptr, ref_ptr, isw_ptr, term_ptr, coef_ptr,
        lo, hi, delta, tau_pos, tau_neg, beta, is_lo, is_hi, GATE, HAS_OLD, HAS_DELTA, HAS_ISW, KL, KL_RATIO,
        IS_BOUND,
    )


@dataclass
class TermsArgs:
    """Per-token inputs and settings of the epilogue, as forward-kernel keyword arguments.

    lo, hi: the clip range of the ratio (clip gate); the floor and cap of the truncated gate.
    kl: KL_NONE (no KL term), KL_K1, KL_K2 or KL_K3.
    is_bound: IS_AS_GIVEN, IS_TRUNCATE (clip is_weight to [is_lo, is_hi]) or IS_MASK (zero it outside).
    """

    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    is_weight: torch.Tensor | None = None
    gate: int = GATE_CLIP
    lo: float = 0.8
    hi: float = 1.2
    delta: float | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.0
    beta: float = 0.0
    kl: int = KL_NONE
    kl_ratio: bool = False
    is_bound: int = IS_AS_GIVEN
    is_lo: float = 0.0
    is_hi: float = float("inf")

    def check(self, N: int, device) -> None:
        """The launchers' contract (asserted: softpo.fused.terms_args builds these from validated input)."""
        for name in ("advantages", "old_logp", "ref_logp", "is_weight"):
            t = getattr(self, name)
            assert t is None or (t.shape == (N,) and t.dtype == torch.float32 and t.device == device
                                 and t.is_contiguous()), f"{name}: want contiguous float32 [{N}] on {device}"
        assert self.gate in (GATE_CLIP, GATE_SOFT, GATE_TRUNCATED), self.gate
        assert self.is_bound in (IS_AS_GIVEN, IS_TRUNCATE, IS_MASK), self.is_bound
        assert self.kl in (KL_NONE, KL_K1, KL_K2, KL_K3), self.kl
        assert self.kl == KL_NONE or self.ref_logp is not None, "ref_logp is required when kl is not KL_NONE"


def terms_kwargs(terms: TermsArgs | None, N: int, dummy: torch.Tensor):
    """Keyword arguments for a forward kernel's epilogue, and the (term, coef) outputs it writes."""
    if terms is None:
        kwargs = dict(
            adv_ptr=dummy, old_ptr=dummy, ref_ptr=dummy, isw_ptr=dummy, term_ptr=dummy, coef_ptr=dummy,
            lo=0.0, hi=0.0, delta=0.0, tau_pos=1.0, tau_neg=1.0, beta=0.0, is_lo=0.0, is_hi=0.0,
            GATE=0, HAS_OLD=False, HAS_DELTA=False, HAS_ISW=False, KL=0, KL_RATIO=False, IS_BOUND=0,
            HAS_TERMS=False,
        )
        return kwargs, None, None
    terms.check(N, dummy.device)
    term = torch.empty(N, dtype=torch.float32, device=dummy.device)
    coef = torch.empty(N, dtype=torch.float32, device=dummy.device)
    pick = lambda t: dummy if t is None else t  # noqa: E731
    kwargs = dict(
        adv_ptr=terms.advantages, old_ptr=pick(terms.old_logp), ref_ptr=pick(terms.ref_logp),
        isw_ptr=pick(terms.is_weight), term_ptr=term, coef_ptr=coef,
        lo=float(terms.lo), hi=float(terms.hi), delta=float(terms.delta or 0.0),
        tau_pos=float(terms.tau_pos), tau_neg=float(terms.tau_neg), beta=float(terms.beta),
        is_lo=float(terms.is_lo), is_hi=float(terms.is_hi),
        GATE=terms.gate, HAS_OLD=terms.old_logp is not None, HAS_DELTA=terms.delta is not None,
        HAS_ISW=terms.is_weight is not None, KL=terms.kl, KL_RATIO=bool(terms.kl_ratio),
        IS_BOUND=terms.is_bound if terms.is_weight is not None else IS_AS_GIVEN, HAS_TERMS=True,
    )
    return kwargs, term, coef


def token_terms(logp: torch.Tensor, terms: TermsArgs, valid: torch.Tensor | None = None):
    """Evaluate the epilogue alone on given log-probs: (term, coef), both float32 [N].

    The same @triton.jit functions run at the end of every forward sweep; this launcher lets the
    tests pin them to their torch twins and serves callers that already hold logp.
    """
    if logp.dim() != 1 or logp.dtype != torch.float32:
        raise ValueError(f"logp must be float32 [N], got {logp.dtype} {tuple(logp.shape)}")
    N = logp.shape[0]
    if valid is not None and (valid.shape != (N,) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be bool [{N}], got {valid.dtype} {tuple(valid.shape)}")
    logp = logp.contiguous()
    kwargs, term, coef = terms_kwargs(terms, N, logp)
    BLOCK = 128 if interpreting() else 1024
    _token_terms_kernel[(triton.cdiv(N, BLOCK),)](
        logp_ptr=logp, valid_ptr=logp if valid is None else valid.contiguous(), N=N,
        HAS_VALID=valid is not None, BLOCK=BLOCK, **kwargs,
    )
    return term, coef
