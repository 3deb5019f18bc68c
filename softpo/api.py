"""The public functional API and modules.

`token_logprobs` is the vocabulary sweep alone. `policy_loss` reads as three steps: validate (every
input check, value checks read back in one host sync; with a process group, one collective so that
every rank decides alike), sweep, objective (`softpo.objectives`, the O(tokens) math written once).
The sweep takes one of four routes (`_route`):

- plain: the log-prob (and entropy) sweep, then the objective in torch. Every objective, both paths,
  a vocab-parallel group, a compiled call.
- terms: Triton, token-level objectives: the forward kernel's epilogue evaluates each token's gate
  and KL, so one launch yields the per-token terms and the coefficient their backward needs.
- gradient: terms with gradients wanted: the loss is linear in the terms and the entropy, so the
  gradient is formed during the forward sweep (hidden path: each logits tile, no logits recomputed;
  logits path: each row right after its log-sum-exp, in the same kernel).
- sequence-gradient: the same on the hidden path for sequence-level objectives, with tiles of whole sequences whose
  per-token gradients come from the objective by autograd once the tile's log-probs are known.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import objectives, vocab_parallel
from .chunked import accumulation_dtype, chunked_token_logprobs
from .config import LossConfig

IMPLS = ("auto", "torch", "triton")
# What both sweeps take (fp8 and other float types have no kernel path).
SWEEP_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MEMORY_MODES = ("default", "flat")


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
    """loss: 0-d tensor to backprop. logp, entropy: [B, T] fp32, detached (entropy None unless computed).
    metrics: 0-d detached tensors, computed at the first read (`LazyMetrics`; no host sync is forced,
    call .item() when logging)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)


