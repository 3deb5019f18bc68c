"""The route a loss takes through the vocabulary sweep, decided once (`choose`) and run (`run`).

- plain: the log-prob (and entropy) sweep, then the objective in torch. Every objective on both paths; the
  only route for the chunked torch path, a vocab-parallel lm_head (a token's log-prob is known only after
  the group combines) and a compiled call (torch.compile sees the sweep as one opaque custom op).
- terms: Triton, token-level objectives: the forward kernel's epilogue evaluates each token's gate and KL,
  so one launch yields the per-token terms and the coefficient their backward needs.
- gradient: terms with gradients wanted: the loss is linear in the terms and the entropy, so the gradient is
  formed during the forward sweep. Hidden path: each logits tile becomes its gradient, no logits
  recomputed (memory="flat": only d hidden, d weight then taking the backward's vocabulary-major pass
  instead of a V x H fp32 accumulator). Logits path: the forward kernel writes each row's d logits right
  after its log-sum-exp (two reads and one write of the logits instead of three reads and one write; not
  with memory="flat", which allocates d logits in the backward only, so that takes "terms").
- sequence-gradient: gradient on the hidden path for sequence-level objectives (GSPO, GSPO-token, LUSPO,
  VESPO, SPO): their per-token gradients need only their own sequence's log-probs, so tiles that hold whole
  sequences form them in the forward too. Not with a top-entropy quantile, whose threshold couples every
  token of the batch, nor when one sequence alone exceeds a tile: those take "plain".
A token-level objective with rollout_logp but no old_logp takes "plain": its sampler weight needs logp.

When the sampler truncates (top_k, top_p, min_p), a target outside its row's kept set leaves the objective as if
masked, and which targets do is known only as the sweep runs. "terms" needs nothing more: the loss is formed from
the terms after the sweep. The gradient routes form each row's gradient with the weights of the mask as given,
zero for a row once it is known outside (on the hidden path each tile holds whole rows, so a tile knows its own
rows' thresholds before forming their gradient), and `truncation_scale` rescales the whole gradient afterwards
when the only normalizer the outside targets change is the global token count ("token-mean", no normalizer
given: one factor, count as given over count kept). A per-sequence token count ("seq-mean-token-mean") needs the
sequence whole: sequence tiles on the hidden path, "terms" on the logits path. An entropy bonus is a mean over
the global token count, so beside another normalizer it needs a second factor: that case takes "plain".
"""

from __future__ import annotations

import torch

from . import chunked, objectives, ops
from .checks import LossInputs
from .rows import take
from .sampling import SamplerTransform
from .sweep import accumulation_dtype

PLAIN, TERMS, GRADIENT, SEQUENCE_GRADIENT = "plain", "terms", "gradient", "sequence-gradient"


def _triton():
    """(softpo.fused, softpo.tiles), or a RuntimeError when the Triton path cannot be imported."""
    try:
        from . import fused, tiles
    except ImportError as error:  # triton missing, or a kernel module that failed to import
        raise RuntimeError(f"impl='triton' is unavailable: {error}") from error
    return fused, tiles


def _global_token_mean(config, normalizer) -> bool:
    """Whether the loss divides by the count of valid tokens in the batch (policy terms and entropy alike). SPO's
    loss is a mean over sequences whatever loss_aggregation says: only its entropy bonus is over the tokens."""
    return config.objective != "spo" and config.loss_aggregation == "token-mean" and normalizer is None


def _weights_hold_under_truncation(config, normalizer, whole_sequences: bool) -> bool:
    """Whether weights formed from the mask as given are exact under truncation up to `truncation_scale`: the
    outside targets change no per-sequence count a tile cannot see, and at most the one global token count."""
    if not whole_sequences and config.loss_aggregation == "seq-mean-token-mean":
        return False
    return config.entropy_coef == 0 or _global_token_mean(config, normalizer)


def choose(config, inputs: LossInputs, hidden, weight, logits, shard, normalizer=None):
    """(route, sequence tiles or None): the route that computes the loss, as the module docstring lists."""
    if inputs.path != "triton" or torch.compiler.is_compiling() or shard is not None:
        return PLAIN, None
    truncates = inputs.transform.truncates(logits.shape[-1] if hidden is None else weight.shape[0])
    differentiable = (logits,) if hidden is None else (hidden, weight)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    if config.per_token_terms:
        if inputs.rollout_logp is not None and inputs.old_logp is None:
            return PLAIN, None
        gradient = wants_grad and not (logits is not None and inputs.flat_memory)
        if gradient and not (truncates and not _weights_hold_under_truncation(config, normalizer, False)):
            return GRADIENT, None
        if hidden is None or not wants_grad:
            return TERMS, None
    if truncates and not _weights_hold_under_truncation(config, normalizer, True):
        return PLAIN, None
    if hidden is not None and wants_grad and config.top_entropy_quantile == 1:
        # Packed sequences are contiguous ranges of rows too, in order; their tiles need the counts read.
        T = inputs.mask.shape[1]
        tiles = _triton()[1].sequence_tiles(inputs.row_mask, T, weight.shape[0], hidden.element_size(),
                                            inputs.flat_memory, counts=inputs.valid_counts)
        if tiles is not None:
            return SEQUENCE_GRADIENT, tiles
    return PLAIN, None


