"""Which tokens a sweep visits, and in which pieces: row selection for both paths, in one place.

Masked tokens cost nothing: the sweeps visit only the valid ones. The Triton kernels take every row
in a valid-first order and skip the rest by count (no host sync); the host-side loops (the chunked
path, the hidden path's matmul tiles) take the valid rows' positions, in chunks.
"""

from __future__ import annotations

import torch


def valid_first(valid: torch.Tensor | None):
    """(row_idx, n_valid): every token, valid ones first (in order), and how many are valid; (None, None)
    when all are."""
    if valid is None:
        return None, None
    row_idx = torch.argsort(valid.to(torch.uint8), descending=True, stable=True)
    return row_idx, valid.sum(dtype=torch.int64).reshape(1)


def valid_rows(row_idx: torch.Tensor | None, n_valid: torch.Tensor | None,
               count: int | None = None) -> torch.Tensor | None:
    """The valid rows' positions (None: every row). Without `count` (how many, when the caller has read it
    already) one host sync reads how many there are."""
    if row_idx is None:
        return None
    return row_idx[: int(n_valid) if count is None else count]


def chunks(n: int, step: int, rows: torch.Tensor | None):
    """Index of each chunk of `step` rows among n: a slice when `rows` is None (every row), else positions."""
    for c0 in range(0, n, step):
        yield slice(c0, min(c0 + step, n)) if rows is None else rows[c0:c0 + step]


def take(t: torch.Tensor | None, idx):
    """Rows `idx` of t (a view for a slice, a copy for positions)."""
    if t is None:
        return None
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def put(full: torch.Tensor, idx, part: torch.Tensor) -> None:
    """Write `part` into rows `idx` of `full`."""
    if isinstance(idx, slice):
        full[idx] = part
    else:
        full.index_copy_(0, idx, part)
