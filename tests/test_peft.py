"""softpo under PEFT: the lm_head weight softpo sweeps (`softpo.lora.lm_head_weight`) reproduces the head
module's own forward, LoRA adapters included, and gives the adapters their gradient; a frozen head costs
no d weight on any route; the TRL drop-in matches TRL's GRPOTrainer with LoRA adapters on the model.
"""

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import softpo
from softpo.lora import lm_head_weight

from reference import (
    assert_close_to_gt, assert_norm_close_to_gt, loss_kwargs, random_lm_head_inputs, reference_policy_loss,
)

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
    assert len(head.active_adapters) == options.get("adapters", 1)
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
@pytest.mark.parametrize("impl, dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                         ("triton", torch.float32), ("triton", torch.bfloat16)],
                         ids=["torch-fp32", "torch-bf16", "triton-fp32", "triton-bf16"])
def test_adapter_gradients_through_token_logprobs(options, impl, dtype):
    _, head64 = _lora_head(**options)
    _, head_low = _lora_head(dtype, **options)
    hidden, _, targets = random_lm_head_inputs(B, T, H, V, seed=2)
    g_logp = torch.randn(B, T, dtype=torch.float64)
    gt = _reference_grads(head64, hidden, targets, g_logp)
    assert all(bool(g.abs().max() > 0) for g in gt.values())
    # float64 on the torch path: the chunked sweep against materialized logits, to float64 precision.
    if impl == "torch" and dtype == torch.float32:
        out = _softpo_grads(head64, hidden, targets, g_logp, impl)
        for name, g in gt.items():
            torch.testing.assert_close(out[name], g, rtol=1e-10, atol=1e-12, msg=name)
    ref = _reference_grads(head_low, hidden.to(dtype), targets, g_logp.to(dtype))
    out = _softpo_grads(head_low, hidden.to(dtype), targets, g_logp.to(dtype), impl)
    for name, g in gt.items():
        # bf16: the head's forward rounds the base's logits and the adapters' separately, softpo the summed
        # weight: element by element either may land on the other side of a rounding.
        check = assert_close_to_gt if dtype == torch.float32 else assert_norm_close_to_gt
        check(out[name], ref[name], g, dtype, name)


@pytest.mark.parametrize("config", [softpo.SAPO, softpo.GSPO], ids=["sapo-token", "gspo-sequence"])
@pytest.mark.parametrize("impl, memory", [("torch", "default"), ("triton", "default"), ("triton", "flat")],
                         ids=["torch", "triton", "triton-flat"])
def test_adapter_gradients_through_policy_loss_with_masked_rows(config, impl, memory):
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
                                      memory=memory, **kwargs).loss
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
    assert lm_head_weight(frozen) is frozen.weight  # the parameter itself: its requires_grad reaches the sweep
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
    with pytest.raises(ValueError, match=r"lm_head \(.*_QuantizedLinear\) is not an nn.Linear"):
        lm_head_weight(_QuantizedLinear(H, V, bias=False))
    with pytest.raises(ValueError, match=r"lm_head \(torch.nn.modules.container.Sequential\) is not"):
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
    quantized = _Head()
    quantized.lm_head = _QuantizedLinear(H, V, bias=False)
    with pytest.raises(ValueError, match=r"lm_head.base_layer \(.*_QuantizedLinear\) is not an nn.Linear"):
        lm_head_weight(get_peft_model(quantized, LoraConfig(r=2, target_modules=["lm_head"])).base_model.model.lm_head)
    with pytest.raises(ValueError, match=r"lm_head.base_layer \(torch.nn.modules.linear.Linear\) has a bias"):
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


# The TRL drop-in under PEFT, on test_trl's tiny Qwen2 and its captured batch, compared as test_trl compares.
try:
    import test_trl
except (ImportError, pytest.skip.Exception):  # trl or datasets missing: test_trl skips itself on import
    test_trl = None

needs_trl = pytest.mark.skipif(test_trl is None, reason="needs trl and datasets")
if test_trl is not None:
    from test_trl import _one_thread, first_step, model_dir  # noqa: E402,F401  (fixtures)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=len(test_trl.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny-qwen2-tied")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def _trl_accepts_an_adapter_on_lm_head():
    """TRL's GRPOTrainer refuses a PEFT layer as the output embedding; this hides the layer type from its check."""
    import trl.trainer.grpo_trainer as grpo_trainer

    class _NoTunerLayer:
        pass

    real = grpo_trainer.BaseTunerLayer
    grpo_trainer.BaseTunerLayer = _NoTunerLayer
    try:
        yield
    finally:
        grpo_trainer.BaseTunerLayer = real


def _peft_trainer(cls, path, output_dir, dtype, peft_config, overrides):
    from transformers import Qwen2ForCausalLM

    import datasets

    return cls(
        model=Qwen2ForCausalLM.from_pretrained(path, dtype=dtype), reward_funcs=test_trl._reward,
        args=test_trl._args(output_dir, **overrides), processing_class=test_trl._tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"prompt": test_trl.PROMPTS}), peft_config=peft_config,
    )


def _peft_pair(path, tmp_path, peft_config, overrides, dtype=torch.float32):
    """softpo's trainer and TRL's in float64, with the same PEFT config and the same adapter weights."""
    from softpo.integrations.trl import SoftpoGRPOTrainer

    overrides = dict(gradient_accumulation_steps=2, steps_per_generation=4, **overrides)
    trainer = _peft_trainer(SoftpoGRPOTrainer, path, tmp_path / "out", dtype, peft_config, overrides)
    gt_trainer = _peft_trainer(test_trl.GRPOTrainer, path, tmp_path / "gt", torch.float64, peft_config, overrides)
    gt_params = dict(gt_trainer.model.named_parameters())
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and trainable == [n for n, p in gt_params.items() if p.requires_grad]
    with torch.no_grad():
        # The adapters' random initialisation differs between the two constructions: one set of weights.
        for name, param in trainer.model.named_parameters():
            gt_params[name].copy_(param)
    for t in (trainer, gt_trainer):
        t.current_gradient_accumulation_steps = 2
        t.model.train()
    return trainer, gt_trainer


