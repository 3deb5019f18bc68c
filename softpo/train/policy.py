"""The policy model of `softpo train`: built (or loaded), sampled from, and scored.

Scoring never forms logits: the base model gives final hidden states, and the loss (or the log-prob sweep)
reads them with the lm_head weight.
"""

from __future__ import annotations

import contextlib
import resource

import torch

from softpo.train import fsdp, tasks


def build_model(args, tokenizer, device):
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    else:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        heads = 4
        config = Qwen3MoeConfig(
            vocab_size=args.vocab_size or len(tokenizer), hidden_size=args.hidden_size,
            intermediate_size=2 * args.hidden_size, moe_intermediate_size=args.hidden_size,
            num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
            head_dim=max(args.hidden_size // heads, 8), num_experts=args.experts,
            num_experts_per_tok=args.experts_per_token, max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
            tie_word_embeddings=args.tie_embeddings,
        )
        model = Qwen3MoeForCausalLM(config).to(dtype)
    return model.to(device)


def build_tokenizer(args):
    if not args.model:
        return tasks.make_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def rollout(model, tokenizer, prompts, args, device, replay=None):
    """Sample G completions per prompt; return the token batch the scoring forwards need (with the experts
    each position was routed to while sampling, under "rollout_experts", when `replay` records them)."""
    from transformers import GenerationConfig

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = encoded.input_ids.repeat_interleave(args.group_size, dim=0)
    prompt_mask = encoded.attention_mask.repeat_interleave(args.group_size, dim=0)
    # A clean config: no top-k/top-p/penalties from the model's defaults, only the run's own settings, so
    # sampling draws from exactly the distribution `sampler_settings` describes to softpo.
    truncated = truncates(args)
    generation = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p or None, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        # The processed scores, to measure softpo's log-probs against the sampler's own (B x T x V floats: kept
        # only when truncating, the one case where the two can differ by more than rounding).
        output_scores=truncated, return_dict_in_generate=truncated,
    )
    model.eval()
    # Sharded layers all-gather in every forward: each rank keeps stepping until all ranks are done.
    with torch.no_grad(), (replay.route() if replay else contextlib.nullcontext()) as recording:
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation,
                                   synced_gpus=fsdp.is_sharded(model))
    model.train()
    sampler_logp = None
    if truncated:
        sequences, scores = sequences.sequences, sequences.scores
        completion = sequences[:, prompt_ids.shape[1]:]
        sampler_logp = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, completion[:, t, None]).squeeze(-1)
                                    for t, s in enumerate(scores)], dim=1)
    completion = sequences[:, prompt_ids.shape[1]:]
    is_eos = completion == tokenizer.eos_token_id
    # Completion tokens up to and including the first EOS count; generate pads the rest.
    mask = (is_eos.cumsum(dim=1) - is_eos.long()) == 0
    attention = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    batch = {
        "input_ids": sequences,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(dim=1) - 1).clamp(min=0),
        "valid": torch.cat([prompt_mask.bool(), mask], dim=1),
        "targets": completion,
        "mask": mask,
        "prompt_length": prompt_ids.shape[1],
        "texts": tokenizer.batch_decode(completion.masked_fill(~mask, tokenizer.pad_token_id),
                                        skip_special_tokens=True),
    }
    if sampler_logp is not None:
        batch["sampler_logp"] = sampler_logp
    if recording is not None:
        batch["rollout_experts"] = recording.generation_layout(sequences.shape[0])
    return batch


def truncates(args) -> bool:
    """Whether the run samples from a truncated distribution (--top-k, --top-p, --min-p)."""
    return bool(args.top_k) or args.top_p < 1.0 or bool(args.min_p)


def sampler_settings(args, truncated: bool = True) -> dict:
    """softpo's keywords for the distribution `rollout` samples from; `truncated=False`: the full softmax(z / T)."""
    settings = dict(temperature=args.temperature)
    if truncated and truncates(args) and not args.score_untruncated:
        settings.update(top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p or None)
    return settings


def forward(model, batch, rows, moe):
    """Final hidden states aligned with the completion tokens (position t predicts t + 1), and the router
    logits per layer as [rows, length, experts] when the model is an MoE."""
    kwargs = {"output_router_logits": True} if moe else {}
    out = model.base_model(
        input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
        position_ids=batch["position_ids"][rows], use_cache=False, **kwargs,
    )
    start = batch["prompt_length"] - 1
    hidden = out.last_hidden_state[:, start:-1]
    router = getattr(out, "router_logits", None) if moe else None
    if router is not None:
        n, length = batch["input_ids"][rows].shape
        router = [layer.reshape(n, length, -1) for layer in router]
    return hidden, router


def routed_forward(model, batch, rows, moe, replay, force):
    """`forward`, plus the experts used ([rows, length, layers, k], forced to `force` where given) under
    routing replay; None without it."""
    if replay is None:
        return (*forward(model, batch, rows, moe), None)
    with replay.route(force) as recording:
        hidden, router = forward(model, batch, rows, moe)
    return hidden, router, recording.forward_layout(*batch["input_ids"][rows].shape)


def scored(model, batch, rows, moe, head, replay=None, force=None):
    """`head(hidden, lm_head weight)`, with the router logits and replayed experts of `routed_forward`,
    computed inside the model's own forward: under FSDP2 that is where the lm_head weight is whole
    (softpo/train/fsdp.py says why)."""
    def run():
        hidden, router, used = routed_forward(model, batch, rows, moe, replay, force)
        return head(hidden, model.lm_head.weight), router, used

    return fsdp.call_inside(model, run)


def load_balancing(router, valid, num_experts, k):
    """Switch-Transformer aux loss over valid tokens, and expert load per layer (fraction of top-k picks)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    aux = load_balancing_loss_func(tuple(layer.flatten(0, 1) for layer in router), num_experts, k, valid)
    with torch.no_grad():
        picks = [layer[valid].topk(k, dim=-1).indices.flatten() for layer in router]
        load = torch.stack([torch.bincount(p, minlength=num_experts).float() / max(p.numel(), 1) for p in picks])
    return aux, load


# Qwen's vocabulary: where the logits tensor softpo avoids is large.
QWEN_VOCAB = 151_936


def logits_mb(tokens: int, vocab: int) -> float:
    return tokens * vocab * 4 / 2**20


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_line(device, tokens: int, vocab: int) -> str:
    """The closing memory line: this process's peak, and the [tokens, vocab] logits the loss never formed."""
    measured = "CUDA allocated" if device.type == "cuda" else "process RSS"
    line = (f"peak memory: {peak_memory_mb(device):.0f} MiB ({measured}); "
            f"a minibatch's [tokens, vocab] fp32 logits tensor ({tokens} tokens, never formed here) would take "
            f"{logits_mb(tokens, vocab):.1f} MiB at vocabulary {vocab:,}")
    if vocab != QWEN_VOCAB:
        line += f", {logits_mb(tokens, QWEN_VOCAB):.1f} MiB at vocabulary {QWEN_VOCAB:,}"
    return line

