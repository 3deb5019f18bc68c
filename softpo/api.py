"""The public functional API and modules.

`token_logprobs` is the vocabulary sweep alone. `policy_loss` reads as its steps: validate (`softpo.checks`:
every input check, value checks and the valid-token counts read back in one host sync; with a process group,
one collective so that every rank decides alike), choose the route (`softpo.routes`, where the routes are
described), flatten, sweep, objective (`softpo.objectives`, the O(tokens) math written once).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checks, objectives, routes, sampling
from .config import LossConfig
from .lora import lm_head_weight

class LazyMetrics(Mapping):
    """A read-only dict of metrics computed at its first read.

    The metrics are most of an objective's small kernels and none of its gradient; read after the
    backward is queued (as a training loop logs), their launches overlap the GPU's work instead of
    delaying it. They are computed from the tensors the loss call was given: modify those in place
    before the first read and the metrics see the change.
    """

    def __init__(self, compute):
        self._compute = compute
        self._values = None

    def _get(self) -> dict[str, torch.Tensor]:
        if self._values is None:
            self._values, self._compute = self._compute(), None
        return self._values

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())

    def __repr__(self):
        return f"LazyMetrics({self._get()!r})"


@dataclass
class PolicyLossOutput:
    """loss: 0-d tensor to backprop. logp, entropy: targets' shape ([B, T], or packed [total]) fp32, detached
    (entropy None unless computed).
    metrics: 0-d detached tensors, computed at the first read (`LazyMetrics`; no host sync is forced,
    call .item() when logging)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)


def _rows(tensor):
    """[..., D] -> [N, D]: the sweeps take flat rows."""
    return None if tensor is None else tensor.reshape(-1, tensor.shape[-1])


def _local_targets(flat_targets, shard):
    """Global target ids -> ids within this rank's vocabulary rows (outside [0, V_r) on other ranks)."""
    return flat_targets if shard is None else flat_targets - shard.start


