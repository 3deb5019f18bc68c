"""softpo's fused policy loss inside TRL's `GRPOTrainer`.

    from softpo.integrations.trl import SoftpoGRPOTrainer
    trainer = SoftpoGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Everything but the loss stays TRL's: generation, rewards, advantages, and the old, reference and sampler
log-probs that `_generate_and_score_completions` computes. The training forward runs the model's backbone
and hands its last hidden states and `lm_head.weight` to `softpo.policy_loss`, so no logits tensor of the
batch exists; on CUDA that is the Triton kernel, elsewhere the chunked torch sweep.

The model's head is scored as it computes its logits: a logit scale (Cohere, Granite) and a final soft-cap
(Gemma 2, `final_logit_softcapping`) are applied before TRL's temperature. `softpo_score_truncated=True` (a
constructor keyword) also applies the sampler's `top_k`, `top_p` and `min_p` from the `GRPOConfig`, to the old
log-probs and the loss alike; off by default, as TRL's own loss ignores them.

The `GRPOConfig` is mapped to a `softpo.LossConfig` (`loss_config_from_grpo_config`), and the loss is scaled
as TRL scales it for processes and gradient accumulation. A TRL option that softpo does not implement raises
`ValueError` at construction, naming the option, rather than training a different objective.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from accelerate.utils import is_peft_model
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import GRPOConfig, GRPOTrainer

from .. import objectives
from ..adaptive import AdaptiveEntropy
from ..api import policy_loss, token_logprobs
from ..head import add_forward_call, gathered_weight, run_as_forward
from ..lora import lm_head_weight
from .grpo_config import GLOBAL_TOKEN_MEAN, loss_config_from_grpo_config
from .zero3 import head_loss

__all__ = ["SoftpoGRPOMixin", "SoftpoGRPOTrainer", "loss_config_from_grpo_config", "softpo_trainer"]

def _logit_scale(text_config) -> float:
    """The factor the model's own head applies to its logits (1.0 for most models)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        # Granite and MiniCPM3 divide by it; HyperCLOVA X multiplies.
        return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def _check_model(model) -> tuple[float, float | None]:
    """Refuse heads softpo cannot compute; return the head's logit scale and final soft-cap (None: none)."""
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"final_logit_softcapping={softcap} (model config) must be a finite number > 0 for softpo")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight for softpo to read")
    # Refuses what softpo cannot reproduce exactly (a bias, LoRA dropout in training, an unknown wrapper).
    lm_head_weight(head)
    scale = _logit_scale(text_config)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"the model's logit scale must be a finite number > 0 for softpo, got {scale}")
    return scale, None if softcap is None else float(softcap)


def _backbone_then_loss(model, loss_fn, zero3, **inputs):
    """The backbone on `inputs`, then `loss_fn(backbone_outputs, lm_head_weight)`: the softpo forward of `model`."""
    inputs["use_cache"] = False
    # Looked up per call: PEFT and FSDP replace the backbone and the head after construction.
    outputs = model.base_model(**inputs)
    # DeepSpeed ZeRO-3 partitions the head: the loss runs inside lm_head's forward, whose hooks gather it.
    if zero3:
        return head_loss(model, loss_fn, outputs)
    # Under FSDP2 the head is whole here once its group has run a forward (accelerate groups lm_head with
    # the final norm, or with the tied embedding); a head whose group has not is still a sharded DTensor,
    # gathered with a gradient averaged over the ranks as FSDP2 averages the others (`full_tensor()`
    # alone would leave each rank its own, unreduced, gradient).
    weight = gathered_weight(lm_head_weight(model.get_output_embeddings()))
    return loss_fn(outputs, weight)


