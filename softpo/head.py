"""The lm_head helpers shared by `softpo train` and the integrations.

softpo's loss reads the lm_head weight instead of the logits. Where a wrapper manages parameters around a
module's forward (FSDP2's root group, DeepSpeed ZeRO-3's gathering hooks on lm_head, DDP's hooks), the
weight is only whole, and its gradient only lands where the wrapper reduces it, while that module's forward
runs. `run_as_forward` runs any function as a module's forward, so the loss runs inside those hooks.
`gathered_weight` is the form for a DTensor weight no forward has gathered.
"""

from __future__ import annotations

import functools
import types

import torch

__all__ = ["run_as_forward", "add_forward_call", "gathered_weight"]

# The keyword the patched forward answers to; any other call runs the module's own forward.
_KEYWORD = "_softpo_run"


def add_forward_call(module: torch.nn.Module) -> None:
    """Let `module(*args, _softpo_run=fn, **kwargs)` return `fn(*args, **kwargs)` as the module's forward; once
    per module. Call it early where a wrapper that replaces `forward` later must wrap this one."""
    if module.__dict__.get("_softpo_runs_as_forward", False):
        return
    replaced_forward = module.forward  # may itself be a wrapper (autocast's output casting): kept

    # `generate` checks its keyword arguments against the forward's signature: keep the original's.
    @functools.wraps(type(module).forward)
    def forward(self, *args, _softpo_run=None, **kwargs):
        if _softpo_run is None:
            return replaced_forward(*args, **kwargs)
        return _softpo_run(*args, **kwargs)

    module.forward = types.MethodType(forward, module)
    module._softpo_runs_as_forward = True


def run_as_forward(module: torch.nn.Module, fn, *args, caller: torch.nn.Module | None = None, **kwargs):
    """`fn(*args, **kwargs)` run as `module`'s forward: every hook registered on `module` (and on `caller`, a
    wrapper around it such as DDP or an engine, when given: the call goes through it) runs around `fn`, and
    tensors in `args` reach `fn` as those hooks passed them on. Without this call the forward is unchanged.

    The forward is patched at the first call unless `add_forward_call` did it earlier: wrappers (PEFT, FSDP,
    accelerate) may replace modules in between. Copy a model before its first call, not after: the copy's
    forward would still call the original's.
    """
    add_forward_call(module)
    return (caller or module)(*args, **{_KEYWORD: fn}, **kwargs)


def gathered_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor parameter that FSDP2 has not gathered (a plain tensor passes through),
    with a gradient that is reduce-scattered and averaged over the ranks, as FSDP2 does for the gradients
    it reduces itself. `full_tensor()` alone treats the incoming gradient as replicated and keeps each rank's
    slice of its own gradient, unreduced."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(weight, DTensor):
        return weight
    replicated = weight.redistribute(placements=[Replicate()] * weight.device_mesh.ndim)
    return replicated.to_local(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