def _triton_ops():
    try:
        from . import triton_ops
    except ImportError as error:  # triton missing, or a kernel module that failed to import
        raise RuntimeError(f"impl='triton' is unavailable: {error}") from error
    return triton_ops


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # The kernels sweep in fp32; float64 inputs (gradcheck, references) get the float64 torch path.
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); "
            f"got tensors on {device}"
        )
    return impl


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_sweep_inputs(targets, hidden, weight, logits):
    """Validate the vocabulary inputs against `targets` and return V."""
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if logits is not None:
        if hidden is not None or weight is not None:
            raise ValueError("pass either logits or hidden and weight, not both")
        if logits.dtype not in SWEEP_DTYPES:
            raise ValueError(f"logits must be one of {SWEEP_DTYPES}, got {logits.dtype}")
        if logits.shape[:-1] != targets.shape or logits.dim() < 1:
            raise ValueError(f"logits must have shape targets.shape + (V,), got {tuple(logits.shape)} for targets {tuple(targets.shape)}")
        if logits.device != targets.device:
            raise ValueError(f"logits is on {logits.device} but targets is on {targets.device}")
        if logits.shape[-1] == 0:
            raise ValueError("logits has an empty vocabulary dimension")
        return logits.shape[-1]
    if hidden is None and weight is None:
        raise ValueError("pass either logits or hidden and weight; got neither")
    if hidden is None:
        raise ValueError("hidden is required when weight is given")
    if weight is None:
        raise ValueError("weight is required when hidden is given")
    if hidden.dtype not in SWEEP_DTYPES:
        raise ValueError(f"hidden must be one of {SWEEP_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape [V, H] with V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape targets.shape + (H,) with H = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)} for targets {tuple(targets.shape)}"
        )
    if hidden.device != targets.device:
        raise ValueError(f"hidden is on {hidden.device} but targets is on {targets.device}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    return weight.shape[0]


class _DeferredChecks:
    """Value checks on device tensors, read back in one host sync: each sync stalls the GPU queue,
    and a loss call checks half a dozen inputs."""

    def __init__(self):
        self.failed: list[tuple[str, torch.Tensor]] = []

    def add(self, message, failed: torch.Tensor) -> None:
        """`message` (a string, or a callable for messages that need the data) is raised if `failed` is True."""
        self.failed.append((message, failed.reshape(())))

    def run(self, *also: torch.Tensor) -> list[bool]:
        """Raise the first failed check's ValueError; else return the values of `also` (0-d bool tensors).

        Under torch.compile nothing is read back (a graph holds no host sync): the value checks are
        skipped and `also` reads False, the answer that is right whatever the values are."""
        if torch.compiler.is_compiling():
            return [False] * len(also)
        flags = [f for _, f in self.failed] + [a.reshape(()) for a in also]
        if not flags:
            return []
        values = torch.stack([f.to(torch.bool) for f in flags]).tolist()
        for (message, _), failed in zip(self.failed, values):
            if failed:
                raise ValueError(message() if callable(message) else message)
        return values[len(self.failed):]


def _check_target_range(checks, targets, V, where=None):
    bad = (targets < 0) | (targets >= V)
    if where is not None:
        bad = bad & where
    checks.add(lambda: f"targets must lie in [0, V={V}); found {targets[bad][0].item()}", bad.any())


def _flat(tensor):
    return None if tensor is None else tensor.reshape(-1)


def _check_memory(memory) -> bool:
    """True for memory="flat"."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory == "flat"


def _logprob_sweep(path, flat_targets, hidden, weight, logits, temperature, return_entropy, valid,
                   inplace_backward=False, shard=None, flat_memory=False):
    """The plain route: per-token log-prob (and entropy) on the chosen path, flat [N] results."""
    if logits is not None:
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    if path == "triton":
        return _triton_ops().triton_token_logprobs(
            flat_targets, hidden=hidden, weight=weight, logits=logits,
            temperature=temperature, return_entropy=return_entropy, valid=valid,
            inplace_backward=inplace_backward, shard=shard, flat_memory=flat_memory,
        )
    return chunked_token_logprobs(
        flat_targets, hidden=hidden, weight=weight, logits=logits,
        temperature=temperature, return_entropy=return_entropy, valid=valid, shard=shard, flat_memory=flat_memory,
    )


def _decide(validate, process_group, *, vocab_start, reduce_hidden_grad, targets, hidden, weight, logits,
            where=None, entropy=False):
    """Run `validate()` (raises ValueError on bad input) and return (its result, the vocabulary shard).

    Single process there is no shard and `validate`'s error propagates. With a process group every rank
    validates its own inputs and one collective decides: all ranks get the same shard layout or the
    same ValueError, so a bad input on one rank cannot leave the others waiting in a collective.
    """
    if process_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start applies only with a process_group (a vocab-parallel lm_head)")
        return validate(), None
    try:
        result, error = validate(), None
    except Exception as raised:  # any failure here must reach the other ranks, not leave them waiting
        result, error = None, str(raised) if isinstance(raised, ValueError) else f"{type(raised).__name__}: {raised}"
    ok = error is None
    shard = vocab_parallel.agree(
        process_group, error, vocab_start=vocab_start,
        local_vocab=(logits.shape[-1] if logits is not None else weight.shape[0]) if ok else 0,
        hidden_size=-1 if not ok or logits is not None else hidden.shape[-1],
        targets=targets if ok else None, where=where() if ok and where is not None else None,
        reduce_hidden_grad=reduce_hidden_grad, entropy=entropy,
    )
    return result, shard


def _local_targets(flat_targets, shard):
    """Global target ids -> ids within this rank's vocabulary rows (outside [0, V_r) on other ranks)."""
    return flat_targets if shard is None else flat_targets - shard.start


def token_logprobs(
    targets: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    temperature: float = 1.0,
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
            (already aligned: nothing is shifted here).
        hidden: [..., H] with weight [V, H] (z = hidden @ weight.T), or
        logits: [..., V], any float dtype and row stride.
        temperature: z is divided by it, as in sampling.
        return_entropy: also return the entropy of softmax(z / temperature) per token.
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

    def validate():
        V = _check_sweep_inputs(targets, hidden, weight, logits)
        checked_temperature = _check_temperature(temperature)
        _check_memory(memory)
        if process_group is None:
            checks = _DeferredChecks()
            _check_target_range(checks, targets, V)
            checks.run()
        path = _resolve_impl(impl, targets.device, (logits if logits is not None else hidden).dtype)
        if inplace_backward:
            _check_inplace(logits, path)
        return checked_temperature, path

    (checked_temperature, path), shard = _decide(
        validate, process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad,
        targets=targets, hidden=hidden, weight=weight, logits=logits, entropy=bool(return_entropy),
    )
    logp, entropy = _logprob_sweep(
        path, _local_targets(targets.reshape(-1).long(), shard), hidden, weight, logits, checked_temperature,
        return_entropy, None, inplace_backward, shard, memory == "flat",
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp


def _check_inplace(logits, path: str):
    if logits is None or path != "triton":
        raise ValueError("inplace_backward needs logits and the Triton path (CUDA tensors or impl='triton')")
    if not logits.requires_grad:
        return
    # A view's storage belongs to its base: writing through a view of a leaf overwrites the leaf.
    base = logits if logits._base is None else logits._base
    if logits.grad_fn is None or base.grad_fn is None:
        raise ValueError(
            "inplace_backward=True would overwrite a leaf tensor's data with its gradient; "
            "pass logits produced by an autograd op (e.g. the lm_head matmul), or inplace_backward=False"
        )
    if any(stride == 0 and size > 1 for stride, size in zip(logits.stride(), logits.shape)):
        raise ValueError("inplace_backward=True needs logits whose elements do not overlap (no stride 0)")


def _check_bt(checks, name, tensor, shape, device, *, mask=None, required=False, dtype=torch.float32):
    """A per-token or per-sequence float tensor: shape, device, finiteness (where mask), as `dtype`."""
    if tensor is None:
        if required:
            raise ValueError(f"{name} is required for this configuration")
        return None
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but targets is on {device}")
    tensor = tensor.detach().to(dtype)
    finite = torch.isfinite(tensor)
    if mask is not None:
        checks.add(f"{name} must be finite at every unmasked position", ~(finite | ~mask).all())
        # Padded positions may hold anything; zero them so they cannot reach the math.
        return torch.where(mask, tensor, torch.zeros_like(tensor))
    checks.add(f"{name} must be finite", ~finite.all())
    return tensor


@dataclass
class _LossInputs:
    """policy_loss's inputs after validation: per-token tensors in the objective's dtype, mask bool."""

    mask: torch.Tensor
    advantages: torch.Tensor | None
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    rollout_logp: torch.Tensor | None
    importance_sampling_ratio: torch.Tensor | None
    rewards: torch.Tensor | None
    q0: torch.Tensor | None
    temperature: float
    path: str
    every_token_valid: bool
    flat_memory: bool


def _validate_loss_inputs(config, targets, mask, advantages, hidden, weight, logits, old_logp, ref_logp,
                          rollout_logp, importance_sampling_ratio, rewards, q0, temperature, normalizer, impl, memory,
                          check_targets) -> _LossInputs:
    """Every check of policy_loss's inputs; value checks are read back in one host sync."""
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig (e.g. softpo.SAPO), got {type(config).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError(f"targets must be a [B, T] integer tensor, got {getattr(targets, 'shape', type(targets))}")
    V = _check_sweep_inputs(targets, hidden, weight, logits)
    temperature = _check_temperature(temperature)
    flat_memory = _check_memory(memory)
    B, T = targets.shape
    device = targets.device
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape {(B, T)}, got {tuple(getattr(mask, 'shape', ()))}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but targets is on {device}")
    checks = _DeferredChecks()
    if mask.dtype != torch.bool:
        checks.add("mask must be boolean or hold only 0 and 1", ((mask != 0) & (mask != 1)).any())
        mask = mask != 0
    if check_targets:
        _check_target_range(checks, targets, V, where=mask)
    path = _resolve_impl(impl, device, (logits if logits is not None else hidden).dtype)

    # The O(tokens) math runs in the sweep's precision: fp32, or float64 for float64 inputs.
    dtype = accumulation_dtype((logits if logits is not None else hidden).dtype)
    old_logp = _check_bt(checks, "old_logp", old_logp, (B, T), device, mask=mask, dtype=dtype)
    ref_logp = _check_bt(checks, "ref_logp", ref_logp, (B, T), device, mask=mask, required=config.needs_ref,
                         dtype=dtype)
    rollout_logp = _check_bt(checks, "rollout_logp", rollout_logp, (B, T), device, mask=mask, dtype=dtype)
    if importance_sampling_ratio is not None:
        per_token = getattr(importance_sampling_ratio, "shape", (None, None))[-1] != 1 or T == 1
        importance_sampling_ratio = _check_bt(
            checks, "importance_sampling_ratio", importance_sampling_ratio, (B, T) if per_token else (B, 1), device,
            mask=mask if per_token else None, dtype=dtype,
        )
        checks.add("importance_sampling_ratio must be >= 0", (importance_sampling_ratio < 0).any())
    if config.objective == "spo":
        rewards = _check_bt(checks, "rewards", rewards, (B,), device, required=True, dtype=dtype)
        q0 = _check_bt(checks, "q0", q0, (B,), device, required=True, dtype=dtype)
        if config.spo_loss == "bce":
            checks.add("rewards must lie in [0, 1] for spo_loss='bce'", ((rewards < 0) | (rewards > 1)).any())
    else:
        if not isinstance(advantages, torch.Tensor):
            raise ValueError(f"advantages ([B] or [B, T] tensor) is required for the {config.name!r} objective")
        shape = (B,) if advantages.dim() == 1 else (B, T)
        advantages = _check_bt(
            checks, "advantages", advantages, shape, device, mask=mask if advantages.dim() == 2 else None, dtype=dtype
        )
    if normalizer is not None:
        value = normalizer.detach() if isinstance(normalizer, torch.Tensor) else torch.tensor(float(normalizer))
        if value.numel() != 1:
            raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
        checks.add(f"normalizer must be a finite number > 0, got {normalizer!r}",
                   ~(torch.isfinite(value) & (value > 0)).to(device))
    # The same sync tells whether any token is masked: with none, the sweep needs no row order.
    (every_token_valid,) = checks.run(mask.all())
    return _LossInputs(mask, advantages, old_logp, ref_logp, rollout_logp, importance_sampling_ratio, rewards, q0,
                       temperature, path, every_token_valid, flat_memory)


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
    temperature: float = 1.0,
    normalizer: torch.Tensor | float | None = None,
    entropy_gather=None,
    impl: str = "auto",
    process_group=None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
    memory: str = "default",
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
    process_group, vocab_start, reduce_hidden_grad: a vocab-parallel lm_head, as in `token_logprobs`;
    the objective then runs identically on every rank and every rank returns the same loss.
    memory: "default" or "flat", as in `token_logprobs`. Where the gradient is formed in the forward (see
    `_route`), flat forms only d hidden there and d weight in the backward, vocabulary-major, with no V x H
    fp32 accumulator (hidden path), or forms no gradient in the forward, whose d logits [N, V] would be
    held until the backward (logits path). On the logits path the default forms d logits in the forward
    and scales them by the loss's upstream gradient in the backward, in place: free when that gradient is
    1 (`loss.backward()`), one more pass over them otherwise, so fold constant factors into `normalizer`
    rather than the loss.

    Returns a `PolicyLossOutput` with `.loss`, `.logp`, `.entropy` and `.metrics`.
    """
    inputs, shard = _decide(
        lambda: _validate_loss_inputs(
            config, targets, mask, advantages, hidden, weight, logits, old_logp, ref_logp, rollout_logp,
            importance_sampling_ratio, rewards, q0, temperature, normalizer, impl, memory,
            check_targets=process_group is None,
        ),
        process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad,
        targets=targets, hidden=hidden, weight=weight, logits=logits, where=lambda: mask != 0,
        entropy=isinstance(config, LossConfig) and config.needs_entropy,
    )
    B, T = targets.shape
    mask = inputs.mask
    flat_targets = _local_targets(torch.where(mask, targets, torch.zeros_like(targets)).reshape(-1).long(), shard)
    valid = None if inputs.every_token_valid else mask.reshape(-1)
    route = _route(config, inputs, hidden, weight, logits, shard)
    surrogate = terms = None
    tiles = None
    if route == "sequence-gradient":
        tiles = _triton_ops().sequence_tiles(mask.reshape(-1), T, weight.shape[0], hidden.element_size(),
                                             inputs.flat_memory)
        route = "plain" if tiles is None else route  # a sequence longer than a tile: two passes
    if route == "sequence-gradient":
        surrogate, logp, entropy = _triton_ops().triton_sequence_loss(
            flat_targets, tiles, _sequence_gradients(config, inputs, normalizer, entropy_gather,
                                                  accumulation_dtype(hidden.dtype)),
            hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight, temperature=inputs.temperature,
            return_entropy=config.needs_entropy, flat_memory=inputs.flat_memory,
        )
    elif route == "plain":
        logp, entropy = _logprob_sweep(inputs.path, flat_targets, hidden, weight, logits, inputs.temperature,
                                       config.needs_entropy, valid, shard=shard, flat_memory=inputs.flat_memory)
    else:
        surrogate, terms, logp, entropy = _fused_sweep(route, config, inputs, flat_targets, valid, hidden, weight,
                                                       logits, normalizer)
        terms = terms.view(B, T)
    logp = logp.view(B, T)
    entropy = None if entropy is None else entropy.view(B, T)
    loss, pieces = objectives.objective_loss(
        config, logp, mask, inputs.advantages,
        old_logp=inputs.old_logp, ref_logp=inputs.ref_logp, rollout_logp=inputs.rollout_logp,
        rewards=inputs.rewards, q0=inputs.q0, entropy=entropy, normalizer=normalizer, terms=terms,
        importance_sampling_ratio=inputs.importance_sampling_ratio, entropy_gather=entropy_gather,
    )
    if surrogate is not None:
        # The value is the objective's own; the gradient is the one the fused sweep formed.
        loss = loss.detach() + (surrogate - surrogate.detach())
    metrics = functools.partial(objectives.objective_metrics, config, pieces)
    return PolicyLossOutput(
        loss=loss, logp=logp.detach(), entropy=None if entropy is None else entropy.detach(),
        # A compiled step returns plain tensors; an eager call leaves the metrics' kernels for their first read.
        metrics=metrics() if torch.compiler.is_compiling() else LazyMetrics(metrics),
    )


def _route(config, inputs: _LossInputs, hidden, weight, logits, shard) -> str:
    """Which of the routes computes the loss.

    "plain": the log-prob sweep, then the objective in torch (every objective, every path).
    "terms": Triton, token-level objectives: the forward kernel's epilogue evaluates each token's
        gate and KL, so one launch yields the terms and the coefficient their backward needs.
    "gradient": "terms" with gradients wanted: the loss is linear in the terms and the entropy, so the
        gradient is formed during the forward sweep: each hidden-path logits tile becomes its gradient
        (with memory="flat" only d hidden, d weight then taking the backward's vocabulary-major pass
        instead of a V x H fp32 accumulator); on the logits path the forward kernel writes each row's d
        logits right after its log-sum-exp (two reads and one write of the logits instead of three
        reads and one write; not with memory="flat", which allocates d logits in the backward only).
    "sequence-gradient": "gradient" on the hidden path for sequence-level objectives (GSPO, GSPO-token,
        LUSPO, VESPO, SPO): their per-token gradients need only their own sequence's log-probs, so tiles
        that hold whole sequences can form them in the forward too (a sequence longer than a tile falls
        back to "plain").
        Not with a top-entropy quantile, whose threshold couples every token of the batch.
    A vocab-parallel sweep knows a token's log-prob only after the group combines, so it takes "plain";
    so does a compiled call (torch.compile sees the plain sweep as one opaque op).
    """
    if inputs.path != "triton" or torch.compiler.is_compiling() or shard is not None:
        return "plain"
    differentiable = (logits,) if hidden is None else (hidden, weight)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    if config.per_token_terms:
        if inputs.rollout_logp is not None and inputs.old_logp is None:
            return "plain"
        return "gradient" if wants_grad and not (logits is not None and inputs.flat_memory) else "terms"
    if hidden is not None and wants_grad and config.top_entropy_quantile == 1:
        return "sequence-gradient"
    return "plain"


def _sequence_gradients(config, inputs: _LossInputs, normalizer, entropy_gather, dtype):
    """tile_gradients for the "sequence-gradient" route: d loss / d logp (and d loss / d entropy) of a tile's
    tokens, by autograd through the objective itself.

    The loss is a sum over sequences of terms that read only their own sequence (and a normalizer fixed by
    the mask), so the tile's gradient is the same whatever the log-probs of the other sequences hold: they
    stay at a finite stand-in (old_logp, or 0) and the objective is evaluated on the whole batch.
    """
    B, T = inputs.mask.shape
    stand_in = inputs.old_logp if inputs.old_logp is not None else torch.zeros(B, T, dtype=dtype,
                                                                               device=inputs.mask.device)
    stand_in = stand_in.reshape(-1)

    # Entropy computed for the metrics only (entropy_coef 0) has no gradient to give.
    entropy_in_loss = config.entropy_coef != 0

    def tile_gradients(idx, logp, entropy):
        with torch.enable_grad():
            tile_logp = logp[idx].to(stand_in.dtype).requires_grad_()
            leaves = [tile_logp]
            full_entropy = None
            if entropy_in_loss:
                tile_entropy = entropy[idx].to(stand_in.dtype).requires_grad_()
                leaves.append(tile_entropy)
                full_entropy = torch.zeros_like(stand_in).index_put((idx,), tile_entropy).view(B, T)
            full_logp = stand_in.index_put((idx,), tile_logp).view(B, T)
            loss, _ = objectives.objective_loss(
                config, full_logp, inputs.mask, inputs.advantages,
                old_logp=inputs.old_logp, ref_logp=inputs.ref_logp, rollout_logp=inputs.rollout_logp,
                rewards=inputs.rewards, q0=inputs.q0, entropy=full_entropy, normalizer=normalizer,
                importance_sampling_ratio=inputs.importance_sampling_ratio, entropy_gather=entropy_gather,
            )
            grads = torch.autograd.grad(loss, leaves)
        return grads[0].float(), (grads[1].float() if entropy_in_loss else None)

    return tile_gradients


def _fused_sweep(route, config, inputs: _LossInputs, flat_targets, valid, hidden, weight, logits, normalizer):
    """The "terms" and "gradient" routes: (surrogate or None, terms, logp, entropy) as flat [N] tensors."""
    B, T = inputs.mask.shape
    advantages = inputs.advantages
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand(B, T)
    # The epilogue bounds the sampler weight itself (objectives.bound_rollout_weights is its twin); a weight
    # the caller supplies is used as given.
    is_weight = inputs.importance_sampling_ratio
    as_given = is_weight is not None
    if is_weight is None and inputs.rollout_logp is not None:
        is_weight = objectives.raw_rollout_weights(config, inputs.old_logp, inputs.rollout_logp, inputs.mask)
    if is_weight is not None:
        is_weight = is_weight.expand(B, T).reshape(-1)
    per_token = dict(advantages=adv.reshape(-1), old_logp=_flat(inputs.old_logp), ref_logp=_flat(inputs.ref_logp),
                     is_weight=is_weight, is_weight_as_given=as_given)
    need_entropy = config.needs_entropy
    if route == "gradient":
        w_term, w_entropy = objectives.loss_weights(config, inputs.mask, normalizer, entropy=need_entropy)
        return _triton_ops().triton_fused_token_loss(
            config, flat_targets, valid,
            hidden=None if hidden is None else hidden.reshape(-1, hidden.shape[-1]), weight=weight,
            logits=None if logits is None else logits.reshape(-1, logits.shape[-1]), w_term=w_term.reshape(-1),
            w_entropy=None if w_entropy is None else w_entropy.reshape(-1), temperature=inputs.temperature,
            return_entropy=need_entropy, flat_memory=inputs.flat_memory, **per_token,
        )
    terms, logp, entropy = _triton_ops().triton_fused_token_terms(
        config, flat_targets, valid,
        hidden=None if hidden is None else hidden.reshape(-1, hidden.shape[-1]), weight=weight,
        logits=None if logits is None else logits.reshape(-1, logits.shape[-1]),
        temperature=inputs.temperature, return_entropy=need_entropy, flat_memory=inputs.flat_memory, **per_token,
    )
    return None, terms, logp, entropy


class PolicyLoss(nn.Module):
    """`policy_loss` with its config (and impl) stored: `PolicyLoss(softpo.SAPO)(targets, mask, adv, hidden=h, weight=w)`.

    process_group, vocab_start, reduce_hidden_grad: a vocab-parallel lm_head, as in `policy_loss`.
    """

    def __init__(self, config: LossConfig, impl: str = "auto", *, process_group=None, vocab_start: int | None = None,
                 reduce_hidden_grad: bool = True, memory: str = "default"):
        super().__init__()
        if not isinstance(config, LossConfig):
            raise ValueError(f"config must be a LossConfig, got {type(config).__name__}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        _check_memory(memory)
        self.config = config
        self.impl = impl
        self.shard = dict(process_group=process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad)
        self.memory = memory

    def forward(self, targets, mask, advantages=None, **kwargs) -> PolicyLossOutput:
        kwargs.setdefault("impl", self.impl)
        kwargs.setdefault("memory", self.memory)
        return policy_loss(self.config, targets, mask, advantages, **self.shard, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config.name!r}, impl={self.impl!r}"


class TokenLogprobs(nn.Module):
    """`token_logprobs` with temperature, entropy flag, impl and (for a vocab-parallel lm_head) the group stored."""

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False, impl: str = "auto", *,
                 process_group=None, vocab_start: int | None = None, reduce_hidden_grad: bool = True,
                 memory: str = "default"):
        super().__init__()
        _check_memory(memory)
        self.memory = memory
        self.temperature = _check_temperature(temperature)
        self.return_entropy = return_entropy
        self.impl = impl
        self.shard = dict(process_group=process_group, vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad)

    def forward(self, targets, *, hidden=None, weight=None, logits=None):
        return token_logprobs(
            targets, hidden=hidden, weight=weight, logits=logits,
            temperature=self.temperature, return_entropy=self.return_entropy, impl=self.impl, memory=self.memory,
            **self.shard,
        )
