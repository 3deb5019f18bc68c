"""Triton kernels of softpo: vocabulary sweeps from hidden states or logits to per-token log-probs.

hidden.py: from hidden [N, H] and weight [V, H], logits tiles computed in-kernel (tl.dot).
logits.py: from logits [N, V] of any float dtype and strides.
terms.py: the forward epilogue's gates and KL estimators (token-level objectives).
_common.py: the online log-sum-exp, row blocks (masking), config selection.
Only kernels, their configs and plain launchers live here; autograd is in softpo.triton_ops.
"""

from .hidden import hidden_logprob_bwd_dh, hidden_logprob_bwd_dw, hidden_logprob_fwd
from .logits import logits_logprob_bwd, logits_logprob_fwd
from .terms import (
    GATE_CLIP,
    GATE_SOFT,
    GATE_TRUNCATED,
    KL_K1,
    KL_K2,
    KL_K3,
    KL_NONE,
    TermsArgs,
    token_terms,
)

__all__ = [
    "GATE_CLIP",
    "GATE_SOFT",
    "GATE_TRUNCATED",
    "KL_K1",
    "KL_K2",
    "KL_K3",
    "KL_NONE",
    "TermsArgs",
    "hidden_logprob_bwd_dh",
    "hidden_logprob_bwd_dw",
    "hidden_logprob_fwd",
    "logits_logprob_bwd",
    "logits_logprob_fwd",
    "token_terms",
]
