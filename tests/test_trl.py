"""softpo inside TRL's GRPOTrainer: same loss, gradients and metrics as TRL's own loss on the same batch.

A tiny Qwen2 and a character tokenizer are built in code (nothing is downloaded). One real two-step run
with `SoftpoGRPOTrainer` captures the batch of its first step; every configuration is then checked on
that batch by calling both losses directly: gt = TRL's loss on a float64 copy of the model, ref = TRL's
loss in float32, out = softpo's in float32, for the loss and every parameter's gradient.
"""

import copy
import math
import os
import pathlib
import socket
import time
import types
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

# TRL's GRPOConfig default (gradient_checkpointing=True) trips transformers' own deprecation notices.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

# Nothing may reach the network: no hub lookups, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from softpo.integrations.trl import (  # noqa: E402
    SoftpoGRPOTrainer,
    loss_config_from_grpo_config,
    softpo_trainer,
)

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"
VOCAB = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
PROMPTS = ["1+2=", "3+4=", "ab ", "xyz", "5+5=", "hi ", "7+1=", "cat "]
# Tolerance on top of TRL's own float32 error, relative to the float64 value, and absolute.
RTOL, ATOL = 1e-5, 1e-6


def _tokenizer():
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


def _reward(completions, **kwargs):
    # Favours digits, so completions of one group get different rewards and nonzero advantages.
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.1 * len(c) for c in completions]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The model is tiny: threads only add synchronization, which dominates when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny-qwen2")
    # Saved so that TRL can build its reference model from the path when beta > 0.
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def scaled_dir(model_dir, tmp_path_factory):
    # The same weights with a logit scale in the config (Cohere's `logit_scale`), which TRL's head applies.
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    model.config.logit_scale = 1.7
    path = tmp_path_factory.mktemp("tiny-qwen2-scaled")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    torch.manual_seed(1)
    config = Qwen3MoeConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=None,
        router_aux_loss_coef=0.02,
    )
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    return str(path)


def _args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=2, report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
        learning_rate=1e-2, temperature=0.9, seed=0,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


# Eager experts: the grouped-matmul path of MoE layers has no float64 kernel.
_MODEL_KWARGS = {Qwen3MoeForCausalLM: {"experts_implementation": "eager"}}


def _trainer(cls, model_dir, output_dir, dtype=torch.float32, model_class=Qwen2ForCausalLM, **overrides):
    return cls(
        model=model_class.from_pretrained(model_dir, dtype=dtype, **_MODEL_KWARGS.get(model_class, {})),
        reward_funcs=_reward,
        args=_args(output_dir, **overrides),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=_tokenizer(),
    )


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))


def _assert_matches(out, ref, gt, what):
    out, ref, gt = out.double(), ref.double(), gt.double()
    bound = (ref - gt).abs() + RTOL * gt.abs() + ATOL
    worst = ((out - gt).abs() - bound).max().item()
    assert worst <= 0, f"{what}: |out - gt| exceeds |ref - gt| + tol by {worst:.3g}"


def _assert_same_loss_and_grads(out_loss, out_grads, ref_loss, ref_grads, gt_loss, gt_grads):
    _assert_matches(out_loss, ref_loss, gt_loss, "loss")
    assert out_grads.keys() == ref_grads.keys()
    for name, gt in gt_grads.items():
        zero = torch.zeros_like(gt)
        out, ref = out_grads[name], ref_grads[name]
        _assert_matches(zero if out is None else out, zero if ref is None else ref, zero if gt is None else gt, name)


