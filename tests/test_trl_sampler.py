"""The TRL drop-in scores the distribution TRL samples from: a Gemma-2 soft-capped head against TRL's own
GRPOTrainer, and the opt-in truncation (`softpo_score_truncated=True`) against a float64 reference built on
transformers' own warpers."""

import inspect
import types

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import softpo  # noqa: E402
from transformers import Gemma2Config, Gemma2ForCausalLM  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from trl import GRPOTrainer  # noqa: E402

from softpo.integrations.trl import SoftpoGRPOTrainer  # noqa: E402
from test_trl import (  # noqa: E402, F401
    PROMPTS,
    VOCAB,
    _args,
    _compare,
    _grads,
    _one_thread,
    _perturbed,
    _reward,
    _tokenizer,
)

SAMPLER_SETTINGS = "softcap" in inspect.signature(softpo.policy_loss).parameters
pytestmark = [
    pytestmark,
    pytest.mark.skipif(not SAMPLER_SETTINGS, reason="softpo.policy_loss has no sampler settings (softcap, top_k)"),
]
# Small enough that tanh bends the tiny model's logits (Gemma 2 ships 30.0, which these logits never approach).
SOFTCAP = 0.8


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    torch.manual_seed(2)
    config = Gemma2Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16, max_position_embeddings=64,
        final_logit_softcapping=SOFTCAP, eos_token_id=1, pad_token_id=0, bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        # Logits a few times the cap, so that the cap changes log-probs and gradients materially.
        model.lm_head.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("tiny-gemma2")
    model.save_pretrained(path)
    return str(path)


def _gemma_trainer(cls, path, output_dir, dtype=torch.float32, trainer_kwargs=None, **overrides):
    return cls(
        model=Gemma2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager"),
        reward_funcs=_reward,
        args=_args(output_dir, **overrides),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=_tokenizer(),
        **(trainer_kwargs or {}),
    )


@pytest.fixture(scope="module")
def gemma_batch(gemma_dir, tmp_path_factory):
    """One real optimizer step of the drop-in on the soft-capped model; returns the batch its loss saw."""
    seen = {}

    class Recording(SoftpoGRPOTrainer):
        def _compute_loss(self, model, inputs):
            seen.setdefault("inputs", {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
            return super()._compute_loss(model, inputs)

    trainer = _gemma_trainer(Recording, gemma_dir, tmp_path_factory.mktemp("gemma-run"), max_steps=1)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    return seen["inputs"]


def _softcapped_pair(gemma_dir, tmp_path, **overrides):
    overrides = dict(gradient_accumulation_steps=2, steps_per_generation=4, **overrides)
    trainer = _gemma_trainer(SoftpoGRPOTrainer, gemma_dir, tmp_path / "out", **overrides)
    gt_trainer = _gemma_trainer(GRPOTrainer, gemma_dir, tmp_path / "gt", torch.float64, **overrides)
    for t in (trainer, gt_trainer):
        t.current_gradient_accumulation_steps = 2
    return trainer, gt_trainer


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(loss_type="grpo", temperature=0.7, entropy_coef=0.05), id="grpo-T0.7-entropy"),
    pytest.param(dict(loss_type="dapo", beta=0.04), id="dapo-kl"),
])
def test_softcapped_head_matches_trl(gemma_batch, gemma_dir, tmp_path, overrides):
    trainer, gt_trainer = _softcapped_pair(gemma_dir, tmp_path, **overrides)
    assert trainer._softpo_softcap == SOFTCAP
    _compare(trainer, gt_trainer, _perturbed(gemma_batch, trainer, seed=21))


def test_softcap_is_the_models_own(gemma_batch, gemma_dir, tmp_path):
    """The drop-in's log-probs are those of the model's own (capped) logits, not of the uncapped projection."""
    trainer = _gemma_trainer(SoftpoGRPOTrainer, gemma_dir, tmp_path, dtype=torch.float64, temperature=1.0)
    ids = torch.cat([gemma_batch["prompt_ids"], gemma_batch["completion_ids"]], 1)
    attention = torch.cat([gemma_batch["prompt_mask"], gemma_batch["completion_mask"]], 1)
    T = gemma_batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, ids[:, -T:, None]).squeeze(-1)
        trainer.softpo_score_truncated = True  # scores through softpo; no truncation is configured
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T)
    torch.testing.assert_close(logp, expected, rtol=1e-9, atol=1e-9)


TRUNCATION = dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05)


