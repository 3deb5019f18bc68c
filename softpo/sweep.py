"""What the two vocabulary sweeps share: the dtypes they take, the precision they accumulate in, their
settings, and the guard that puts a kernel's inputs where the kernel needs them.

The chunked torch sweep (`softpo.chunked`) and the Triton sweep (`softpo.tiles`, `softpo.fused`) take the
same inputs and settings; each adds its own fields to `SweepArgs`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .sampling import SamplerTransform

# What both sweeps take (fp8 and other float types have no kernel path).
SWEEP_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and single precision inputs; float64 inputs keep float64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, kw_only=True)
class SweepArgs:
    """The settings of a sweep besides its tensors.

    temperature: a float, or fp32 [N] (one per token); transform: the sampler's other settings
    (`softpo.sampling.SamplerTransform`: scale, softcap, truncation); batch_invariant: each row's results
    computed in shapes that do not depend on the other rows (`invariant_rows`).
    shard: this rank's place in a vocab-parallel lm_head (`softpo.vocab_parallel.VocabShard`; targets are
    then ids local to the shard); flat_memory: the hidden path's backward in two passes (token-major
    d hidden, vocabulary-major d weight), no V x H fp32 accumulator.
    """

    temperature: float | torch.Tensor
    return_entropy: bool
    shard: object = None
    flat_memory: bool = False
    transform: SamplerTransform = SamplerTransform()
    batch_invariant: bool = False


@dataclass(frozen=True, kw_only=True)
class Sweep(SweepArgs):
    """The Triton sweep's tensors and settings besides the differentiable inputs.

    targets int64 [N]; row_idx / n_valid: the valid-first token order (`softpo.rows.valid_first`; None: all
    valid) and valid_count, the number of valid tokens when the caller has read it already (None: read it
    when needed); terms: the epilogue's per-token inputs and settings (`kernels.terms.TermsArgs`; None:
    log-prob mode); inplace_backward: the logits path's backward writes d logits over the logits.
    """

    targets: torch.Tensor
    row_idx: torch.Tensor | None = None
    n_valid: torch.Tensor | None = None
    valid_count: int | None = None
    inplace_backward: bool = False
    terms: object = None


def invariant_rows(device: torch.device) -> int:
    """Rows per matmul (and per threshold search) under batch_invariant: a fixed shape, padded, whatever N is,
    so that the library picks the same reduction order for every row. On CPU one row: BLAS kernels may treat
    a row differently by its position in the block."""
    return 64 if device.type == "cuda" else 1


def lse_rounding(m: torch.Tensor, log_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, lo): lse = fl(m + log s) and its rounding error (two-sum), so that a later sweep forms
    (z - lse) - lo = (z - m) - log s as precisely as log_softmax does, at any logit offset."""
    lse = m + log_s
    b = lse - m
    lo = (m - (lse - b)) + (log_s - b)
    return lse, torch.where(torch.isfinite(lse), lo, torch.zeros_like(lo))


def per_token(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A per-token input of a kernel (upstream gradients, loss weights, epilogue inputs) as it must arrive:
    detached, contiguous fp32."""
    return None if tensor is None else tensor.detach().float().contiguous()


def on_device(tensor: torch.Tensor):
    """Context in which a kernel launches on `tensor`'s CUDA device.

    Triton launches on the current CUDA device, which need not hold the tensors (a model split over GPUs in
    one process). Backwards need no guard: autograd runs them on their gradients' device.
    """
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