def _lora(**options):
    return LoraConfig(**{**dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False), **options})


PEFT_CASES = [
    pytest.param("model_dir", dict(target_modules=PROJECTIONS), "sapo", id="lora-projections-sapo"),
    pytest.param("model_dir", dict(target_modules=PROJECTIONS), "grpo", id="lora-projections-grpo"),
    pytest.param("model_dir", dict(target_modules=PROJECTIONS, modules_to_save=["lm_head"]), "dapo",
                 id="lora-projections-modules_to_save-lm_head"),
    pytest.param("tied_dir", dict(target_modules=PROJECTIONS), "sapo", id="tied-embeddings-lora-projections"),
    pytest.param("tied_dir", dict(target_modules=PROJECTIONS, modules_to_save=["lm_head"]), "grpo",
                 id="tied-embeddings-modules_to_save-lm_head"),
]


@needs_trl
@pytest.mark.parametrize("path_fixture, lora, loss_type", PEFT_CASES)
def test_trl_drop_in_matches_trl_under_peft(first_step, request, tmp_path, path_fixture, lora, loss_type):
    path = request.getfixturevalue(path_fixture)
    trainer, gt_trainer = _peft_pair(path, tmp_path, _lora(**lora), dict(loss_type=loss_type, beta=0.04))
    test_trl._compare(trainer, gt_trainer, test_trl._perturbed(first_step["inputs"], trainer, seed=21))


@needs_trl
def test_trl_drop_in_trains_an_adapter_on_lm_head(first_step, model_dir, tmp_path):
    with _trl_accepts_an_adapter_on_lm_head():
        trainer, gt_trainer = _peft_pair(model_dir, tmp_path, _lora(target_modules=PROJECTIONS + ["lm_head"]),
                                         dict(loss_type="dapo", beta=0.04), dtype=torch.float64)
    # gt's log-probs come from the model's forward, through the head's adapter (TRL's own fused head skips it).
    test_trl._compare_float64(trainer, gt_trainer, test_trl._perturbed(first_step["inputs"], trainer, seed=22))


@needs_trl
def test_policy_loss_trains_an_adapter_on_lm_head(model_dir):
    """softpo.policy_loss with lm_head_weight of a PEFT model's LoRA head: loss and the head adapter's gradient
    equal a float64 reference through the model's own forward; the base weight alone gives another loss."""
    from transformers import Qwen2ForCausalLM

    def build(dtype):
        torch.manual_seed(4)
        model = get_peft_model(Qwen2ForCausalLM.from_pretrained(model_dir, dtype=dtype),
                               _lora(target_modules=["q_proj", "lm_head"]))
        return model.to(dtype)

    model64, model32 = build(torch.float64), build(torch.float32)
    head64, head32 = (m.get_output_embeddings() for m in (model64, model32))
    assert type(head32).__name__ == "Linear" and hasattr(head32, "lora_A")
    ids = torch.randint(2, len(test_trl.VOCAB), (3, 9))
    targets, mask = ids[:, 1:], torch.ones(3, 8, dtype=torch.bool)
    mask[2, 5:] = False
    kwargs = loss_kwargs(softpo.SAPO, torch.full((3, 8), -3.0, dtype=torch.float64), uses_rollout=False)

    def run(model, head, ours, weight_of=lm_head_weight):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if ours:
            hidden = model.get_base_model().model(input_ids=ids).last_hidden_state[:, :-1]
            loss = softpo.policy_loss(softpo.SAPO, targets, mask, hidden=hidden, weight=weight_of(head),
                                      impl="torch", **kwargs).loss
        else:
            logits = model(input_ids=ids).logits[:, :-1]
            loss = reference_policy_loss(softpo.SAPO, targets, mask, logits=logits.double(), **kwargs)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return loss, {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}

    gt_loss, gt = run(model64, head64, ours=False)
    ref_loss, ref = run(model32, head32, ours=False)
    out_loss, out = run(model32, head32, ours=True)
    assert_close_to_gt(out_loss, ref_loss, gt_loss, torch.float32, "loss")
    head_adapter = [n for n in gt if "lm_head.lora_" in n]
    assert len(head_adapter) == 2 and all(bool(gt[n].abs().max() > 0) for n in head_adapter)
    for name, g in gt.items():
        assert_close_to_gt(out[name], ref[name], g, torch.float32, name)
    # What sweeping the base weight computes instead: another loss, and no gradient for the head's adapter.
    base_loss, base = run(model32, head32, ours=True, weight_of=lambda head: head.weight)
    assert abs(base_loss.item() - gt_loss.item()) > 1e-3 * abs(gt_loss.item())
    assert all(bool((base[n] == 0).all()) for n in head_adapter)


@needs_trl
def test_trl_drop_in_refuses_an_lm_head_adapter_with_dropout(model_dir, tmp_path):
    from softpo.integrations.trl import SoftpoGRPOTrainer

    lora = _lora(target_modules=["lm_head"], lora_dropout=0.1)
    with _trl_accepts_an_adapter_on_lm_head():
        try:
            _peft_trainer(SoftpoGRPOTrainer, model_dir, tmp_path, torch.float32, lora, dict(loss_type="grpo"))
        except ValueError as error:
            assert "lora_dropout=0.1" in str(error), str(error)
        else:
            raise AssertionError("the drop-in accepted an lm_head adapter whose dropout no weight reproduces")
