"""The weight softpo must sweep for an lm_head module, LoRA adapters included.

softpo's hidden path computes `hidden @ weight.T` for one `weight` [V, H]. For a plain `nn.Linear` head that
is its weight. Under PEFT the head may be a LoRA layer, whose `.weight` is only the base weight: the
adapters add `scaling * B @ (A @ x)` in its forward, and sweeping `.weight` would compute another model's
loss and leave the adapters without gradient. `lm_head_weight` returns the weight that reproduces the
head's own forward, as a differentiable expression of the adapters, or raises ValueError for a head that
no single weight reproduces.

    weight = lm_head_weight(model.get_output_embeddings())
    out = softpo.policy_loss(config, targets, mask, advantages, hidden=hidden, weight=weight)

softpo never imports peft itself: a head can be a PEFT layer only once peft has been imported.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["lm_head_weight"]


def lm_head_weight(head: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [V, H] with `hidden @ weight.T == head(hidden)` for the lm_head module `head`.

    - A plain `nn.Linear` without bias: its own weight, returned as is, so a frozen head stays frozen and
      softpo's sweeps skip d weight.
    - A PEFT LoRA `Linear` (possibly inside a `ModulesToSaveWrapper`): the base weight plus
      `scaling * B @ A` of every active adapter, formed once per call, with autocast off, in the wider of
      the returned dtype and the adapters'. Gradients reach the adapters (and the base weight, if it is
      trainable) through autograd: the sweep forms d weight [V, H] and autograd turns it into d B and d A,
      so a trained adapter costs two V x H tensors (this weight and its gradient). A merged layer's
      adapters are already in its weight; a disabled layer is its base weight.

    dtype: the returned weight's dtype; default the base weight's, which is the dtype the head's own forward
        returns. A caller that sweeps in another dtype (e.g. fp32 for a bf16 model) passes it here, so that
        the adapters' contribution is not rounded to the base's dtype first.

    Raises ValueError naming the head and the reason for anything it cannot reproduce exactly: a bias,
    a layer whose forward is not a plain linear map (quantized or otherwise replaced), LoRA dropout active
    in training mode, DoRA and the other LoRA variants, an adapter bias, a wrapper it does not know.
    """
    if not isinstance(head, nn.Module):
        raise ValueError(f"head must be an nn.Module (the model's lm_head), got {type(head).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return _effective_weight(head, "lm_head", dtype)


def _effective_weight(module: nn.Module, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    """The weight of `module`'s forward, in `dtype` (None: the dtype that forward returns).

    `name` is the module's path from the lm_head, for errors: lm_head, lm_head.base_layer, ...
    """
    if _is_plain_linear(module):
        _check_plain_linear(module, name)
        return module.weight if dtype is None else module.weight.to(dtype)
    peft_types = _peft_types()
    if peft_types is not None:
        lora_linear, modules_to_save, base_tuner = peft_types
        if isinstance(module, modules_to_save):
            path, chosen = _chosen_module(module)
            return _effective_weight(chosen, f"{name}.{path}", dtype)
        if type(module) is lora_linear:
            return _lora_weight(module, name, dtype)
        if isinstance(module, base_tuner):
            raise ValueError(
                f"{_named(name, module)} is a PEFT layer other than LoRA's Linear; softpo reproduces only LoRA on a "
                "plain nn.Linear head (no quantized base layer, no other adapter type)"
            )
    raise ValueError(
        f"{_named(name, module)} is not an nn.Linear (or a PEFT LoRA layer over one) whose forward is "
        "hidden @ weight.T, so no single weight reproduces it for softpo's sweep"
    )


def _is_plain_linear(module: nn.Module) -> bool:
    # A subclass that replaces forward (quantized layers, Conv1D-like layouts) computes something else;
    # FSDP2 and DeepSpeed keep nn.Linear's forward and act through hooks.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _check_plain_linear(module: nn.Linear, name: str) -> None:
    if module.bias is not None:
        raise ValueError(f"{_named(name, module)} has a bias, which softpo's sweep (hidden @ weight.T) does not add")
    if not module.weight.dtype.is_floating_point:
        raise ValueError(
            f"{_named(name, module)} has a {module.weight.dtype} weight; softpo sweeps floating weights only"
        )


def _peft_types():
    """(LoRA Linear, ModulesToSaveWrapper, BaseTunerLayer), or None while peft is not imported: a module
    cannot be one of peft's layers before peft is, and importing it (and transformers) costs seconds."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    return Linear, ModulesToSaveWrapper, BaseTunerLayer


def _chosen_module(wrapper: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) that a ModulesToSaveWrapper's forward runs: its first active adapter's copy, else the original."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return "original_module", wrapper.original_module
    return f"modules_to_save.{active[0]}", wrapper.modules_to_save[active[0]]


def _named(name: str, module: nn.Module) -> str:
    kind = type(module)
    return f"{name} ({kind.__module__}.{kind.__qualname__})"


def _lora_weight(layer: nn.Module, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    """base weight + sum of scaling * B @ A over the active adapters, as the LoRA layer's forward computes."""
    merged = layer.merged
    if layer.disable_adapters and merged:
        # The layer's forward would first unmerge the adapters from the base weight, in place.
        raise ValueError(
            f"{_named(name, layer)} has merged adapters but adapters are disabled; unmerge them "
            "(model.unmerge_adapter()) before computing softpo's loss"
        )
    base = _effective_weight(layer.base_layer, f"{name}.base_layer", None)
    out_dtype = base.dtype if dtype is None else dtype
    if layer.disable_adapters or merged:
        return base.to(out_dtype)
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    for adapter in adapters:
        _check_adapter(layer, adapter, name)
    if not adapters:
        return base.to(out_dtype)
    terms = [(layer.lora_B[a].weight, layer.lora_A[a].weight, layer.scaling[a]) for a in adapters]
    # The forward adds the adapters' output, in their own dtype, to the base's before rounding to the base's.
    sum_dtype = out_dtype
    for b, a, _ in terms:
        sum_dtype = torch.promote_types(sum_dtype, torch.promote_types(b.dtype, a.dtype))
    with torch.autocast(base.device.type, enabled=False):
        weight = base.to(sum_dtype)
        for b, a, scaling in terms:
            # The forward's lora_B(lora_A(x)) * scaling is x @ (scaling * B @ A).T, whatever fan_in_fan_out
            # says (that flag describes the base weight's layout, for merging only).
            weight = weight + scaling * (b.to(sum_dtype) @ a.to(sum_dtype))
    return weight.to(out_dtype)


def _check_adapter(layer: nn.Module, adapter: str, name: str) -> None:
    where = f"{_named(name, layer)}, adapter {adapter!r}"
    variants = getattr(layer, "lora_variant", {})
    if adapter in variants or getattr(layer, "use_dora", {}).get(adapter, False):
        kind = "DoRA" if getattr(layer, "use_dora", {}).get(adapter, False) else type(variants[adapter]).__name__
        raise ValueError(
            f"{where}: {kind} is not plain LoRA; softpo reproduces W + scaling * B @ A only. "
            "Use plain LoRA on the lm_head, or leave the lm_head out of target_modules"
        )
    dropout = layer.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout):
        if dropout.p > 0 and dropout.training:
            raise ValueError(
                f"{where}: lora_dropout={dropout.p} in training mode drops entries of the head's input, which "
                "no weight reproduces. Set lora_dropout=0 for the adapter on lm_head, or put the head in eval "
                "mode (head.eval()) while softpo computes the loss"
            )
    elif not isinstance(dropout, nn.Identity):
        raise ValueError(f"{where}: unknown lora_dropout module {type(dropout).__name__}")
    for part in ("lora_A", "lora_B"):
        module = getattr(layer, part)[adapter]
        if not _is_plain_linear(module):
            raise ValueError(f"{where}: {part} is a {type(module).__name__}, not a plain nn.Linear")
        if module.bias is not None:
            raise ValueError(f"{where}: {part} has a bias (lora_bias=True), which softpo's sweep does not add")
