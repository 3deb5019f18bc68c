"""Triton kernels of softpo: vocabulary sweeps from hidden states or logits to per-token log-probs.

logits.py: from logits [N, V] of any float dtype and strides; the hidden path (softpo.triton_ops) feeds
it [tokens, V] tiles of hidden @ weight.T from the matmul library.
terms.py: the forward epilogue's gates and KL estimators (token-level objectives).
_common.py: the online log-sum-exp, row blocks (masking), config selection.
Only kernels, their configs and plain launchers live here; autograd is in softpo.triton_ops.
"""

from .logits import logits_logprob_bwd, logits_logprob_fwd, logits_loss_fwd, scale_
from .terms import (
    GATE_CLIP,
    GATE_SOFT,
    GATE_TRUNCATED,
    IS_AS_GIVEN,
    IS_MASK,
    IS_TRUNCATE,
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
    "IS_AS_GIVEN",
    "IS_MASK",
    "IS_TRUNCATE",
    "KL_K1",
    "KL_K2",
    "KL_K3",
    "KL_NONE",
    "TermsArgs",
    "logits_logprob_bwd",
    "logits_logprob_fwd",
    "logits_loss_fwd",
    "scale_",
    "token_terms",
]
