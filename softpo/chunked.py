"""The chunked torch vocabulary sweep: the CPU path, and the fallback wherever Triton is not used.

Same contract as the Triton kernels: per-token log-prob of the target under softmax(z / temperature),
optional entropy, and gradients back to hidden/weight or logits, without ever holding a tokens x
vocabulary tensor. Tokens are processed in chunks and the vocabulary in chunks with an online
log-sum-exp; the backward recomputes each logits tile from the saved per-token lse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A tile of TOKEN_CHUNK x VOCAB_CHUNK fp32 logits is 64 MiB; a few live temporaries of that size
# bound the extra memory whatever N and V are.
TOKEN_CHUNK = 4096
VOCAB_CHUNK = 4096


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and single precision inputs; float64 inputs keep float64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SweepArgs:
    temperature: float
    return_entropy: bool
    token_chunk: int = TOKEN_CHUNK
    vocab_chunk: int = VOCAB_CHUNK


def _online_update(z, running_max, running_sum, running_pz, track_pz):
    """Fold one [n, v] tile of scaled logits into the running max / sum exp / sum exp * z."""
    new_max = torch.maximum(running_max, z.amax(dim=-1))
    rescale = torch.exp(running_max - new_max)
    e = torch.exp(z - new_max.unsqueeze(-1))
    running_sum = running_sum * rescale + e.sum(-1)
    if track_pz:
        running_pz = running_pz * rescale + (e * z).sum(-1)
    return new_max, running_sum, running_pz


def _tile_grad(z, lse, entropy, rows_targets, col_offset, g_logp, g_entropy, temperature):
    """d loss / d raw logits for one tile, given upstream grads of logp and entropy per token."""
    log_p = z - lse.unsqueeze(-1)
    p = torch.exp(log_p)
    grad = -p * g_logp.unsqueeze(-1)
    local = rows_targets - col_offset
    inside = (local >= 0) & (local < z.shape[1])
    if inside.any():
        rows = inside.nonzero().squeeze(-1)
        grad[rows, local[rows]] += g_logp[rows]
    if g_entropy is not None:
        # dH/dz_v = -p_v (log p_v + H)
        grad -= p * (log_p + entropy.unsqueeze(-1)) * g_entropy.unsqueeze(-1)
    return grad / temperature


class ChunkedHiddenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, valid_rows, args: SweepArgs):
        # An unused entropy output then arrives as None and its gradient term is skipped.
        ctx.set_materialize_grads(False)
        N = hidden.shape[0]
        V = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        logp = hidden.new_zeros(N, dtype=acc)
        entropy = hidden.new_zeros(N, dtype=acc) if args.return_entropy else None
        lse_all = hidden.new_zeros(N, dtype=acc)
        for start in range(0, valid_rows.numel(), args.token_chunk):
            rows = valid_rows[start : start + args.token_chunk]
            h = hidden[rows].to(acc)
            t = targets[rows]
            n = rows.numel()
            running_max = h.new_full((n,), float("-inf"))
            running_sum = h.new_zeros(n)
            running_pz = h.new_zeros(n)
            target_logit = h.new_zeros(n)
            for v0 in range(0, V, args.vocab_chunk):
                z = (h @ weight[v0 : v0 + args.vocab_chunk].to(acc).T) / args.temperature
                running_max, running_sum, running_pz = _online_update(
                    z, running_max, running_sum, running_pz, args.return_entropy
                )
                local = t - v0
                inside = (local >= 0) & (local < z.shape[1])
                picked = z.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
                target_logit = torch.where(inside, picked, target_logit)
            lse = running_max + torch.log(running_sum)
            lse_all[rows] = lse
            logp[rows] = target_logit - lse
            if entropy is not None:
                entropy[rows] = lse - running_pz / running_sum
        ctx.save_for_backward(hidden, weight, targets, valid_rows, lse_all, entropy if entropy is not None else lse_all)
        ctx.args = args
        if entropy is None:
            return logp
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, targets, valid_rows, lse_all, entropy_all = ctx.saved_tensors
        args: SweepArgs = ctx.args
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse_all.dtype
        d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        if g_logp is None:
            g_logp = torch.zeros_like(lse_all)
        V = weight.shape[0]
        for start in range(0, valid_rows.numel(), args.token_chunk):
            rows = valid_rows[start : start + args.token_chunk]
            h = hidden[rows].to(acc)
            t = targets[rows]
            lse = lse_all[rows]
            gl = g_logp[rows].to(acc)
            ge = g_entropy[rows].to(acc) if g_entropy is not None else None
            ent = entropy_all[rows] if ge is not None else None
            dh = torch.zeros_like(h) if need_hidden else None
            for v0 in range(0, V, args.vocab_chunk):
                w = weight[v0 : v0 + args.vocab_chunk].to(acc)
                z = (h @ w.T) / args.temperature
                grad = _tile_grad(z, lse, ent, t, v0, gl, ge, args.temperature)
                if need_hidden:
                    dh += grad @ w
                if need_weight:
                    d_weight[v0 : v0 + args.vocab_chunk] += grad.T @ h
            if need_hidden:
                d_hidden[rows] = dh
        return (
            d_hidden.to(hidden.dtype) if need_hidden else None,
            d_weight.to(weight.dtype) if need_weight else None,
            None,
            None,
            None,
        )


class ChunkedLogitsLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, valid_rows, args: SweepArgs):
        ctx.set_materialize_grads(False)
        N = logits.shape[0]
        acc = accumulation_dtype(logits.dtype)
        logp = logits.new_zeros(N, dtype=acc)
        entropy = logits.new_zeros(N, dtype=acc) if args.return_entropy else None
        lse_all = logits.new_zeros(N, dtype=acc)
        for start in range(0, valid_rows.numel(), args.token_chunk):
            rows = valid_rows[start : start + args.token_chunk]
            z = logits[rows].to(acc) / args.temperature
            lse = torch.logsumexp(z, dim=-1)
            lse_all[rows] = lse
            logp[rows] = z.gather(1, targets[rows].unsqueeze(1)).squeeze(1) - lse
            if entropy is not None:
                entropy[rows] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(logits, targets, valid_rows, lse_all, entropy if entropy is not None else lse_all)
        ctx.args = args
        if entropy is None:
            return logp
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy=None):
        logits, targets, valid_rows, lse_all, entropy_all = ctx.saved_tensors
        args: SweepArgs = ctx.args
        d_logits = torch.zeros_like(logits)
        if g_logp is None:
            g_logp = torch.zeros_like(lse_all)
        for start in range(0, valid_rows.numel(), args.token_chunk):
            rows = valid_rows[start : start + args.token_chunk]
            z = logits[rows].to(lse_all.dtype) / args.temperature
            ge = g_entropy[rows].to(lse_all.dtype) if g_entropy is not None else None
            ent = entropy_all[rows] if ge is not None else None
            grad = _tile_grad(z, lse_all[rows], ent, targets[rows], 0, g_logp[rows].to(lse_all.dtype), ge, args.temperature)
            d_logits[rows] = grad.to(logits.dtype)
        return d_logits, None, None, None


def chunked_token_logprobs(
    targets: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    valid: torch.Tensor | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
):
    """Flat inputs (targets [N], hidden [N, H] + weight [V, H] or logits [N, V], valid [N] bool) ->
    (logp [N], entropy [N] or None), fp32 (float64 for float64 inputs). Rows where `valid` is False get 0 and zero gradient."""
    N = targets.shape[0]
    device = targets.device
    valid_rows = torch.arange(N, device=device) if valid is None else valid.nonzero().squeeze(-1)
    args = SweepArgs(
        float(temperature), bool(return_entropy), token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK
    )
    if logits is not None:
        out = ChunkedLogitsLogprob.apply(logits, targets, valid_rows, args)
    else:
        out = ChunkedHiddenLogprob.apply(hidden, weight, targets, valid_rows, args)
    if return_entropy:
        return out
    return out, None