def _truncated_float64_logps(self, model, input_ids, attention_mask, logits_to_keep, *args,
                             compute_entropy=False, compute_aux_loss=False, **kwargs):
    """Log-probs and entropy of what generate samples from, in float64: the model's logits through
    transformers' warpers in generate's order (temperature, top-k, top-p, min-p), renormalized."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1 : -1]
    scores = logits.double().flatten(0, 1) / self.temperature
    for warper in (TopKLogitsWarper(self.top_k), TopPLogitsWarper(self.top_p), MinPLogitsWarper(self.min_p)):
        scores = warper(None, scores)
    log_probs = torch.log_softmax(scores, -1).view(*logits.shape)
    logp = log_probs.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
    entropy = None
    if compute_entropy:
        # -inf log-probs of dropped tokens made finite before the product, so no 0 * inf reaches the gradient.
        entropy = -(log_probs.exp() * log_probs.masked_fill(torch.isinf(log_probs), 0.0)).sum(-1)
    return logp, entropy, None


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
def test_truncated_scoring_matches_float64_reference(gemma_batch, gemma_dir, tmp_path, off_policy):
    overrides = dict(loss_type="grpo", **TRUNCATION)
    trainer = _gemma_trainer(SoftpoGRPOTrainer, gemma_dir, tmp_path / "out", torch.float64,
                             dict(softpo_score_truncated=True), **overrides)
    gt_trainer = _gemma_trainer(GRPOTrainer, gemma_dir, tmp_path / "gt", torch.float64, **overrides)
    gt_trainer._get_per_token_logps_and_entropies = types.MethodType(_truncated_float64_logps, gt_trainer)
    for t in (trainer, gt_trainer):
        t.current_gradient_accumulation_steps = 1
        t.model.train()
    inputs = dict(gemma_batch)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    with torch.no_grad():
        expected, _, _ = gt_trainer._get_per_token_logps_and_entropies(gt_trainer.model, ids, attention, T)
        scored, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T)
    outside = torch.isinf(expected)
    mask = inputs["completion_mask"].bool()
    # The batch was sampled without truncation: some of its tokens lie outside the truncated support.
    assert bool((outside & mask).any()) and bool((~outside & mask).any())
    assert torch.equal(torch.isinf(scored), outside)
    torch.testing.assert_close(scored[~outside], expected[~outside], rtol=1e-9, atol=1e-12)

    g = torch.Generator().manual_seed(31)
    inputs["advantages"] = torch.randn(inputs["advantages"].shape, generator=g, dtype=torch.float64)
    if off_policy:
        noise = 0.3 * torch.randn(expected.shape, generator=g, dtype=torch.float64)
        inputs["old_per_token_logps"] = expected + noise  # -inf where the old policy would not keep the token
    gt_inputs = dict(inputs)
    # The reference: tokens outside the support left out of the loss (TRL's tool mask, which leaves the attention
    # as it is), which softpo does by itself.
    gt_inputs["tool_mask"] = (~outside).long()
    if off_policy:
        gt_inputs["old_per_token_logps"] = inputs["old_per_token_logps"].masked_fill(outside, 0.0)
    out_loss = trainer._compute_loss(trainer.model, inputs)

    def finite_logps(self, *args, **kwargs):
        # TRL's loss multiplies masked terms by 0, which a -inf would turn into NaN: those tokens are masked above.
        logp, entropy, aux = _truncated_float64_logps(self, *args, **kwargs)
        return logp.masked_fill(torch.isinf(logp), 0.0), entropy, aux

    gt_trainer._get_per_token_logps_and_entropies = types.MethodType(finite_logps, gt_trainer)
    gt_loss = gt_trainer._compute_loss(gt_trainer.model, gt_inputs)
    torch.testing.assert_close(out_loss, gt_loss, rtol=1e-9, atol=1e-12)
    out_grads, gt_grads = _grads(trainer.model, out_loss), _grads(gt_trainer.model, gt_loss)
    for name, gt in gt_grads.items():
        out = out_grads[name]
        torch.testing.assert_close(torch.zeros_like(gt) if out is None else out, gt, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    logged = trainer._metrics["train"]
    expected_fraction = (outside & mask).sum() / mask.sum()
    assert logged["outside_support"][-1] == pytest.approx(expected_fraction.item(), rel=1e-9)
    # softpo returns entropies in fp32.
    assert logged["entropy"][-1] == pytest.approx(gt_trainer._metrics["train"]["entropy"][-1], rel=1e-5)


def test_truncation_is_off_by_default(gemma_dir, tmp_path):
    trainer = _gemma_trainer(SoftpoGRPOTrainer, gemma_dir, tmp_path, **TRUNCATION)
    temperature, keywords = trainer._softpo_distribution()
    assert not trainer.softpo_score_truncated
    assert (temperature, keywords) == (0.9, dict(logit_scale=1.0, softcap=SOFTCAP))


def test_truncated_scoring_refuses_a_kl_term(gemma_dir, tmp_path):
    with pytest.raises(ValueError, match="softpo_score_truncated.*beta"):
        _gemma_trainer(SoftpoGRPOTrainer, gemma_dir, tmp_path, trainer_kwargs=dict(softpo_score_truncated=True),
                       beta=0.04, **TRUNCATION)
