"""Packed sequences: S sequences back to back in one row of tokens, delimited by `cu_seqlens` [S + 1] (the
flash-attn varlen convention: 0 first, non-decreasing, the last entry the number of tokens).

The vocabulary sweep runs on the packed rows as they are (it is per token). The objective is written on
[S, T] (`softpo.objectives`, T the longest sequence); only O(tokens) tensors move between the two layouts,
through one index map built per call. No padded hidden state or logits tensor is ever built.
"""

from __future__ import annotations

import torch


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The sum of `values` [N] over each sequence of `cu_seqlens`, [S], without a host sync.

    Boundaries are clamped into [0, N] first, so that a bad cu_seqlens (which validation reports in the same
    sync that reads these sums) indexes nothing out of range."""
    N = values.numel()
    running = torch.cat([values.new_zeros(1), values.cumsum(0)])
    bounds = cu_seqlens.long().clamp(0, N)
    return running[bounds[1:]] - running[bounds[:-1]]


class PackedLayout:
    """The map between the packed rows [N] and the padded [S, T] layout of S sequences (T the longest).

    lengths: each sequence's number of tokens, read on the host (a shape needs T). The map is two int64
    tensors of N entries: each row's sequence and its position in the padded layout.
    """

    def __init__(self, cu_seqlens: torch.Tensor, lengths: list[int]):
        S, N = len(lengths), sum(lengths)
        T = max(lengths, default=0)
        self.total = N
        self.shape = (S, T)
        device = cu_seqlens.device
        starts = cu_seqlens[:-1].long()
        self.sequence = torch.repeat_interleave(torch.arange(S, device=device), cu_seqlens.diff().long(),
                                                output_size=N)
        self.slot = self.sequence * T + torch.arange(N, device=device) - starts[self.sequence]

    def to_padded(self, rows: torch.Tensor, fill=0) -> torch.Tensor:
        """[N] -> [S, T], `fill` between sequences; differentiable."""
        S, T = self.shape
        return rows.new_full((S * T,), fill).index_put((self.slot,), rows).view(S, T)

    def to_rows(self, padded: torch.Tensor) -> torch.Tensor:
        """[S, T], or one column [S, 1] per sequence, -> [N]; differentiable."""
        S, T = self.shape
        if padded.shape[-1] == 1:
            return padded.reshape(S).index_select(0, self.sequence)
        return padded.reshape(S * T).index_select(0, self.slot)
