"""Validation of the public functions' inputs: every check once, at the public function.

Shape, dtype and device checks raise at once; value checks on device tensors are read back in one host
sync (`DeferredChecks`), which also reads each sequence's number of valid tokens, so that nothing later
syncs to count them. With a process group every rank validates its own inputs and one collective decides
(`decide`), so a bad input on one rank cannot leave the others waiting in a collective.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from . import objectives, sampling, vocab_parallel
from .config import LossConfig
from .packing import PackedLayout, segment_sums
from .sweep import SWEEP_DTYPES, accumulation_dtype

IMPLS = ("auto", "torch", "triton")
MEMORY_MODES = ("default", "flat")


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
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


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_sampler(checks, targets, temperature, sampler: dict, where=None, dtype=torch.float32):
    """The sampler's distribution: (temperature, transform). temperature: a float, or a float tensor with one
    value per sequence ([B] for targets [B, T]) or per token (the targets' shape), returned per flat token in
    `dtype` (the sweep's accumulation dtype); its values are checked (where `where`, the unmasked tokens) in
    the caller's host sync. sampler: logit_scale, softcap, top_k, top_p, min_p
    (`softpo.sampling.check_sampling_args`)."""
    transform = sampling.check_sampling_args(**sampler)
    if not isinstance(temperature, torch.Tensor):
        return check_temperature(temperature), transform
    shape = tuple(targets.shape)
    if not temperature.dtype.is_floating_point:
        raise ValueError(f"temperature must be a float or a float tensor, got {temperature.dtype}")
    if temperature.device != targets.device:
        raise ValueError(f"temperature is on {temperature.device} but targets is on {targets.device}")
    if temperature.dim() == 0 or tuple(temperature.shape) == shape:
        per_token = temperature.expand(shape)
    elif len(shape) == 2 and tuple(temperature.shape) == shape[:1]:
        per_token = temperature[:, None].expand(shape)
    else:
        raise ValueError(f"temperature must be a float, or a tensor of shape {shape[:1]} (per sequence) or {shape} "
                         f"(per token), got {tuple(temperature.shape)}")
    per_token = per_token.detach().to(dtype)
    good = torch.isfinite(per_token) & (per_token > 0)
    if where is not None:
        good |= ~where
        # Padded positions may hold anything (0 included); they reach no kernel as a divisor.
        per_token = torch.where(where, per_token, torch.ones_like(per_token))
    checks.add("temperature must be finite and > 0 at every token", ~good.all())
    return per_token.reshape(-1).contiguous(), transform


def check_config(config) -> None:
    if isinstance(config, str):
        raise ValueError(f"config must be a LossConfig, not the name {config!r}: pass softpo.preset({config!r})")
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig (e.g. softpo.SAPO), got {type(config).__name__}")


def check_memory(memory) -> bool:
    """True for memory="flat"."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory == "flat"


def check_sweep_inputs(targets, hidden, weight, logits):
    """Validate the vocabulary inputs against `targets` and return V."""
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if logits is not None:
        if hidden is not None or weight is not None:
            raise ValueError("pass either logits or hidden and weight, not both")
        if logits.dtype not in SWEEP_DTYPES:
            raise ValueError(f"logits must be one of {SWEEP_DTYPES}, got {logits.dtype}")
        if logits.shape[:-1] != targets.shape or logits.dim() < 1:
            raise ValueError(f"logits must have shape targets.shape + (V,), got {tuple(logits.shape)} for targets "
                             f"{tuple(targets.shape)}")
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
    if hidden.dim() >= 1 and hidden.shape[-1] == weight.shape[0] != weight.shape[1]:
        raise ValueError(
            f"weight looks transposed: it is {tuple(weight.shape)}, and hidden's last dimension H = "
            f"{hidden.shape[-1]} matches weight.shape[0], not weight.shape[1]; pass the lm_head weight as [V, H] "
            "(lm_head.weight as nn.Linear stores it), e.g. weight.T for an [H, V] matrix"
        )
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


def check_inplace(logits, path: str):
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


class DeferredChecks:
    """Value checks on device tensors, read back in one host sync: each sync stalls the GPU queue,
    and a loss call checks half a dozen inputs."""

    def __init__(self):
        self.failed: list[tuple[str, torch.Tensor]] = []

    def add(self, message, failed: torch.Tensor) -> None:
        """`message` (a string, or a callable for messages that need the data) is raised if `failed` is True."""
        self.failed.append((message, failed.reshape(())))

    def run(self, counts: torch.Tensor | None = None) -> list[int] | None:
        """Raise the first failed check's ValueError; else return the values of `counts` (an integer tensor,
        read in the same sync), or None without it.

        Under torch.compile nothing is read back (a graph holds no host sync): the value checks are
        skipped and the counts read None."""
        if torch.compiler.is_compiling():
            return None
        parts = [failed.to(torch.int64).reshape(1) for _, failed in self.failed]
        if counts is not None:
            parts.append(counts.reshape(-1).to(torch.int64))
        values = torch.cat(parts).tolist() if parts else []
        for (message, _), failed in zip(self.failed, values):
            if failed:
                raise ValueError(message() if callable(message) else message)
        return None if counts is None else values[len(self.failed):]


def check_target_range(checks, targets, V, where=None):
    bad = (targets < 0) | (targets >= V)
    if where is not None:
        bad = bad & where
    checks.add(lambda: f"targets must lie in [0, V={V}); found {targets[bad][0].item()}", bad.any())


def check_per_token(checks, name, tensor, shape, device, *, mask=None, required=None, dtype=torch.float32,
                    shape_text=None, minus_inf_means=None):
    """A per-token or per-sequence float tensor: shape, device, finiteness (where mask), as `dtype`.

    required: why the configuration needs it (raised when it is None); shape_text: the accepted shapes, when
    more than `shape`; minus_inf_means: where -inf is accepted too, what it stands for (said in the error)."""
    if tensor is None:
        if required:
            raise ValueError(f"{name} is required: {required}")
        return None
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_text or tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but targets is on {device}")
    tensor = tensor.detach().to(dtype)
    finite = torch.isfinite(tensor)
    if mask is not None:
        if minus_inf_means is None:
            checks.add(f"{name} must be finite at every unmasked position", ~(finite | ~mask).all())
        else:
            accepted = finite | (tensor == float("-inf"))
            checks.add(f"{name} must be finite, or -inf ({minus_inf_means}), at every unmasked position",
                       ~(accepted | ~mask).all())
        # Padded positions may hold anything; zero them so they cannot reach the math.
        return torch.where(mask, tensor, torch.zeros_like(tensor))
    checks.add(f"{name} must be finite", ~finite.all())
    return tensor


def _why_ref_logp(config: LossConfig) -> str | None:
    if config.objective == "spo":
        return "SPO's cumulative Q sums logp - ref_logp over each sequence"
    if config.beta > 0:
        return f"beta = {config.beta} > 0 adds a KL penalty to the reference policy, estimated from ref_logp"
    return None


@dataclass
class LossInputs:
    """policy_loss's inputs after validation: per-token tensors in the objective's dtype, mask bool,
    advantages [B, 1] or [B, T]; importance_sampling_ratio: the sampler weight, bounded, wherever it is known
    before the sweep (see `validate_loss_inputs`); valid_counts: each sequence's number of valid tokens (None under
    torch.compile, which reads nothing back); layout: for packed sequences, the map between the sweep's packed
    rows and this [S, T] layout (`rows`, `grid`), else None."""

    mask: torch.Tensor
    advantages: torch.Tensor | None
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    rollout_logp: torch.Tensor | None
    importance_sampling_ratio: torch.Tensor | None
    rewards: torch.Tensor | None
    q0: torch.Tensor | None
    temperature: float | torch.Tensor
    path: str
    flat_memory: bool
    valid_counts: list[int] | None
    layout: PackedLayout | None = None
    transform: sampling.SamplerTransform = sampling.SamplerTransform()
    batch_invariant: bool = False
    outside_before: torch.Tensor | None = None  # unmasked tokens whose old_logp is -inf, left out of `mask`
    row_mask: torch.Tensor = field(init=False)  # the mask in the sweep's row order, [N]

    def __post_init__(self):
        self.row_mask = self.rows(self.mask)

    @property
    def valid_count(self) -> int | None:
        return None if self.valid_counts is None else sum(self.valid_counts)

    @property
    def every_token_valid(self) -> bool:
        # Under torch.compile (no counts) False, the answer that is right whatever the mask holds.
        return self.valid_count == (self.mask.numel() if self.layout is None else self.layout.total)

    def rows(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The objective's [B, T] (or [B, 1]) layout -> the sweep's rows [N]: flattened, or packed."""
        if tensor is None:
            return None
        if self.layout is not None:
            return self.layout.to_rows(tensor)
        return tensor.expand(self.mask.shape).reshape(-1)

    def grid(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The sweep's rows [N] -> the objective's [B, T] (zeros between packed sequences); differentiable."""
        if rows is None:
            return None
        return rows.view(self.mask.shape) if self.layout is None else self.layout.to_padded(rows)



def validate_loss_inputs(config, targets, mask, advantages, hidden, weight, logits, old_logp, ref_logp,
                         rollout_logp, importance_sampling_ratio, rewards, q0, temperature, normalizer, impl, memory,
                         check_targets, cu_seqlens=None, sampler=None, batch_invariant=False) -> LossInputs:
    """Every check of policy_loss's inputs; value checks and the valid-token counts read in one host sync.

    With cu_seqlens the inputs are packed (`check_packed`); they leave in the padded [S, T] layout, with the
    map back to the packed rows (`LossInputs.layout`)."""
    check_config(config)
    packed = cu_seqlens is not None
    if not packed and (not isinstance(targets, torch.Tensor) or targets.dim() != 2):
        raise ValueError(f"targets must be a [B, T] integer tensor, got {getattr(targets, 'shape', type(targets))}")
    if packed:
        check_packed(config, cu_seqlens, targets)
    V = check_sweep_inputs(targets, hidden, weight, logits)
    flat_memory = check_memory(memory)
    device = targets.device
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask must have shape {tuple(targets.shape)}, got {tuple(getattr(mask, 'shape', ()))}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but targets is on {device}")
    checks = DeferredChecks()
    if packed:
        # Per-token inputs [total] (or [1, total]: read as [total]), per-sequence ones [S].
        B, T = cu_seqlens.numel() - 1, None
        tokens, tokens_text = (targets.numel(),), f"[total] = {(targets.numel(),)}"
        targets, mask, old_logp, ref_logp, rollout_logp, advantages, importance_sampling_ratio = (
            _packed_rows(t, tokens) for t in
            (targets, mask, old_logp, ref_logp, rollout_logp, advantages, importance_sampling_ratio))
        check_cu_values(checks, cu_seqlens, targets.numel())
    else:
        B, T = targets.shape
        tokens, tokens_text = (B, T), None
    if mask.dtype != torch.bool:
        checks.add("mask must be boolean or hold only 0 and 1", ((mask != 0) & (mask != 1)).any())
        mask = mask != 0
    if check_targets:
        check_target_range(checks, targets, V, where=mask)
    if packed and isinstance(temperature, torch.Tensor) and tuple(temperature.shape) == (B,) != tokens:
        # One temperature per packed sequence: spread over its rows (no host sync: the total is known).
        temperature = torch.repeat_interleave(temperature, cu_seqlens.long().diff(), output_size=tokens[0])
    temperature, transform = check_sampler(checks, targets, temperature, sampler or {}, where=mask,
                                           dtype=accumulation_dtype((logits if logits is not None else hidden).dtype))
    path = resolve_impl(impl, device, (logits if logits is not None else hidden).dtype)

    # The O(tokens) math runs in the sweep's precision: fp32, or float64 for float64 inputs.
    dtype = accumulation_dtype((logits if logits is not None else hidden).dtype)
    # Whether the sampler may truncate at all (a vocabulary shard's V is not the whole vocabulary's).
    truncates = transform.truncates(float("inf"))
    old_logp = check_per_token(checks, "old_logp", old_logp, tokens, device, mask=mask, dtype=dtype,
                               shape_text=tokens_text,
                               minus_inf_means="a target outside the kept set when it was taken" if truncates else None)
    outside_before = None
    if truncates and old_logp is not None:
        # An old log-prob taken under the same truncation is -inf where its target was outside the kept set
        # then: that token leaves the objective as if masked, as one outside now does (known before the sweep).
        outside_before = mask & (old_logp == float("-inf"))
        mask = mask & ~outside_before
        old_logp = torch.where(outside_before, torch.zeros_like(old_logp), old_logp)
    ref_logp = check_per_token(checks, "ref_logp", ref_logp, tokens, device, mask=mask, dtype=dtype,
                               required=_why_ref_logp(config), shape_text=tokens_text)
    rollout_logp = check_per_token(checks, "rollout_logp", rollout_logp, tokens, device, mask=mask, dtype=dtype,
                                   shape_text=tokens_text)
    if importance_sampling_ratio is not None:
        if packed:
            per_token = tuple(getattr(importance_sampling_ratio, "shape", ())) != (B,)
        else:
            per_token = getattr(importance_sampling_ratio, "shape", (None, None))[-1] != 1 or T == 1
        importance_sampling_ratio = check_per_token(
            checks, "importance_sampling_ratio", importance_sampling_ratio, tokens if per_token else
            ((B,) if packed else (B, 1)), device, mask=mask if per_token else None, dtype=dtype,
            shape_text=f"[total] = {tokens} or [S] = {(B,)}" if packed else None,
        )
        checks.add("importance_sampling_ratio must be >= 0", (importance_sampling_ratio < 0).any())
        if packed and not per_token:
            importance_sampling_ratio = importance_sampling_ratio.unsqueeze(-1)
    if config.objective == "spo":
        rewards = check_per_token(checks, "rewards", rewards, (B,), device, dtype=dtype,
                                  required="SPO regresses each sequence's Q onto its reward")
        q0 = check_per_token(checks, "q0", q0, (B,), device, dtype=dtype,
                             required="SPO's Q starts from each prompt's soft value (softpo.spo_q0)")
        if config.spo_loss == "bce":
            checks.add("rewards must lie in [0, 1] for spo_loss='bce'", ((rewards < 0) | (rewards > 1)).any())
    else:
        if not isinstance(advantages, torch.Tensor):
            raise ValueError(f"advantages ([B] or [B, T] tensor) is required for the {config.name!r} objective")
        per_sequence = tuple(advantages.shape) == (B,) if packed else advantages.dim() == 1
        advantages = check_per_token(
            checks, "advantages", advantages, (B,) if per_sequence else tokens, device,
            mask=None if per_sequence else mask, dtype=dtype,
            shape_text=f"[S] = {(B,)} or [total] = {tokens}" if packed else f"[B] = {(B,)} or [B, T] = {(B, T)}",
        )
        # One column per sequence: every later use broadcasts it over the sequence's tokens.
        advantages = advantages.unsqueeze(-1) if per_sequence else advantages
    if normalizer is not None:
        value = normalizer.detach() if isinstance(normalizer, torch.Tensor) else torch.tensor(float(normalizer))
        if value.numel() != 1:
            raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
        checks.add(f"normalizer must be a finite number > 0, got {normalizer!r}",
                   ~(torch.isfinite(value) & (value > 0)).to(device))
    # The same sync reads how many tokens each sequence has: the sweeps' row order and tiles need no other.
    layout = None
    if packed:
        # ... and the packed sequences' boundaries, which the padded layout's shape needs.
        layout, valid_counts = _packed_layout(cu_seqlens, checks.run(
            torch.cat([segment_sums(mask.long(), cu_seqlens), cu_seqlens.long()])))
        # The objective's layout: per-token inputs (1-D) padded, per-sequence ones ([S], [S, 1]) as they are.
        mask, old_logp, ref_logp, rollout_logp, advantages, importance_sampling_ratio, outside_before = (
            t if t is None or t.dim() != 1 else layout.to_padded(t) for t in
            (mask, old_logp, ref_logp, rollout_logp, advantages, importance_sampling_ratio, outside_before))
    else:
        valid_counts = checks.run(mask.sum(-1))
    if config.objective != "spo" and (old_logp is not None or rollout_logp is None):
        # The sampler weight, built once (without old_logp the objective builds it from logp, after the sweep).
        importance_sampling_ratio = objectives.sampler_weights(config, old_logp, mask, rollout_logp,
                                                               importance_sampling_ratio)
    return LossInputs(mask, advantages, old_logp, ref_logp, rollout_logp, importance_sampling_ratio, rewards, q0,
                      temperature, path, flat_memory, valid_counts, layout, transform, bool(batch_invariant),
                      outside_before)


def check_packed(config, cu_seqlens, targets) -> None:
    """The checks of packed inputs that need no value: cu_seqlens' dtype, shape and device, targets' shape."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an int32 or int64 tensor, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [S + 1], got shape {tuple(cu_seqlens.shape)}")
    if not isinstance(targets, torch.Tensor) or not (targets.dim() == 1 or targets.dim() == 2 and len(targets) == 1):
        raise ValueError(f"targets must be a [total] or [1, total] integer tensor with cu_seqlens, got "
                         f"{getattr(targets, 'shape', type(targets))}")
    if cu_seqlens.device != targets.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but targets is on {targets.device}")
    if config.loss_aggregation == "seq-mean-token-sum-norm" and config.max_completion_length is None:
        raise ValueError(
            "config.max_completion_length is required with cu_seqlens for loss_aggregation='seq-mean-token-sum-norm'"
            " (Dr.GRPO): its sum is divided by the completion length, which the longest packed sequence is not"
        )


def check_cu_values(checks, cu_seqlens, total: int) -> None:
    """cu_seqlens' values, read in the one sync: 0 first, non-decreasing, `total` last."""
    cu = cu_seqlens.long()
    checks.add(lambda: f"cu_seqlens must start at 0, got {cu[0].item()}", cu[0] != 0)
    checks.add("cu_seqlens must be non-decreasing", (cu.diff() < 0).any())
    checks.add(lambda: f"cu_seqlens must end at the number of tokens, {total}, got {cu[-1].item()}", cu[-1] != total)


def _packed_rows(tensor, tokens):
    """[1, total] -> [total]; anything else as given (its shape is checked next)."""
    if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[0] == 1 and \
            (tensor.shape[1],) == tokens:
        return tensor.reshape(tokens)
    return tensor


def _packed_layout(cu_seqlens, values):
    """(layout, each sequence's valid-token count or None) from the sync's values: S counts, then cu_seqlens.

    Under torch.compile nothing was read back; the boundaries are then read here (a graph break)."""
    S = cu_seqlens.numel() - 1
    counts, bounds = (None, cu_seqlens.tolist()) if values is None else (values[:S], values[S:])
    return PackedLayout(cu_seqlens, [b - a for a, b in zip(bounds, bounds[1:])]), counts


def validate_logprob_inputs(targets, hidden, weight, logits, temperature, memory, impl, inplace_backward,
                            check_targets, sampler=None):
    """Every check of token_logprobs' inputs: (temperature, path, flat memory, transform); value checks in one
    host sync."""
    V = check_sweep_inputs(targets, hidden, weight, logits)
    flat_memory = check_memory(memory)
    checks = DeferredChecks()
    temperature, transform = check_sampler(checks, targets, temperature, sampler or {},
                                           dtype=accumulation_dtype((logits if logits is not None else hidden).dtype))
    if check_targets:
        check_target_range(checks, targets, V)
    if checks.failed:
        checks.run()
    path = resolve_impl(impl, targets.device, (logits if logits is not None else hidden).dtype)
    if inplace_backward:
        check_inplace(logits, path)
    return temperature, path, flat_memory, transform


def decide(validate, process_group, *, vocab_start, reduce_hidden_grad, targets, hidden, weight, logits,
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