@pytest.fixture(scope="module")
def first_step(model_dir, tmp_path_factory):
    """The real run: two optimizer steps of SoftpoGRPOTrainer; returns what its first step saw."""
    seen = {}

    class Recording(SoftpoGRPOTrainer):
        def _compute_loss(self, model, inputs):
            if not seen:
                seen["inputs"] = {
                    k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in inputs.items()
                }
                ref_loss = GRPOTrainer._compute_loss(self, model, inputs)
                seen["ref"] = (ref_loss.detach(), _grads(model, ref_loss))
                loss = super()._compute_loss(model, inputs)
                seen["out"] = (loss.detach(), _grads(model, loss))
                return loss
            return super()._compute_loss(model, inputs)

    trainer = _trainer(Recording, model_dir, tmp_path_factory.mktemp("run"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    seen["logs"] = trainer.state.log_history
    seen["moved"] = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    return seen


def test_two_step_training_run(first_step):
    logs = [entry for entry in first_step["logs"] if "loss" in entry]
    assert len(logs) == 2
    for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert all(name in entry for entry in logs), name
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert first_step["moved"], "two optimizer steps left every parameter unchanged"


def test_first_step_matches_trl(first_step, model_dir, tmp_path):
    inputs = first_step["inputs"]
    assert bool((inputs["advantages"] != 0).any()), "the captured batch has no learning signal"
    gt_trainer = _trainer(GRPOTrainer, model_dir, tmp_path, dtype=torch.float64)
    gt_trainer.current_gradient_accumulation_steps = 1
    gt_loss = gt_trainer._compute_loss(gt_trainer.model, inputs)
    gt = (gt_loss.detach(), _grads(gt_trainer.model, gt_loss))
    _assert_same_loss_and_grads(*first_step["out"], *first_step["ref"], *gt)


def _perturbed(inputs, trainer, seed):
    """The captured batch made off-policy: old and reference log-probs away from the current ones, and
    advantages of both signs, so that clipping, the KL term and every gate branch are exercised."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, inputs["completion_ids"].size(1)
        )
    B, T = logp.shape
    mask = inputs["completion_mask"].float()
    inputs["old_per_token_logps"] = (logp + 0.3 * torch.randn(B, T, generator=g)) * mask
    inputs["ref_per_token_logps"] = (logp + 0.5 * torch.randn(B, T, generator=g)) * mask
    inputs["advantages"] = torch.randn(B, generator=g)
    return inputs


def _sampler_correction(inputs, mode, cap, seed, clip_min=None):
    """What TRL's generation step adds under vLLM: sampler log-probs (one unscored) and its weight."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(inputs)
    old, mask = inputs["old_per_token_logps"], inputs["completion_mask"].float()
    sampled = old + 0.05 * torch.randn(old.shape, generator=g)
    sampled[0, 0] = float("nan")
    inputs["sampling_per_token_logps"] = sampled
    diff = torch.nan_to_num((old - sampled) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    weight = torch.exp(diff)
    if mode.endswith("truncate"):
        inputs["importance_sampling_ratio"] = weight.clamp(min=clip_min, max=cap)
    else:
        low, high = -math.inf if clip_min is None else clip_min, math.inf if cap is None else cap
        inputs["importance_sampling_ratio"] = weight.masked_fill((weight < low) | (weight > high), 0.0)
    return inputs


def _case(loss_type, level="token", **overrides):
    name = "-".join([loss_type, level] + [f"{k}={v}" for k, v in overrides.items()])
    return pytest.param(dict(loss_type=loss_type, importance_sampling_level=level, **overrides), id=name)


# TRL's loss options beyond the loss types above: alone, and with the KL and the entropy bonus.
NEW_CASES = [
    _case("luspo", "sequence"),
    _case("luspo", "token"),  # TRL warns but computes it: a token ratio, each sequence's terms summed
    _case("luspo", "sequence", beta=0.04, entropy_coef=0.05),
    _case("vespo"),
    _case("vespo", vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=6.0),
    _case("vespo", beta=0.04, entropy_coef=0.05, use_bias_correction_kl=True),
    _case("vespo", "sequence", beta=0.04, use_bias_correction_kl=True),  # TRL warns; the KL sees the GSPO ratio
    _case("grpo", top_entropy_quantile=0.2),
    _case("dapo", top_entropy_quantile=0.5, beta=0.04, entropy_coef=0.05),
    _case("vespo", top_entropy_quantile=0.0),  # only the highest-entropy token (and its ties) counts
    _case("luspo", "sequence", top_entropy_quantile=0.3),
    _case("grpo", off_policy_mask_threshold=0.02),
    # TRL picks SAPO's tau with torch.where, in float32: temperatures exact in float32 keep the comparison exact.
    _case("sapo", off_policy_mask_threshold=0.02, beta=0.04, entropy_coef=0.05, sapo_temperature_neg=1.125),
    _case("dapo", "sequence", off_policy_mask_threshold=0.0, top_entropy_quantile=0.6),
    _case("cispo", use_adaptive_entropy=True, entropy_coef=0.03),
    _case("grpo", use_adaptive_entropy=True, entropy_coef=0.03, top_entropy_quantile=0.4, beta=0.04),
]

CASES = [
    *[_case(t, level) for t in ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo") for level in ("token", "sequence")],
    _case("grpo", beta=0.04, use_bias_correction_kl=True),  # TRL's default KL: weighted by the ratio
    _case("grpo", beta=0.04, use_bias_correction_kl=False),
    _case("dapo", "sequence", beta=0.04, use_bias_correction_kl=True),  # a sequence ratio on a token KL
    _case("dapo", entropy_coef=0.05),  # the bonus is scaled by accumulation only, the policy term by tokens
    _case("sapo", entropy_coef=0.05, beta=0.02),
    _case("grpo", delta=1.3, epsilon_high=0.25),  # INTELLECT-2's two-sided clip
    _case("cispo", epsilon_high=1.1),  # the cap binds on the perturbed ratios
    _case("dapo", temperature=0.6, max_completion_length=12),
    _case("dr_grpo", max_completion_length=16),
    _case("sapo", cast_lm_head_to_fp32=True),  # TRL swaps the head's forward; softpo reads its weight
    _case("grpo", delta=1.1, epsilon_high=0.2),  # TRL accepts a dual clip inside the clip range
    *NEW_CASES,
]


def _compare(trainer, gt_trainer, inputs):
    # The adaptive entropy controller's state, which each loss call moves: both calls start from it.
    control = (trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats)
    out_loss = trainer._compute_loss(trainer.model, inputs)
    out_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats = control
    ref_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    ref_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    gt_loss = gt_trainer._compute_loss(gt_trainer.model, inputs)
    _assert_same_loss_and_grads(
        out_loss.detach(), _grads(trainer.model, out_loss),
        ref_loss.detach(), _grads(trainer.model, ref_loss),
        gt_loss.detach(), _grads(gt_trainer.model, gt_loss),
    )
    assert out_metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        assert out_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def _pair(model_dir, tmp_path, overrides, mode="train", model_class=Qwen2ForCausalLM, dtype=torch.float32):
    # Accumulation 2 and 4 steps per generation, so that every normalizer's scaling is visible.
    overrides = dict(gradient_accumulation_steps=2, steps_per_generation=4, **overrides)
    trainer = _trainer(SoftpoGRPOTrainer, model_dir, tmp_path / "out", dtype, model_class, **overrides)
    gt_trainer = _trainer(GRPOTrainer, model_dir, tmp_path / "gt", torch.float64, model_class, **overrides)
    for t in (trainer, gt_trainer):
        t.current_gradient_accumulation_steps = 2
        t.model.train(mode == "train")
    return trainer, gt_trainer


@pytest.mark.parametrize("overrides", CASES)
def test_loss_matches_trl(first_step, model_dir, tmp_path, overrides):
    trainer, gt_trainer = _pair(model_dir, tmp_path, overrides)
    _compare(trainer, gt_trainer, _perturbed(first_step["inputs"], trainer, seed=1))


def _float64_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                 compute_entropy=False, compute_aux_loss=False, **kwargs):
    """TRL's per-token log-probs and entropies, by plain float64 torch rather than TRL's fp32 vocabulary kernel."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1 : -1]
    log_probs = torch.log_softmax(logits.double() / self.temperature, dim=-1)
    logp = log_probs.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if compute_entropy else None
    return logp, entropy, None


def _compare_float64(trainer, gt_trainer, inputs):
    """softpo and TRL's loss both in float64: loss, every gradient and every logged metric equal to 1e-9.

    TRL's own vocabulary sweep runs in fp32 whatever the model's dtype, so the TRL side gets a float64 one:
    what is compared to 1e-9 is the loss math on top of it."""
    gt_trainer._get_per_token_logps_and_entropies = types.MethodType(_float64_logps_and_entropies, gt_trainer)
    out_loss = trainer._compute_loss(trainer.model, inputs)
    out_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    gt_loss = gt_trainer._compute_loss(gt_trainer.model, inputs)
    gt_metrics = {k: v[-1] for k, v in gt_trainer._metrics["train"].items()}
    torch.testing.assert_close(out_loss, gt_loss, rtol=1e-9, atol=1e-12)
    out_grads, gt_grads = _grads(trainer.model, out_loss), _grads(gt_trainer.model, gt_loss)
    for name, gt in gt_grads.items():
        out = out_grads[name]
        torch.testing.assert_close(
            torch.zeros_like(gt) if out is None else out, gt, rtol=1e-9, atol=1e-12, msg=name
        )
    assert out_metrics.keys() == gt_metrics.keys()
    for name, value in gt_metrics.items():
        out = out_metrics[name]
        # TRL takes its clip fractions of `.float()` masks: those are float32 roundings of the same fraction.
        as_float32 = torch.tensor(out, dtype=torch.float32) == torch.tensor(value, dtype=torch.float32)
        assert out == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True) or (
            "clip_ratio" in name and bool(as_float32)
        ), (name, out, value)


@pytest.mark.parametrize("overrides", NEW_CASES)
def test_new_options_match_trl_in_float64(first_step, model_dir, tmp_path, overrides):
    trainer, gt_trainer = _pair(model_dir, tmp_path, overrides, dtype=torch.float64)
    _compare_float64(trainer, gt_trainer, _perturbed(first_step["inputs"], trainer, seed=11))


def test_adaptive_entropy_follows_trl_over_steps(first_step, model_dir, tmp_path):
    # A target above the tiny model's entropy, so the coefficient is applied and grows, then one below it.
    overrides = dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.02, entropy_coef_delta=0.01,
                     entropy_target=10.0, top_entropy_quantile=0.5)
    trainer, gt_trainer = _pair(model_dir, tmp_path, overrides, dtype=torch.float64)
    inputs = _perturbed(first_step["inputs"], trainer, seed=12)
    for step in range(4):
        if step == 3:
            for t in (trainer, gt_trainer):
                t.args.entropy_target = 0.5
            trainer.softpo_config = trainer.softpo_config.replace(entropy_target=0.5)
        _compare_float64(trainer, gt_trainer, inputs)
        assert trainer.entropy_coef == pytest.approx(gt_trainer.entropy_coef, rel=1e-12)
        assert trainer._last_world_entropy == pytest.approx(gt_trainer._last_world_entropy, rel=1e-9)
    # 0.02 -> 0.03 -> 0.04 -> 0.05 while the entropy is below 10, then down once it is above 0.5.
    assert trainer.entropy_coef == pytest.approx(0.04)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_eval_mode_matches_trl(first_step, model_dir, tmp_path, loss_type):
    # In evaluation TRL neither divides by accumulation nor spreads num_items_in_batch over steps.
    trainer, gt_trainer = _pair(model_dir, tmp_path, dict(loss_type=loss_type, entropy_coef=0.05), mode="eval")
    inputs = _perturbed(first_step["inputs"], trainer, seed=2)
    with torch.no_grad():
        out = trainer._compute_loss(trainer.model, inputs)
        ref = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        gt = gt_trainer._compute_loss(gt_trainer.model, inputs)
    _assert_matches(out, ref, gt, "eval loss")


SAMPLER_CASES = [
    pytest.param(mode, "dapo", None, 1.04, {}, id=f"{mode}") for mode in
    ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
] + [
    pytest.param("token_truncate", "grpo", 0.97, 1.04, {}, id="token_truncate-clip_min"),
    pytest.param("token_mask", "sapo", 0.97, None, dict(beta=0.04, entropy_coef=0.05), id="token_mask-min-only"),
    pytest.param("sequence_truncate", "dapo", 0.9, 1.1, {}, id="sequence_truncate-clip_min"),
    pytest.param("sequence_mask", "luspo", 0.9, None, {}, id="sequence_mask-min-only-luspo"),
    pytest.param("token_truncate", "vespo", 0.97, 1.04, dict(beta=0.04), id="token_truncate-vespo"),
    pytest.param("token_mask", "vespo", 0.97, 1.04, {}, id="token_mask-vespo"),
    pytest.param("token_truncate", "grpo", None, 1.04, dict(off_policy_mask_threshold=0.01), id="off-policy-sampler"),
]


def _sampler_pair(model_dir, tmp_path, mode, loss_type, clip_min, cap, extra, dtype=torch.float32):
    # vLLM is not installed here: the trainers are built without it and then told the batch came from it.
    overrides = dict(loss_type=loss_type, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=cap,
                     vllm_importance_sampling_clip_min=clip_min, **extra)
    trainer, gt_trainer = _pair(model_dir, tmp_path, overrides, dtype=dtype)
    for t in (trainer, gt_trainer):
        t.use_vllm = t.args.use_vllm = True
    trainer.softpo_config = loss_config_from_grpo_config(trainer.args)
    return trainer, gt_trainer


@pytest.mark.parametrize("mode, loss_type, clip_min, cap, extra", SAMPLER_CASES)
def test_sampler_correction_matches_trl(first_step, model_dir, tmp_path, mode, loss_type, clip_min, cap, extra):
    trainer, gt_trainer = _sampler_pair(model_dir, tmp_path, mode, loss_type, clip_min, cap, extra)
    inputs = _sampler_correction(_perturbed(first_step["inputs"], trainer, seed=3), mode, cap, 4, clip_min)
    _compare(trainer, gt_trainer, inputs)
    trainer, gt_trainer = _sampler_pair(
        model_dir, tmp_path / "64", mode, loss_type, clip_min, cap, extra, torch.float64
    )
    # In float64 throughout: TRL's VESPO takes the log of the batch's ratio in the ratio's own dtype.
    ratio = inputs["importance_sampling_ratio"].double()
    _compare_float64(trainer, gt_trainer, dict(inputs, importance_sampling_ratio=ratio))


def test_batch_importance_sampling_ratio_is_used_as_given(first_step, model_dir, tmp_path):
    # A rollout_func or subclass may put its own ratio in the batch: TRL multiplies by it as it is.
    trainer, gt_trainer = _sampler_pair(model_dir, tmp_path, "token_truncate", "grpo", 0.5, 2.0, {}, torch.float64)
    inputs = _sampler_correction(_perturbed(first_step["inputs"], trainer, seed=3), "token_truncate", 2.0, 4, 0.5)
    g = torch.Generator().manual_seed(5)
    inputs["importance_sampling_ratio"] = 0.5 + 1.5 * torch.rand(inputs["importance_sampling_ratio"].shape, generator=g)
    _compare_float64(trainer, gt_trainer, inputs)


@pytest.mark.parametrize("loss_type", ["sapo", "dapo"])
def test_moe_router_loss_matches_trl(first_step, moe_dir, tmp_path, loss_type):
    # The captured batch's token ids are valid for the MoE model too (same tokenizer); its own logits differ.
    trainer, gt_trainer = _pair(moe_dir, tmp_path, dict(loss_type=loss_type), model_class=Qwen3MoeForCausalLM)
    assert trainer.aux_loss_enabled
    _compare(trainer, gt_trainer, _perturbed(first_step["inputs"], trainer, seed=7))


def test_logit_scale_matches_trl(first_step, scaled_dir, tmp_path):
    trainer, gt_trainer = _pair(scaled_dir, tmp_path, dict(loss_type="grpo", temperature=0.8, entropy_coef=0.05))
    assert trainer._softpo_logit_scale == 1.7
    _compare(trainer, gt_trainer, _perturbed(first_step["inputs"], trainer, seed=8))


def test_loss_forward_never_calls_lm_head(first_step, model_dir, tmp_path):
    trainer, _ = _pair(model_dir, tmp_path, dict(loss_type="grpo"))
    calls = []
    trainer.model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    trainer._compute_loss(trainer.model, _perturbed(first_step["inputs"], trainer, seed=5))
    assert calls == [], f"the softpo loss forward built logits of shape {calls}"


def test_unknown_loss_type_raises():
    args = _args("unused")
    args.loss_type = "made_up"  # past GRPOConfig's own check, as a newer TRL's loss type would be
    with pytest.raises(ValueError, match="loss_type"):
        loss_config_from_grpo_config(args)


def test_every_trl_loss_option_maps_to_a_loss_config():
    args = _args(
        "unused", loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5,
        top_entropy_quantile=0.3, off_policy_mask_threshold=0.4, use_adaptive_entropy=True, entropy_coef=0.01,
        entropy_coef_min=0.001, entropy_coef_max=0.5, entropy_coef_delta=0.002, entropy_target=0.7,
        use_vllm=True, vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.5,
        vllm_importance_sampling_clip_max=None,
    )
    config = loss_config_from_grpo_config(args)
    assert (config.gate, config.loss_aggregation) == ("vespo", "token-mean")
    assert (config.vespo_k_pos, config.vespo_lambda_pos, config.vespo_k_neg, config.vespo_lambda_neg) == (
        1.5, 2.5, 2.5, 1.5
    )
    assert (config.top_entropy_quantile, config.off_policy_mask_threshold) == (0.3, 0.4)
    assert config.use_adaptive_entropy and (
        config.entropy_coef_min, config.entropy_coef_max, config.entropy_coef_delta, config.entropy_target
    ) == (0.001, 0.5, 0.002, 0.7)
    assert (config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_cap) == (0.5, None)
    luspo = loss_config_from_grpo_config(_args("unused", loss_type="luspo", importance_sampling_level="sequence"))
    assert (luspo.gate, luspo.loss_aggregation, luspo.importance_sampling_level) == (
        "clip", "seq-mean-token-sum", "sequence"
    )


def test_small_delta_is_accepted_as_trl_accepts_it():
    with pytest.warns(UserWarning, match="delta"):
        config = loss_config_from_grpo_config(_args("unused", delta=1.1, epsilon_high=0.2))
    assert config.delta == 1.1


class _CustomRewardTrainer(GRPOTrainer):
    """A user subclass that changes something other than the loss."""

    def _calculate_rewards(self, *args, **kwargs):
        return super()._calculate_rewards(*args, **kwargs)


class _CustomLossTrainer(GRPOTrainer):
    def _compute_loss(self, model, inputs):
        return super()._compute_loss(model, inputs) * 2


def test_wrap_existing_trainer_class(first_step, model_dir, tmp_path):
    wrapped = softpo_trainer(_CustomRewardTrainer)
    assert issubclass(wrapped, _CustomRewardTrainer) and softpo_trainer(_CustomRewardTrainer) is wrapped
    assert softpo_trainer(GRPOTrainer) is SoftpoGRPOTrainer
    settings = dict(loss_type="grpo", gradient_accumulation_steps=2, steps_per_generation=4)
    trainer = _trainer(wrapped, model_dir, tmp_path / "out", **settings)
    gt_trainer = _trainer(GRPOTrainer, model_dir, tmp_path / "gt", dtype=torch.float64, **settings)
    for t in (trainer, gt_trainer):
        t.current_gradient_accumulation_steps = 2
    _compare(trainer, gt_trainer, _perturbed(first_step["inputs"], trainer, seed=6))
    with pytest.raises(ValueError, match="_compute_loss"):
        softpo_trainer(_CustomLossTrainer)
    with pytest.raises(ValueError, match="trainer_class"):
        softpo_trainer(dict)


def test_importing_softpo_does_not_import_trl():
    code = "import sys, softpo, softpo.integrations; assert 'trl' not in sys.modules, 'trl was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# Options whose reductions span processes: the top-entropy quantile over every process's tokens, the adaptive
# controller's window over every process, the global token count of the token-mean losses, and the metrics.
TWO_PROCESS_CASES = [
    dict(loss_type="vespo", top_entropy_quantile=0.3, beta=0.04, entropy_coef=0.05),
    dict(loss_type="luspo", importance_sampling_level="sequence", off_policy_mask_threshold=0.02,
         use_adaptive_entropy=True, entropy_coef=0.03, entropy_target=10.0, top_entropy_quantile=0.5),
]


def _two_process_worker(rank, port, model_dir, batch_path, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    captured = torch.load(batch_path, weights_only=False)
    for index, overrides in enumerate(TWO_PROCESS_CASES):
        tmp = pathlib.Path(out_dir) / f"case{index}-rank{rank}"
        trainer, gt_trainer = _pair(model_dir, tmp, overrides, dtype=torch.float64)
        assert trainer.accelerator.num_processes == 2
        inputs = _perturbed(captured, trainer, seed=20 + index)
        # The ranks hold different sequences, with different token counts: rank 1 drops a completion's tail.
        rows = slice(0, 2) if rank == 0 else slice(2, 4)
        inputs = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 4 else v
                  for k, v in inputs.items()}
        if rank == 1:
            inputs["completion_mask"] = inputs["completion_mask"].clone()
            inputs["completion_mask"][0, 3:] = 0
        for _ in range(2):  # two optimizer steps: the adaptive controller moves between them
            _compare_float64(trainer, gt_trainer, inputs)
            assert trainer.entropy_coef == pytest.approx(gt_trainer.entropy_coef, rel=1e-12)
            assert trainer._last_world_entropy == pytest.approx(gt_trainer._last_world_entropy, rel=1e-9)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_processes_match_trl(first_step, model_dir, tmp_path):
    batch_path = tmp_path / "batch.pt"
    torch.save(first_step["inputs"], batch_path)
    for attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        context = mp.start_processes(
            _two_process_worker, args=(port, model_dir, str(batch_path), str(tmp_path / f"try{attempt}")),
            nprocs=2, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + 300
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    pytest.fail("the two processes did not finish within 300 s (a collective one rank skipped?)")
            return
        except mp.ProcessExitedException as error:
            # Gloo's TCP transport occasionally aborts a rank (see tests/test_train.py); anything else fails.
            if error.signal_name != "SIGABRT" or attempt == 2:
                raise