def _softpo_forward(model, loss_fn, zero3: bool = False, caller=None, **inputs):
    """`loss_fn(backbone_outputs, lm_head_weight)` run as `model`'s forward, called through `caller` (the
    wrapper the trainer was given: DDP, FSDP, a DeepSpeed engine) when given.

    The loss runs inside the model's forward, as TRL's own fused head does, so wrappers that act around the
    forward (DDP's gradient hooks, FSDP's parameter gathering, autocast) see it. Other calls of the model
    run its own forward, so generation is unchanged.
    """
    run = functools.partial(_backbone_then_loss, model, loss_fn, zero3)
    return run_as_forward(model, run, caller=caller, **inputs)


def _bound_args(init, args, kwargs):
    try:
        return inspect.signature(init).bind_partial(*args, **kwargs).arguments.get("args")
    except TypeError:
        return None


class SoftpoGRPOMixin:
    """Replaces `GRPOTrainer._compute_loss` with softpo's; put it before a GRPOTrainer class in the bases."""

    # "auto": the Triton kernels for CUDA tensors, the chunked torch sweep otherwise.
    softpo_impl = "auto"
    # Score under the sampler's top_k / top_p / min_p (GRPOConfig's), not the whole softmax; the constructor's
    # `softpo_score_truncated=` sets it. Off by default: TRL's own loss ignores the truncation.
    softpo_score_truncated = False

    def __init__(self, *args, softpo_score_truncated: bool | None = None, **kwargs):
        if softpo_score_truncated is not None:
            self.softpo_score_truncated = bool(softpo_score_truncated)
        early_args = _bound_args(super().__init__, args, kwargs)
        if isinstance(early_args, GRPOConfig):
            # Fail before TRL loads reference models or connects to a vLLM server.
            loss_config_from_grpo_config(early_args)
            _check_truncated_scoring(early_args, self.softpo_score_truncated)
        super().__init__(*args, **kwargs)
        self.softpo_config = loss_config_from_grpo_config(self.args)
        _check_truncated_scoring(self.args, self.softpo_score_truncated)
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._softpo_zero3 = self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()
        if self._softpo_zero3 and any("lora_" in name for name, _ in target.get_output_embeddings().named_modules()):
            # ZeRO-3 gathers an adapter's A and B only inside their own forwards, which softpo's sweep bypasses.
            raise ValueError("an adapter on lm_head is not supported under DeepSpeed ZeRO-3; "
                             "train lm_head whole (modules_to_save=['lm_head']) or use FSDP2 or DDP")
        self._softpo_logit_scale, self._softpo_softcap = _check_model(target)
        self._softpo_model = target
        # Patched now, before accelerate wraps the forward for mixed precision: its wrapper then wraps this one.
        add_forward_call(target)

    def _softpo_distribution(self):
        """(temperature, keywords): what softpo's sweeps need to score the distribution TRL samples from.

        The head's logit scale, then its soft-cap, then the temperature, as TRL's and the model's heads apply
        them. Without a soft-cap the scale is folded into the temperature, the product the sweep forms anyway.
        """
        keywords = {}
        if self._softpo_softcap is None:
            temperature = self.temperature / self._softpo_logit_scale
        else:
            temperature = self.temperature
            keywords.update(logit_scale=self._softpo_logit_scale, softcap=self._softpo_softcap)
        if self.softpo_score_truncated:
            keywords.update(top_k=self.top_k or None, top_p=self.top_p, min_p=self.min_p)
        return temperature, keywords

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extras):
        """TRL's scoring of old (and reference) log-probs; with `softpo_score_truncated`, softpo's under the
        sampler's truncation, so that the ratio compares two log-probs of the same distribution."""
        if not self.softpo_score_truncated:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **extras,
            )
        if compute_aux_loss or any(value is not None for value in extras.values()):
            raise ValueError("softpo_score_truncated=True scores text-only, non-MoE batches; "
                             f"got {sorted(k for k, v in extras.items() if v is not None) or 'router logits'}")
        targets = input_ids[:, -logits_to_keep:]
        temperature, sampler = self._softpo_distribution()
        cast_head_to_fp32 = self.args.cast_lm_head_to_fp32

        def score(outputs, weight):
            hidden = outputs.last_hidden_state[:, -logits_to_keep - 1 : -1].to(weight.device)
            dtype = _head_dtype(hidden.device.type, weight, cast_head_to_fp32)
            with torch.autocast(hidden.device.type, enabled=False):
                return token_logprobs(
                    targets.to(weight.device), hidden=hidden.to(dtype), weight=weight.to(dtype),
                    temperature=temperature, return_entropy=compute_entropy, impl=self.softpo_impl, **sampler,
                )

        with self.accelerator.autocast():
            out = _softpo_forward(self._softpo_model, score, self._softpo_zero3, caller=model,
                                  input_ids=input_ids, attention_mask=attention_mask)
        logp, entropy = out if compute_entropy else (out, None)
        return logp, entropy, None

    def _normalizer(self, inputs, mode):
        """The token count TRL's dapo and cispo divide one micro-batch's sum by, before the 1/accumulation factor."""
        if self.loss_type not in GLOBAL_TOKEN_MEAN:
            return None
        # num_items_in_batch counts the tokens of the whole generation batch on all processes; a micro-batch's share
        # of one optimizer step is this divided by processes and steps per generation, times accumulation steps.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer / self.args.steps_per_generation
        return normalizer

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.bool()
        completion_tokens = mask
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        config = self.softpo_config

        old_logp = inputs.get("old_per_token_logps")
        if self.softpo_score_truncated and old_logp is not None:
            # A token outside the old policy's kept set (-inf: padding, or a tie the sampler split otherwise)
            # cannot have been drawn from it: left out, as softpo leaves out one outside the current policy's.
            outside = torch.isinf(old_logp)
            mask = mask & ~outside
            old_logp = old_logp.masked_fill(outside, 0.0)
        ref_logp = inputs["ref_per_token_logps"] if config.beta != 0.0 else None
        rollout_logp = importance_sampling_ratio = None
        correcting = self.use_vllm and self.vllm_importance_sampling_correction
        sampled = inputs.get("sampling_per_token_logps")
        if sampled is not None and (correcting or config.off_policy_mask_threshold is not None):
            # The off-policy mask measures the sampler's log-probs too. Tokens the sampler could not score get
            # their old log-prob (TRL: a correction weight of exactly 1).
            rollout_logp = torch.where(torch.isnan(sampled), old_logp, sampled)
        if correcting:
            # The batch's own ratio (a subclass or rollout_func may have supplied it), not one recomputed here.
            importance_sampling_ratio = inputs["importance_sampling_ratio"]
        elif rollout_logp is not None:
            importance_sampling_ratio = torch.ones_like(rollout_logp[:, :1])  # no correction: a weight of 1
        control = None
        if config.use_adaptive_entropy:
            # TRL's controller state lives on the trainer (it saves and restores it with checkpoints).
            control = AdaptiveEntropy(self.entropy_coef, self._last_world_entropy, self._entropy_window_stats)
            config = control.loss_config(config)
        entropy_gather = self._gather_entropies if config.top_entropy_quantile < 1 else None
        temperature, sampler = self._softpo_distribution()
        normalizer = self._normalizer(inputs, mode)
        cast_head_to_fp32 = self.args.cast_lm_head_to_fp32

        def loss_fn(outputs, weight):
            # Position t of the backbone output predicts token t + 1: the completion is predicted by the T
            # positions that end one before the sequence does.
            hidden = outputs.last_hidden_state[:, -T - 1 : -1].to(weight.device)
            device_type = hidden.device.type
            dtype = _head_dtype(device_type, weight, cast_head_to_fp32)
            with torch.autocast(device_type, enabled=False):
                out = policy_loss(
                    config,
                    completion_ids.to(weight.device),
                    mask.to(weight.device),
                    inputs["advantages"],
                    hidden=hidden.to(dtype),
                    weight=weight.to(dtype),
                    old_logp=old_logp,
                    ref_logp=ref_logp,
                    rollout_logp=rollout_logp,
                    importance_sampling_ratio=importance_sampling_ratio,
                    temperature=temperature,
                    normalizer=normalizer,
                    entropy_gather=entropy_gather,
                    impl=self.softpo_impl,
                    **sampler,
                )
            aux_loss = self._softpo_router_aux_loss(outputs, attention_mask) if self.aux_loss_enabled else None
            return out, aux_loss

        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in _FORWARD_EXTRAS:
            if inputs.get(key) is not None:
                model_inputs[key] = inputs[key]
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        with self.accelerator.autocast():
            out, aux_loss = _softpo_forward(self._softpo_model, loss_fn, self._softpo_zero3, caller=model,
                                            **model_inputs)

        loss = out.loss / accumulation
        if control is not None and mode == "train":
            control = control.observe(out)
            if self.accelerator.sync_gradients:
                control = control.step(config, reduce=lambda t: self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum"))
            self.entropy_coef, self._last_world_entropy, self._entropy_window_stats = (
                control.coef, control.last_entropy, control.window
            )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_softpo_metrics(
            mode, out, inputs, completion_tokens, mask, old_logp, ref_logp, accumulation, importance_sampling_ratio
        )
        return loss

    def _gather_entropies(self, local):
        """Every process's entropies, concatenated (processes may hold different token counts)."""
        # Entropies are >= 0, so a negative pad cannot be mistaken for one.
        pad = -1e9
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=pad))
        return gathered[gathered != pad]

    def _softpo_router_aux_loss(self, outputs, attention_mask):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        text_config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
        return load_balancing_loss_func(
            outputs.router_logits, num_experts, text_config.num_experts_per_tok, attention_mask
        )

    def _log_softpo_metrics(
        self, mode, out, inputs, completion_tokens, mask, old_logp, ref_logp, accumulation, importance_sampling_ratio
    ):
        """TRL's loss metrics, under TRL's names and with TRL's cross-process reductions; with truncated scoring,
        also `outside_support`, the fraction of the completion tokens left out of the loss."""
        metrics = self._metrics[mode]
        if self.softpo_score_truncated:
            # The loss left out the tokens outside the old or the current policy's kept set: so do the metrics.
            scored = mask & torch.isfinite(out.logp)
            left_out = (completion_tokens & ~scored).sum().to(out.logp.dtype)
            total = self.accelerator.reduce(torch.stack([left_out, completion_tokens.sum().to(left_out)]), "sum")
            metrics["outside_support"].append((total[0] / total[1].clamp(min=1.0)).item())
            mask = scored
        sequence_level = self.importance_sampling_level == "sequence"
        logp = out.logp
        old = logp if old_logp is None else old_logp.to(logp.dtype)
        log_ratio = torch.where(mask, logp - old, torch.zeros_like(logp))
        if sequence_level:
            log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        ratio = torch.exp(log_ratio)
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        count = mask.sum(-1).to(logp.dtype)

        def masked(x):
            return torch.where(mask, x, torch.zeros_like(x))

        def global_mean(x):
            # [B, 1] values are one per sequence (sequence level); [B, T] are averaged over unmasked tokens.
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([masked(x).sum(), count.sum()])
            total = self.accelerator.reduce(local, reduction="sum")
            return (total[0] / total[1].clamp(min=1.0)).item()

        def per_sequence(x):
            # A sequence without tokens gives NaN, which the min / max below skip.
            return x.squeeze(1) if x.shape[1] == 1 else masked(x).sum(-1) / count

        if self.beta != 0.0:
            log_ref_ratio = ref_logp.to(logp.dtype) - logp
            kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
            if self.args.use_bias_correction_kl:
                kl = kl * ratio
            metrics["kl"].append(global_mean(kl))
        metrics["entropy"].append(global_mean(out.entropy))
        if self._entropy_bonus_enabled:
            # TRL logs the policy term as it enters the loss, before the accumulation factor of the other types.
            policy = out.metrics["policy_loss"]
            if self.loss_type in GLOBAL_TOKEN_MEAN:
                policy = policy / accumulation
            metrics["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if self.softpo_config.gate == "clip":
            if self.args.delta is not None:
                # TRL counts clipping on the dual-clipped ratio (which matters once delta <= 1 + epsilon_high).
                ratio = ratio.clamp(max=self.args.delta)
            low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).to(logp.dtype)
            high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).to(logp.dtype)
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(_nan_extreme(self.accelerator.gather(per_sequence(low)), min))
            metrics["clip_ratio/high_max"].append(_nan_extreme(self.accelerator.gather(per_sequence(high)), max))
        elif self.softpo_config.gate == "cispo":
            capped = ((ratio > self.epsilon_high) & (advantages > 0)).to(logp.dtype)
            metrics["cispo_clip_ratio"].append(global_mean(capped))
        elif self.softpo_config.gate == "vespo":
            is_weight = None
            if self.use_vllm and self.vllm_importance_sampling_correction:
                is_weight = importance_sampling_ratio.to(logp)
            phi = objectives.vespo_weights(self.softpo_config, logp, old, mask, advantages.to(logp), is_weight)
            metrics["vespo/phi_seq_mean"].append(global_mean(phi))


