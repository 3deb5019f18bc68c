"""softpo under PEFT: the lm_head weight softpo sweeps (`softpo.lora.lm_head_weight`) reproduces the head
module's own forward, LoRA adapters included, and gives the adapters their gradient; a frozen head costs
no d weight on any route; the TRL drop-in matches TRL's GRPOTrainer with LoRA adapters on the model.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import softpo
from softpo.lora import lm_head_weight

from reference import assert_close_to_gt, loss_kwargs, random_lm_head_inputs, reference_policy_loss

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

# An odd vocabulary and a hidden size that no other tensor of the tests shares, so a [V, H] tensor is d weight.
B, T, H, V = 2, 7, 24, 97


class _Head(nn.Module):
    """The smallest model PEFT can wrap: just an lm_head."""

    def __init__(self, bias=False):
        super().__init__()
        self.lm_head = nn.Linear(H, V, bias=bias)
        with torch.no_grad():
            self.lm_head.weight.copy_(random_lm_head_inputs(1, 1, H, V, seed=5)[1])

    def forward(self, x):
        return self.lm_head(x)


def _lora_head(dtype=torch.float64, adapters=1, **options):
    """A PEFT model over _Head with LoRA on lm_head (B random too, so every gradient is non-zero); its head."""
    torch.manual_seed(1)
    settings = dict(r=8, lora_alpha=5, target_modules=["lm_head"], init_lora_weights=False, lora_dropout=0.0)
    settings.update(options)
    model = get_peft_model(_Head(), LoraConfig(**settings))
    for index in range(1, adapters):
        model.add_adapter(f"extra{index}", LoraConfig(**dict(settings, r=3, lora_alpha=2)))
    if adapters > 1:
        model.base_model.set_adapter(["default"] + [f"extra{i}" for i in range(1, adapters)])
    return model.to(dtype), model.base_model.model.lm_head


def _adapter_params(head):
    return {n: p for n, p in head.named_parameters() if "lora_" in n and p.requires_grad}


HEADS = [
    pytest.param(dict(r=1, lora_alpha=3), id="r1-alpha3"),
    pytest.param(dict(r=8, lora_alpha=5), id="r8-alpha5"),
    pytest.param(dict(r=8, lora_alpha=5, use_rslora=True), id="r8-rslora"),
    pytest.param(dict(r=1, lora_alpha=3, use_rslora=True), id="r1-rslora"),
    pytest.param(dict(adapters=2), id="two-active-adapters"),
]


@pytest.mark.parametrize("options", HEADS)
def test_weight_reproduces_the_heads_forward(options):
    _, head = _lora_head(**options)
    hidden = torch.randn(5, H, dtype=torch.float64)
    weight = lm_head_weight(head)
    assert weight.shape == (V, H) and weight.dtype == torch.float64
    torch.testing.assert_close(hidden @ weight.T, head(hidden), rtol=1e-12, atol=1e-12)
    # The adapters contribute: the base weight alone is another head.
    assert not torch.allclose(hidden @ head.weight.T, head(hidden))


def test_merged_disabled_and_fan_in_fan_out_follow_the_forward():
    model, head = _lora_head(adapters=2)
    hidden = torch.randn(5, H, dtype=torch.float64)
    unmerged = head(hidden)
    model.base_model.merge_adapter()
    assert head.merged
    # Merged: the adapters are in the base weight, which is what is returned (no adapter added twice).
    torch.testing.assert_close(hidden @ lm_head_weight(head).T, head(hidden), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(hidden), unmerged, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="merged adapters but adapters are disabled"):
        with model.disable_adapter():
            lm_head_weight(head)
    model.base_model.unmerge_adapter()
    with model.disable_adapter():
        assert lm_head_weight(head) is head.base_layer.weight
        torch.testing.assert_close(hidden @ lm_head_weight(head).T, head(hidden), rtol=1e-12, atol=1e-12)
    # fan_in_fan_out describes the base weight's layout for merging; the LoRA forward does not read it.
    head.fan_in_fan_out = True
    torch.testing.assert_close(hidden @ lm_head_weight(head).T, head(hidden), rtol=1e-12, atol=1e-12)


def test_dtype_forms_the_sum_before_rounding():
    # A bf16 base with fp32 adapters (PEFT's default): asked for fp32, the adapters are not rounded to bf16 first.
    model, head = _lora_head(torch.float32)
    head.base_layer.to(torch.bfloat16)
    weight = lm_head_weight(head, dtype=torch.float32)
    assert lm_head_weight(head).dtype == torch.bfloat16 and weight.dtype == torch.float32
    exact = head.base_layer.weight.double() + head.scaling["default"] * (
        head.lora_B["default"].weight.double() @ head.lora_A["default"].weight.double()
    )
    torch.testing.assert_close(weight.double(), exact, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="dtype"):
        lm_head_weight(head, dtype=torch.int32)


def _reference_grads(head, hidden, targets, g_logp):
    log_probs = torch.log_softmax(head(hidden), dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    params = _adapter_params(head)
    return dict(zip(params, torch.autograd.grad((logp * g_logp).sum(), list(params.values()))))


def _softpo_grads(head, hidden, targets, g_logp, impl):
    logp = softpo.token_logprobs(targets, hidden=hidden, weight=lm_head_weight(head), impl=impl)
    params = _adapter_params(head)
    return dict(zip(params, torch.autograd.grad((logp * g_logp).sum(), list(params.values()))))


@pytest.mark.parametrize("options", [HEADS[1], HEADS[2], HEADS[4]])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_adapter_gradients_through_token_logprobs(options, impl):
    _, head64 = _lora_head(**options)
    _, head32 = _lora_head(torch.float32, **options)
    hidden, _, targets = random_lm_head_inputs(B, T, H, V, seed=2)
    g_logp = torch.randn(B, T, dtype=torch.float64)
    gt = _reference_grads(head64, hidden, targets, g_logp)
    assert all(bool(g.abs().max() > 0) for g in gt.values())
    # float64 on the torch path: the chunked sweep against materialized logits, to float64 precision.
    if impl == "torch":
        out = _softpo_grads(head64, hidden, targets, g_logp, impl)
        for name, g in gt.items():
            torch.testing.assert_close(out[name], g, rtol=1e-10, atol=1e-12, msg=name)
    ref = _reference_grads(head32, hidden.float(), targets, g_logp.float())
    out = _softpo_grads(head32, hidden.float(), targets, g_logp.float(), impl)
    for name, g in gt.items():
        assert_close_to_gt(out[name], ref[name], g, torch.float32, name)


@pytest.mark.parametrize("config", [softpo.SAPO, softpo.GSPO], ids=["sapo-token", "gspo-sequence"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_adapter_gradients_through_policy_loss_with_masked_rows(config, impl):
    _, head64 = _lora_head(adapters=2)
    _, head32 = _lora_head(torch.float32, adapters=2)
    hidden, _, targets = random_lm_head_inputs(B, T, H, V, seed=3)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    kwargs = loss_kwargs(config, torch.full((B, T), -4.0, dtype=torch.float64), uses_rollout=False)

    def grads(head, h, ours):
        params = _adapter_params(head)
        if ours:
            loss = softpo.policy_loss(config, targets, mask, hidden=h, weight=lm_head_weight(head), impl=impl,
                                      **kwargs).loss
        else:
            loss = reference_policy_loss(config, targets, mask, logits=head(h).double(), **kwargs)
        return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    gt_loss, gt = grads(head64, hidden, ours=False)
    ref_loss, ref = grads(head32, hidden.float(), ours=False)
    out_loss, out = grads(head32, hidden.float(), ours=True)
    assert_close_to_gt(out_loss, ref_loss, gt_loss, torch.float32, "loss")
    for name, g in gt.items():
        assert bool(g.abs().max() > 0), name
        assert_close_to_gt(out[name], ref[name], g, torch.float32, name)


# The routes a frozen head must take without d weight: (config, impl, memory) for policy_loss, or None for
# token_logprobs's plain sweep.
FROZEN_ROUTES = [
    pytest.param(softpo.SAPO, "triton", "default", id="sapo-triton-gradient-in-forward"),
    pytest.param(softpo.SAPO, "triton", "flat", id="sapo-triton-flat"),
    pytest.param(softpo.GSPO, "triton", "default", id="gspo-triton-sequence-gradient"),
    pytest.param(softpo.GSPO, "triton", "flat", id="gspo-triton-flat"),
    pytest.param(softpo.SAPO.replace(entropy_coef=0.02), "torch", "default", id="sapo-torch-chunked"),
    pytest.param(softpo.GSPO, "torch", "flat", id="gspo-torch-chunked-flat"),
    pytest.param(None, "triton", "default", id="token_logprobs-triton"),
    pytest.param(None, "torch", "default", id="token_logprobs-torch"),
]


class _WeightShapedAllocations(TorchDispatchMode):
    """Counts the distinct storages of [V, H] tensors that ops create: a d weight (accumulator or result)."""

    def __init__(self, weight):
        super().__init__()
        self.weight_storage = weight.untyped_storage().data_ptr()
        self.storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (V, H):
                storage = tensor.untyped_storage().data_ptr()
                if storage != self.weight_storage:
                    self.storages.add(storage)
        return out


def _run_head(head, route, hidden, targets, mask):
    config, impl, memory = route
    h = hidden.clone().requires_grad_()
    counter = _WeightShapedAllocations(head.weight)
    with counter:
        weight = lm_head_weight(head)
        if config is None:
            logp, entropy = softpo.token_logprobs(targets, hidden=h, weight=weight, impl=impl, memory=memory,
                                                  return_entropy=True)
            loss = (torch.where(mask, logp + 0.1 * entropy, 0.0)).sum()
        else:
            kwargs = loss_kwargs(config, torch.full((B, T), -4.0, dtype=torch.float64), uses_rollout=False)
            loss = softpo.policy_loss(config, targets, mask, hidden=h, weight=weight, impl=impl, memory=memory,
                                      **kwargs).loss
        loss.backward()
    return loss.detach(), h.grad, len(counter.storages)


@pytest.mark.parametrize("config, impl, memory", FROZEN_ROUTES)
def test_frozen_head_forms_no_weight_gradient(config, impl, memory):
    hidden, weight, targets = random_lm_head_inputs(B, T, H, V, seed=4, dtype=torch.float32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    trainable, frozen = nn.Linear(H, V, bias=False), nn.Linear(H, V, bias=False)
    for head in (trainable, frozen):
        with torch.no_grad():
            head.weight.copy_(weight)
    frozen.weight.requires_grad_(False)
    route = (config, impl, memory)
    trained_loss, trained_d_hidden, trained_allocations = _run_head(trainable, route, hidden, targets, mask)
    frozen_loss, frozen_d_hidden, frozen_allocations = _run_head(frozen, route, hidden, targets, mask)
    # The count can see a d weight: the trainable head's is there.
    assert trainable.weight.grad is not None and trained_allocations >= 1
    assert frozen.weight.grad is None
    assert frozen_allocations == 0, f"{frozen_allocations} weight-shaped tensors allocated for a frozen head"
    assert torch.equal(frozen_loss, trained_loss)
    torch.testing.assert_close(frozen_d_hidden, trained_d_hidden, rtol=0, atol=0)


class _QuantizedLinear(nn.Linear):
    """Stands for a layer that keeps nn.Linear's attributes but computes its own forward (int8, fp8, ...)."""

    def forward(self, x):
        return super().forward(x)