def logprob_sweep(path, targets, *, hidden, weight, logits, temperature, return_entropy, valid=None,
                  valid_count=None, inplace_backward=False, shard=None, flat_memory=False,
                  transform=SamplerTransform(), batch_invariant=False):
    """The plain route: (logp [N], entropy [N] or None) from flat inputs on the chosen path.

    The single-process torch path and compiled Triton calls run the custom ops of `softpo.ops`, the sampler's
    settings as their arguments; a vocabulary shard (a process group is no op argument) and eager Triton calls
    the autograd Functions."""
    sampler = dict(transform=transform, batch_invariant=batch_invariant)
    op_sampler = ops.sampler_args(temperature, transform, batch_invariant)
    if path == "torch" and shard is None:
        valid = torch.ones(targets.shape, dtype=torch.bool, device=targets.device) if valid is None else valid
        logp, entropy, _ = ops.chunked_logprob(targets, valid, hidden, weight, logits, *op_sampler, return_entropy,
                                               chunked.TOKEN_CHUNK, chunked.VOCAB_CHUNK, flat_memory)
        return logp, entropy if return_entropy else None
    if path == "torch":
        return chunked.chunked_token_logprobs(targets, hidden=hidden, weight=weight, logits=logits,
                                              temperature=temperature, return_entropy=return_entropy, valid=valid,
                                              shard=shard, flat_memory=flat_memory, **sampler)
    if torch.compiler.is_compiling() and shard is None and not inplace_backward:
        logp, entropy, _ = ops.triton_logprob(targets.contiguous(), valid, hidden, weight, logits, *op_sampler,
                                              return_entropy, flat_memory)
        return logp, entropy if return_entropy else None
    return _triton()[0].triton_token_logprobs(
        targets, hidden=hidden, weight=weight, logits=logits, temperature=temperature, return_entropy=return_entropy,
        valid=valid, valid_count=valid_count, inplace_backward=inplace_backward, shard=shard, flat_memory=flat_memory,
        **sampler,
    )


def run(route, tiles, config, inputs: LossInputs, targets, hidden, weight, logits, normalizer, entropy_gather,
        shard=None):
    """(surrogate or None, terms or None, logp, entropy or None) of `route`, flat [N].

    targets: flat ids (local to the shard); hidden [N, H] with weight, or logits [N, V]. The surrogate, when
    given, carries the loss's gradient formed in the forward; terms, when given, are the epilogue's.
    """
    need_entropy = config.needs_entropy
    valid = None if inputs.every_token_valid else inputs.row_mask
    sweep = dict(hidden=hidden, weight=weight, temperature=inputs.temperature, transform=inputs.transform,
                 batch_invariant=inputs.batch_invariant)
    if route == PLAIN:
        logp, entropy = logprob_sweep(inputs.path, targets, logits=logits, return_entropy=need_entropy, valid=valid,
                                      valid_count=inputs.valid_count, shard=shard, flat_memory=inputs.flat_memory,
                                      **sweep)
        return None, None, logp, entropy
    fused, _ = _triton()
    truncates = inputs.transform.truncates(weight.shape[0] if logits is None else logits.shape[-1])
    if route == SEQUENCE_GRADIENT:
        tile_gradients = _sequence_tile_gradients(config, inputs, normalizer, entropy_gather,
                                                  accumulation_dtype(hidden.dtype), truncates)
        surrogate, _, logp, entropy = fused.hidden_loss_in_forward(
            targets, None, tiles, tile_gradients, return_entropy=need_entropy, flat_memory=inputs.flat_memory,
            **sweep)
        return surrogate, None, logp, entropy
    per_token = _per_token_inputs(inputs)
    if route == TERMS:
        terms, logp, entropy = fused.triton_fused_token_terms(
            config, targets, valid, logits=logits, return_entropy=need_entropy, valid_count=inputs.valid_count,
            flat_memory=inputs.flat_memory, **sweep, **per_token)
        return None, terms, logp, entropy
    w_term, w_entropy = (inputs.rows(w) for w in objectives.loss_weights(config, inputs.mask, normalizer,
                                                                         entropy=need_entropy))
    terms = fused.terms_args(config, **per_token)
    if logits is not None:
        return fused.logits_loss_in_forward(targets, valid, terms, w_term, w_entropy, logits=logits,
                                            temperature=inputs.temperature, return_entropy=need_entropy,
                                            transform=inputs.transform, batch_invariant=inputs.batch_invariant)

    def tile_gradients(idx, outputs):
        # The term's gradient is its weight times d term / d logp, which the epilogue just wrote (coef).
        g_logp, g_entropy = take(w_term, idx) * take(outputs[4], idx), take(w_entropy, idx)
        if truncates:
            # A row whose target fell outside the kept set leaves the loss; its coef may not even be finite.
            outside = take(outputs[0], idx) == float("-inf")
            g_logp = torch.where(outside, 0.0, g_logp)
            g_entropy = None if g_entropy is None else torch.where(outside, 0.0, g_entropy)
        return g_logp, g_entropy

    return fused.hidden_loss_in_forward(
        targets, valid, None, tile_gradients, terms=terms, return_entropy=need_entropy or w_entropy is not None,
        valid_count=inputs.valid_count, flat_memory=inputs.flat_memory, **sweep)


