"""FSDP2 plumbing for `softpo train --fsdp`: wrapping, the lm_head weight for the loss, sharded checkpoints.

`shard(model)` applies torch's `fully_shard` to every decoder layer and then to the model itself (the root),
so the embeddings, the final norm and lm_head form the root's group. Parameters become DTensors sharded on
dim 0 over the ranks; gradients are reduce-scattered and averaged by FSDP2, so the loop's own all-reduce
is skipped.

The loss needs the whole lm_head weight. It is read inside the root module's forward (`call_inside`), where
FSDP2 has already gathered the root group, rather than by a differentiable `full_tensor()` of the sharded
parameter: the root group is all-gathered for the embeddings anyway, so reading it there costs no extra
collective and no second copy, and its gradient lands on the unsharded parameter that FSDP2 reduce-scatters
with the rest. A `full_tensor()` gradient would land on the sharded parameter instead, where FSDP2 does not
reduce it: each rank would keep only its own data's gradient (`softpo.head.gathered_weight` is the correct form).
Tied embeddings are one parameter in the root group, so they need nothing more.

Checkpoints are torch.distributed.checkpoint (DCP) directories: each rank writes its own shards of the
parameters and of AdamW's state (`get_state_dict` gives them by canonical parameter names), and a load
reads them back into the sharded model (`set_state_dict`).
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
import torch.distributed as dist

from softpo.head import run_as_forward

__all__ = ["shard", "is_sharded", "call_inside", "clip_grad_norm", "save_sharded", "load_sharded", "full_state_dict"]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: the classes it names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard")
    return layers


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the whole model as the root, over all ranks; in place.

    Call it after the weights are loaded and identical on every rank, and before building the optimizer.
    A model still on the CPU moves to `device` one group at a time, as each group's shards: the whole
    model never needs to fit on one GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Explicit: the default mesh is CUDA whenever CUDA exists, even for a run on the CPU.
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def call_inside(model: torch.nn.Module, fn):
    """`fn()` run as `model`'s forward when FSDP2 shards it, so that the root group's parameters (embeddings,
    final norm, lm_head) are whole and registered on their modules while `fn` reads them; `fn()` otherwise."""
    if not is_sharded(model):
        return fn()
    with warnings.catch_warnings():
        # FSDP2 warns that an in-place op on a view it returns would skip its pre-backward hook; the loss
        # loop's outputs (log-probs, router logits: reshaped views) are only read, never written in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return run_as_forward(model, fn)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also takes sharded (DTensor) gradients; returns the total norm as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(path: str, model, optimizer, step: int) -> None:
    """Write model and optimizer shards as a DCP directory at `path` (all ranks call it).

    It is written beside `path` and moved into place once every rank has finished, and the one before it
    stays as `path.previous` until the next save: a save interrupted before checkpoint.pt (which names the
    step) was rewritten leaves a matching pair either way. `step` is stored with the shards so that a load
    picks the right one.
    """
    import torch.distributed.checkpoint as dcp

    partial = path + ".partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    state = _state(model, optimizer)
    state["step"] = torch.tensor(step)
    dcp.save(state, checkpoint_id=partial)
    dist.barrier()
    if dist.get_rank() == 0:
        previous = path + ".previous"
        shutil.rmtree(previous, ignore_errors=True)
        if os.path.isdir(path):
            os.replace(path, previous)
        os.replace(partial, path)
    dist.barrier()


def load_sharded(path: str, model, optimizer, step: int) -> None:
    """Read a `save_sharded` directory into the (already sharded) model and its optimizer, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not os.path.isdir(path):
        raise ValueError(f"--resume: {path} not found")
    state = _state(model, optimizer)
    for candidate in (path, path + ".previous"):
        # The step first: a save interrupted after the shards moved but before checkpoint.pt was rewritten
        # leaves checkpoint.pt naming the previous shards.
        probe = {"step": torch.tensor(-1)}
        if os.path.isdir(candidate):
            dcp.load(probe, checkpoint_id=candidate)
        if int(probe["step"]) == step:
            break
    else:
        raise ValueError(f"--resume: no shards of step {step} (checkpoint.pt's) in {path} or {path}.previous")
    state["step"] = torch.tensor(-1)
    dcp.load(state, checkpoint_id=candidate)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on every rank (a collective under FSDP2; `state_dict()` otherwise)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