def token_logprobs(
    targets: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    batch_invariant: bool = False,
    return_entropy: bool = False,
    impl: str = "auto",
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
    memory: str = "default",
):
    """log softmax(z / temperature)[target] per token, without a tokens x vocabulary tensor.

    Args:
        targets: integer tensor of any shape [...]; position i of hidden/logits predicts targets[i]
            (already aligned: nothing is shifted here). Each token reads its own row only, so packed
            sequences (targets [total], hidden [total, H]) need no cu_seqlens here.
        hidden: [..., H] with weight [V, H] (z = hidden @ weight.T), or
        logits: [..., V], any float dtype and row stride.
        weight may also be the lm_head module itself: an nn.Linear without bias, or a PEFT LoRA layer,
            whose effective weight W + scale * B @ A is formed once per call so that the adapter's
            gradient flows (`softpo.lm_head_weight`; a head it cannot reproduce raises ValueError).
        temperature: z is divided by it, as in sampling: a float, or a float tensor with one value per
            sequence ([B] for targets [B, T]) or per token (the targets' shape); finite and > 0.
        logit_scale, softcap, top_k, top_p, min_p: the rest of the distribution a sampler draws from, in the
            order of transformers' generate: z = softcap tanh(z logit_scale / softcap) / temperature, then
            top-k, top-p (keeping at least one token) and min-p; log-probs and entropy are exact over the kept
            tokens, renormalized. A target outside its row's kept set gets logp -inf and no gradient. None,
            top_k=0, top_p=1 and min_p=0 keep every token. See docs/algorithms.md.
        batch_invariant: a row's log-prob, entropy and gradient with respect to its own hidden (or logits)
            row are bitwise the same whatever other rows share the call, in any order (same device, dtype,
            impl), at some speed (docs/performance.md).
        return_entropy: also return the entropy of the sampler's distribution per token.
        impl: "auto" (Triton for CUDA tensors, chunked torch otherwise), "torch" or "triton".
        inplace_backward: logits path on the Triton kernels only: the backward writes d logits over
            the logits' storage, saving one tokens x vocabulary buffer. Refused for leaf logits; any
            other autograd node that saved the logits then raises instead of reading gradients.
        process_group: a vocab-parallel lm_head (tensor parallelism): `weight` is this rank's
            contiguous shard of rows [V_r, H] (or `logits` is [..., V_r]), hidden and targets (global
            ids) are the same on every rank, and every rank gets the whole vocabulary's results.
            d weight (d logits) stays on its shard; d hidden is summed over the group.
        vocab_start: with process_group, the global id of this rank's first row; None takes the
            shards in rank order.
        reduce_hidden_grad: with process_group, False leaves d hidden as this shard's partial sum,
            for callers that reduce-scatter it themselves (sequence parallelism).
        memory: "default", or "flat" (hidden path): the backward forms d hidden token by token and
            d weight one block of vocabulary rows at a time, so no V x H fp32 accumulator is held
            (extra memory bounded whatever N and V are), at the cost of recomputing the logits once
            more (10NHV instead of 8NHV).

    Returns:
        logp [...] fp32, or (logp, entropy) when return_entropy; differentiable with respect to
        hidden/weight or logits.
    """
    weight = lm_head_weight(weight) if isinstance(weight, nn.Module) else weight
    sampler = dict(logit_scale=logit_scale, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p)
    (temperature, path, flat_memory, transform), shard = checks.decide(
        lambda: checks.validate_logprob_inputs(targets, hidden, weight, logits, temperature, memory, impl,
                                               inplace_backward, check_targets=process_group is None,
                                               sampler=sampler),
        process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad,
        targets=targets, hidden=hidden, weight=weight, logits=logits, entropy=bool(return_entropy),
    )
    logp, entropy = routes.logprob_sweep(
        path, _local_targets(targets.reshape(-1).long(), shard), hidden=_rows(hidden), weight=weight,
        logits=_rows(logits), temperature=temperature, return_entropy=return_entropy,
        inplace_backward=inplace_backward, shard=shard, flat_memory=flat_memory, transform=transform,
        batch_invariant=bool(batch_invariant),
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp


def policy_loss(
    config: LossConfig,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    q0: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    batch_invariant: bool = False,
    normalizer: torch.Tensor | float | None = None,
    entropy_gather=None,
    impl: str = "auto",
    process_group=None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
    memory: str = "default",
    cu_seqlens: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """The loss of `config` (a preset such as `softpo.SAPO`) from hidden states or logits.

    Shapes: targets, mask [B, T] (mask bool or 0/1; targets at masked positions are ignored);
    hidden [B, T, H] with weight [V, H], or logits [B, T, V]; advantages [B] or [B, T] (policy
    objectives); old_logp, ref_logp, rollout_logp [B, T] (old_logp None means on-policy: old =
    logp detached; ref_logp needed when beta > 0 and for SPO; rollout_logp turns on the sampler
    mismatch correction); importance_sampling_ratio [B, T] or [B, 1]: that correction's weight as the
    caller already has it (TRL's batch does), used as given instead of one from rollout_logp; rewards, q0 [B]
    (SPO); normalizer: the count the loss's sums are divided by ("token-mean": tokens, the "seq-mean-*"
    modes: sequences; e.g. the global count across ranks and accumulation steps), default the local one;
    entropy_gather: see `objectives.high_entropy_mask`.
    temperature ([B] per sequence, [B, T] per token, or a float; packed: [S] or [total]), logit_scale, softcap,
    top_k, top_p, min_p, batch_invariant: the sampler's distribution, as in `token_logprobs`. With truncation, a
    target outside its row's kept set (logp -inf) is left out of the objective as if masked (policy and KL terms,
    normalizers), and metrics["outside_support"] gives the fraction of unmasked tokens so treated. old_logp taken
    under the same truncation may be -inf at such tokens: they are left out the same way (their logp is then not
    computed: 0).
    process_group, vocab_start, reduce_hidden_grad: a vocab-parallel lm_head, as in `token_logprobs`;
    the objective then runs identically on every rank and every rank returns the same loss.
    memory: "default" or "flat", as in `token_logprobs`. Where the gradient is formed in the forward (see
    `softpo.routes`), flat forms only d hidden there and d weight in the backward, vocabulary-major, with no V x H
    fp32 accumulator (hidden path), or forms no gradient in the forward, whose d logits [N, V] would be
    held until the backward (logits path). On the logits path the default forms d logits in the forward
    and scales them by the loss's upstream gradient in the backward, in place: free when that gradient is
    1 (`loss.backward()`), one more pass over them otherwise, so fold constant factors into `normalizer`
    rather than the loss.
    cu_seqlens: packed sequences (no padding): an int32 or int64 tensor [S + 1], 0 first, non-decreasing, the
    number of tokens last (flash-attn's varlen convention). Then targets, mask, old_logp, ref_logp, rollout_logp
    are [total] (or [1, total]), hidden [total, H] or logits [total, V] (or with a leading 1), advantages [S]
    or [total], importance_sampling_ratio [total] or [S], rewards and q0 [S] (an [S] tensor is read as per
    sequence when S = total); logp and entropy come back in targets' shape. The result equals the padded call
    on [S, max length]; a Dr.GRPO normalizer ("seq-mean-token-sum-norm") needs `config.max_completion_length`.

    weight: a tensor [V, H], or the lm_head module (a PEFT LoRA layer included), as in `token_logprobs`.

    Returns a `PolicyLossOutput` with `.loss`, `.logp`, `.entropy` and `.metrics`.
    """
    weight = lm_head_weight(weight) if isinstance(weight, nn.Module) else weight
    inputs, shard = checks.decide(
        lambda: checks.validate_loss_inputs(
            config, targets, mask, advantages, hidden, weight, logits, old_logp, ref_logp, rollout_logp,
            importance_sampling_ratio, rewards, q0, temperature, normalizer, impl, memory,
            check_targets=process_group is None, cu_seqlens=cu_seqlens,
            sampler=dict(logit_scale=logit_scale, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p),
            batch_invariant=batch_invariant,
        ),
        process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad,
        targets=targets, hidden=hidden, weight=weight, logits=logits, where=lambda: mask != 0,
        entropy=isinstance(config, LossConfig) and config.needs_entropy,
    )
    route, tiles = routes.choose(config, inputs, hidden, weight, logits, shard, normalizer)
    flat_targets = _local_targets(torch.where(inputs.row_mask, targets.reshape(-1), 0).long(), shard)
    surrogate, terms, logp_rows, entropy_rows = routes.run(route, tiles, config, inputs, flat_targets, _rows(hidden),
                                                           weight, _rows(logits), normalizer, entropy_gather, shard)
    # The sweep's rows -> the objective's [B, T] (packed sequences: padded, O(tokens)).
    terms, logp, entropy = inputs.grid(terms), inputs.grid(logp_rows), inputs.grid(entropy_rows)
    V = shard.vocab if shard is not None else weight.shape[0] if hidden is not None else logits.shape[-1]
    mask, objective_logp, outside = _sampler_support(inputs, logp, V)
    loss, pieces = objectives.objective_loss(
        config, objective_logp, mask, inputs.advantages,
        old_logp=inputs.old_logp, ref_logp=inputs.ref_logp, rollout_logp=inputs.rollout_logp,
        rewards=inputs.rewards, q0=inputs.q0, entropy=entropy, normalizer=normalizer, terms=terms,
        importance_sampling_ratio=inputs.importance_sampling_ratio, entropy_gather=entropy_gather,
    )
    if surrogate is not None:
        # The value is the objective's own; the gradient is the one the fused sweep formed.
        formed = surrogate - surrogate.detach()
        scale = routes.truncation_scale(route, config, inputs, normalizer, outside)
        loss = loss.detach() + (formed if scale is None else formed * scale)
    metrics = functools.partial(objectives.objective_metrics, config, pieces)
    if outside is not None or inputs.outside_before is not None:
        metrics = functools.partial(_with_outside_support, metrics, outside, inputs)
    return PolicyLossOutput(
        loss=loss, logp=logp_rows.detach().view(targets.shape),
        entropy=None if entropy_rows is None else entropy_rows.detach().view(targets.shape),
        # A compiled step returns plain tensors; an eager call leaves the metrics' kernels for their first read.
        metrics=metrics() if torch.compiler.is_compiling() else LazyMetrics(metrics),
    )


def _sampler_support(inputs, logp, V):
    """(mask, logp for the objective, outside or None): with truncation, the tokens whose target lies outside
    the sampler's kept set (logp -inf) leave the mask, and their logp a finite stand-in (old_logp, else 0) so
    that no inf reaches the objective's math; no gradient reaches them (the stand-in is a constant)."""
    if not inputs.transform.truncates(V):
        return inputs.mask, logp, None
    outside = inputs.mask & (logp == float("-inf"))
    stand_in = inputs.old_logp if inputs.old_logp is not None else torch.zeros_like(logp)
    return inputs.mask & ~outside, torch.where(outside, stand_in.to(logp.dtype), logp), outside


def _with_outside_support(metrics, outside, inputs):
    """metrics() with the fraction of unmasked tokens left out as outside the kept set, now or when old_logp was
    taken (those already left `inputs.mask` at validation)."""
    values = metrics()
    before = inputs.outside_before
    outside = before if outside is None else outside if before is None else outside | before
    given = inputs.mask if before is None else inputs.mask | before
    values["outside_support"] = (outside.sum() / given.sum().clamp(min=1)).float().detach()
    return values


class PolicyLoss(nn.Module):
    """`policy_loss` with its config (and impl) stored: `PolicyLoss(softpo.SAPO)(targets, mask, adv, hidden=h, weight=w)`.

    process_group, vocab_start, reduce_hidden_grad: a vocab-parallel lm_head, as in `policy_loss`.
    logit_scale, softcap, top_k, top_p, min_p, batch_invariant: the sampler's settings, as in `policy_loss`
    (temperature, which may vary per call and per sequence, is passed to the call).
    """

    def __init__(self, config: LossConfig, impl: str = "auto", *, process_group=None, vocab_start: int | None = None,
                 reduce_hidden_grad: bool = True, memory: str = "default", logit_scale: float = 1.0,
                 softcap: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, batch_invariant: bool = False):
        super().__init__()
        self.sampler = dict(logit_scale=logit_scale, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p)
        sampling.check_sampling_args(**self.sampler)
        self.sampler["batch_invariant"] = batch_invariant
        checks.check_config(config)
        if impl not in checks.IMPLS:
            raise ValueError(f"impl must be one of {checks.IMPLS}, got {impl!r}")
        checks.check_memory(memory)
        self.config = config
        self.impl = impl
        self.shard = dict(process_group=process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad)
        self.memory = memory

    def forward(self, targets, mask, advantages=None, *, cu_seqlens=None, **kwargs) -> PolicyLossOutput:
        """`policy_loss`'s arguments after the config; cu_seqlens: packed sequences, as there."""
        kwargs.setdefault("impl", self.impl)
        kwargs.setdefault("memory", self.memory)
        for name, value in self.sampler.items():
            kwargs.setdefault(name, value)
        return policy_loss(self.config, targets, mask, advantages, **self.shard, cu_seqlens=cu_seqlens, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config.name!r}, impl={self.impl!r}"


class TokenLogprobs(nn.Module):
    """`token_logprobs` with temperature, entropy flag, impl and (for a vocab-parallel lm_head) the group stored;
    logit_scale, softcap, top_k, top_p, min_p and batch_invariant as in `token_logprobs`."""

    def __init__(self, temperature: float | torch.Tensor = 1.0, return_entropy: bool = False, impl: str = "auto", *,
                 process_group=None, vocab_start: int | None = None, reduce_hidden_grad: bool = True,
                 memory: str = "default", logit_scale: float = 1.0, softcap: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 batch_invariant: bool = False):
        super().__init__()
        checks.check_memory(memory)
        self.memory = memory
        # A tensor's shape and values are checked at the call, against the targets.
        self.temperature = temperature if isinstance(temperature, torch.Tensor) else checks.check_temperature(
            temperature)
        self.sampler = dict(logit_scale=logit_scale, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p)
        sampling.check_sampling_args(**self.sampler)
        self.sampler["batch_invariant"] = batch_invariant
        self.return_entropy = return_entropy
        self.impl = impl
        self.shard = dict(process_group=process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad)

    def forward(self, targets, *, hidden=None, weight=None, logits=None):
        return token_logprobs(
            targets, hidden=hidden, weight=weight, logits=logits,
            temperature=self.temperature, return_entropy=self.return_entropy, impl=self.impl, memory=self.memory,
            **self.sampler, **self.shard,
        )