def test_heads_softpo_cannot_reproduce_raise():
    with pytest.raises(ValueError, match="has a bias"):
        lm_head_weight(nn.Linear(H, V))
    with pytest.raises(ValueError, match="_QuantizedLinear is not an nn.Linear"):
        lm_head_weight(_QuantizedLinear(H, V, bias=False))
    with pytest.raises(ValueError, match="Sequential is not an nn.Linear"):
        lm_head_weight(nn.Sequential(nn.Linear(H, V, bias=False)))
    with pytest.raises(ValueError, match="head must be an nn.Module"):
        lm_head_weight(torch.zeros(V, H))
    with pytest.raises(ValueError, match="DoRA"):
        lm_head_weight(_lora_head(use_dora=True)[1])
    # PEFT allows lora_bias only over a biased base layer; a B with a bias is refused on its own too.
    _, head = _lora_head()
    head.lora_B["default"].bias = nn.Parameter(torch.zeros(V, dtype=torch.float64))
    with pytest.raises(ValueError, match="lora_B has a bias"):
        lm_head_weight(head)
    with pytest.raises(ValueError, match="base_layer has a bias"):
        lm_head_weight(get_peft_model(_Head(bias=True), LoraConfig(r=2, target_modules=["lm_head"]))
                       .base_model.model.lm_head)