def _per_token_inputs(inputs: LossInputs):
    """The epilogue's per-token inputs, flat [N]. The sampler weight arrives bounded (`LossInputs`), so the
    epilogue uses it as given."""
    flat = inputs.rows
    return dict(advantages=flat(inputs.advantages), old_logp=flat(inputs.old_logp), ref_logp=flat(inputs.ref_logp),
                is_weight=flat(inputs.importance_sampling_ratio), is_weight_as_given=True)


def _sequence_tile_gradients(config, inputs: LossInputs, normalizer, entropy_gather, dtype, truncates=False):
    """tile_gradients for the "sequence-gradient" route: d loss / d logp (and d loss / d entropy) of a tile's
    tokens, by autograd through the objective itself.

    The loss is a sum over sequences of terms that read only their own sequence (and a normalizer fixed by
    the mask), so the tile's gradient is the same whatever the log-probs of the other sequences hold: they
    stay at a finite stand-in (old_logp, or 0) and the objective is evaluated on the whole batch.
    Under truncation the tile's own outside targets leave its sequences' mask; a global token count stays the
    one of the mask as given in every tile (`truncation_scale` corrects it once, at the end).
    """
    stand_in = inputs.rows(inputs.old_logp) if inputs.old_logp is not None else \
        torch.zeros(inputs.row_mask.shape, dtype=dtype, device=inputs.mask.device)
    # Entropy computed for the metrics only (entropy_coef 0) has no gradient to give.
    entropy_in_loss = config.entropy_coef != 0
    count_given = inputs.mask.sum().clamp(min=1).to(dtype) if truncates else None
    if truncates and _global_token_mean(config, normalizer):
        normalizer = count_given

    def tile_gradients(idx, outputs):
        logp, _, entropy, _, _ = outputs
        mask = inputs.mask
        with torch.enable_grad():
            tile_logp = logp[idx].to(stand_in.dtype).requires_grad_()
            leaves = [tile_logp]
            in_objective = tile_logp
            if truncates:
                outside = tile_logp.detach() == float("-inf")
                in_objective = torch.where(outside, take(stand_in, idx), tile_logp)
                mask = mask & ~inputs.grid(torch.zeros_like(inputs.row_mask).index_put((idx,), outside))
            full_entropy = None
            if entropy_in_loss:
                tile_entropy = entropy[idx].to(stand_in.dtype).requires_grad_()
                leaves.append(tile_entropy)
                full_entropy = inputs.grid(torch.zeros_like(stand_in).index_put((idx,), tile_entropy))
            full_logp = inputs.grid(stand_in.index_put((idx,), in_objective))
            loss, _ = objectives.objective_loss(
                config, full_logp, mask, inputs.advantages,
                old_logp=inputs.old_logp, ref_logp=inputs.ref_logp, rollout_logp=inputs.rollout_logp,
                rewards=inputs.rewards, q0=inputs.q0, entropy=full_entropy, normalizer=normalizer,
                importance_sampling_ratio=inputs.importance_sampling_ratio, entropy_gather=entropy_gather,
            )
            grads = torch.autograd.grad(loss, leaves)
        g_entropy = grads[1].float() if entropy_in_loss else None
        if truncates and entropy_in_loss:
            # The entropy bonus is a mean over this call's mask: over the count as given, as the policy terms.
            g_entropy = g_entropy * (mask.sum().clamp(min=1) / count_given)
        return grads[0].float(), g_entropy

    return tile_gradients


def truncation_scale(route, config, inputs: LossInputs, normalizer, outside):
    """The factor a gradient route's gradient takes under truncation (None: none): count of valid tokens as
    given over count kept, for a loss over the global token count (module docstring)."""
    if outside is None or route not in (GRADIENT, SEQUENCE_GRADIENT) or not _global_token_mean(config, normalizer):
        return None
    given = inputs.mask.sum().clamp(min=1)
    return (given / (given - outside.sum()).clamp(min=1)).float()