def _head_dtype(device_type: str, weight: torch.Tensor, cast_head_to_fp32: bool) -> torch.dtype:
    """The dtype TRL's head computes in."""
    if cast_head_to_fp32:
        return torch.float32
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _check_truncated_scoring(args: GRPOConfig, score_truncated: bool) -> None:
    if score_truncated and args.beta != 0.0:
        # The reference model's log-prob of a token outside its own kept set would be -inf, and the KL infinite.
        raise ValueError(f"softpo_score_truncated=True needs beta=0 (got beta={args.beta}): the KL to a truncated "
                         "reference is infinite wherever the reference would not keep the token")


def _nan_extreme(values: torch.Tensor, pick) -> float:
    finite = values[~torch.isnan(values)]
    return float("nan") if finite.numel() == 0 else pick(finite.tolist())


# Multimodal fields TRL's training forward passes to the model; the whole micro-batch is one forward here.
_FORWARD_EXTRAS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class SoftpoGRPOTrainer(SoftpoGRPOMixin, GRPOTrainer):
    """`trl.GRPOTrainer` with softpo's fused policy loss: same arguments, same data pipeline, same metrics."""


_WRAPPED: dict[type, type] = {GRPOTrainer: SoftpoGRPOTrainer}


def softpo_trainer(trainer_class: type) -> type:
    """A subclass of `trainer_class` (GRPOTrainer or a subclass of it) whose policy loss is softpo's.

    >>> MyTrainer = softpo_trainer(MyGRPOTrainer)
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, GRPOTrainer)):
        raise ValueError(f"trainer_class must be trl.GRPOTrainer or a subclass of it, got {trainer_class!r}")
    if issubclass(trainer_class, SoftpoGRPOMixin):
        return trainer_class
    if trainer_class._compute_loss is not GRPOTrainer._compute_loss:
        raise ValueError(
            f"trainer_class {trainer_class.__name__} overrides _compute_loss, which softpo replaces; "
            "its loss would be silently dropped"
        )
    if trainer_class not in _WRAPPED:
        _WRAPPED[trainer_class] = type(
            f"Softpo{trainer_class.__name__}",
            (SoftpoGRPOMixin, trainer_class),
            {"__module__": trainer_class.__module__, "__doc__": f"{trainer_class.__name__} with softpo's policy loss."},
        )
    return _WRAPPED[trainer_class]