def test_lora_dropout_in_training_raises_and_eval_is_exact():
    model, head = _lora_head(lora_dropout=0.1)
    model.train()
    with pytest.raises(ValueError, match=r"lora_dropout=0.1 in training mode.*lora_dropout=0.*eval mode"):
        lm_head_weight(head)
    model.eval()
    hidden = torch.randn(5, H, dtype=torch.float64)
    torch.testing.assert_close(hidden @ lm_head_weight(head).T, head(hidden), rtol=1e-12, atol=1e-12)


def test_modules_to_save_wrapper_follows_its_active_copy():
    torch.manual_seed(2)

    class _Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(H, H)
            self.lm_head = nn.Linear(H, V, bias=False)

        def forward(self, x):
            return self.lm_head(self.body(x))

    model = get_peft_model(_Body(), LoraConfig(r=2, target_modules=["body"], modules_to_save=["lm_head"]))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # the trainable copy moves away from the original
    hidden = torch.randn(5, H)
    assert lm_head_weight(head) is head.modules_to_save["default"].weight
    torch.testing.assert_close(hidden @ lm_head_weight(head).T, head(hidden))
    with model.disable_adapter():
        assert lm_head_weight(head) is head.original_module.weight
        torch.testing.assert_close(hidden @ lm_head_weight(head).T, head(hidden))
