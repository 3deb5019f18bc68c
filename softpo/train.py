"""`softpo train`: a thin RL loop for Mixture-of-Experts (and any causal) language models.

With no arguments it trains a small random-init Qwen3-MoE (8 experts, top-2 routing) on the built-in
`count` task (softpo/tasks.py) with SAPO, offline, on a CPU, in about a minute, and the reward climbs.

One step:
  prompts -> G samples per prompt (`model.generate`, temperature T) -> rewards -> group advantages
  -> old log-probs (and reference log-probs when beta > 0 or for SPO), no grad
  -> for each minibatch: final hidden states from the base model (never its logits) ->
     softpo.policy_loss(hidden, lm_head.weight) + router load-balancing loss -> AdamW step
  -> metrics.jsonl line, progress bar, checkpoint every --save-every steps.

Simplifications, on purpose:
- Sampling runs in the training process with transformers' `generate`; there is no inference engine,
  so the sampler's log-probs equal the trainer's and no rollout-mismatch correction is applied to
  fresh samples (offline ones with stored log-probs get it: softpo/samples.py).
- Raw-text prompts (no chat template); completions end at EOS or after --max-new-tokens.
- One optimizer step per minibatch, constant learning rate, no gradient accumulation.
- The reference policy is a frozen full copy of the initial weights.
- For SPO, q0 of a prompt comes from the rewards of its own G samples in the same step.
- Data parallel (torchrun) averages gradients with one all-reduce per update: what DDP does, minus
  bucketing and overlap. DDP's reducer expects each parameter to be used by its module's forward
  (or searches the graph every step with find_unused_parameters); here lm_head is used by the loss,
  outside the forward, and an MoE expert may get no token on a rank.
- Checkpoints keep the latest state only.
- --fsdp shards parameters, gradients and optimizer state with FSDP2 (softpo/distributed.py); sampling then
  all-gathers every layer for every generated token, which is slow: an inference engine is the real fix.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time

import torch
import torch.distributed as dist

import softpo
from softpo import distributed, routing, samples, tasks

LOSSES = ("sapo", "grpo", "gspo", "gspo_token", "dapo", "dr_grpo", "bnpo", "cispo", "spo", "luspo", "vespo")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"softpo train: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="softpo train", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="local directory of any transformers causal LM (with its tokenizer); "
                   "default: a random-init Qwen3-MoE and the built-in character tokenizer")
    g.add_argument("--vocab-size", type=int, help="built-in model's vocabulary (e.g. 151936 for Qwen-sized); "
                   "default: the tokenizer's size")
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--experts-per-token", type=int, default=2)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--tie-embeddings", action="store_true", help="built-in model: lm_head shares the input "
                   "embedding's weight")
    g.add_argument("--init-from", metavar="RUN_DIR", help="start policy (and reference) from the weights of an "
                   "earlier run's checkpoint.pt (same model flags; optimizer and step start fresh)")

    g = p.add_argument_group("task and sampling")
    g.add_argument("--task", choices=sorted(tasks.TASKS), default="count")
    g.add_argument("--prompts", help="text file, one prompt per line (default: the task's prompts)")
    g.add_argument("--reward", help="module:function taking (prompts, completions) and returning floats "
                   "(default: the task's reward)")
    g.add_argument("--prompts-per-step", type=int, default=32, help="global, split across ranks")
    g.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, help="default: the task's")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, also used in every log-prob")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="sapo", help=f"preset: {', '.join(LOSSES)} (or a TRL loss_type)")
    g.add_argument("--beta", type=float, help="KL coefficient (SPO: its temperature)")
    g.add_argument("--epsilon", type=float)
    g.add_argument("--epsilon-high", type=float)
    g.add_argument("--entropy-coef", type=float)
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other LossConfig field, value as JSON (repeatable): "
                   "--set delta=3 --set kl_estimator='\"k1\"'")
    g.add_argument("--scale-rewards", choices=("group", "none"),
                   help="divide advantages by the group's reward std (default: none for dr_grpo, group otherwise)")
    g.add_argument("--router-aux-coef", type=float,
                   help="load-balancing loss coefficient (default: the model config's)")
    g.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto",
                   help="softpo path: auto = Triton kernels on CUDA, chunked torch otherwise")

    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=400)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--minibatches", type=int, default=2, help="optimizer steps per epoch over one rollout")
    g.add_argument("--epochs", type=int, default=1, help="passes over one rollout")
    g.add_argument("--max-grad-norm", type=float, default=1.0)

    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default: runs/<date-time>)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint; other flags "
                   "given alongside override the saved ones")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every k steps (and at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over the "
                   "torchrun processes with FSDP2 (fully_shard per decoder layer and on the model)")
    g.add_argument("--threads", type=int, help="CPU threads per process (default 1: the built-in model is too "
                   "small to gain from more, and oversubscribed threads on a busy machine slow it over tenfold)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    samples.add_arguments(p)
    routing.add_arguments(p)
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"resume: {path} not found")
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)["args"]
        # Saved values become defaults, so flags given alongside --resume still win.
        parser.set_defaults(**{k: v for k, v in saved.items() if k != "resume"})
        args = parser.parse_args(argv)
        args.out = args.resume
    return args


def check_args(args):
    positive = ("prompts_per_step", "group_size", "steps", "minibatches", "epochs", "save_every", "hidden_size",
                "layers", "experts", "experts_per_token")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("max_new_tokens", "vocab_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.experts_per_token > args.experts:
        raise ValueError(f"--experts-per-token ({args.experts_per_token}) must be <= --experts ({args.experts})")
    if args.model is not None and not os.path.isdir(args.model):
        raise ValueError(f"--model: directory {args.model!r} not found")
    if args.model is not None and args.vocab_size is not None:
        raise ValueError("--vocab-size applies to the built-in model only")
    if args.fsdp and args.routing_replay == "rollout":
        # Sharded sampling keeps finished ranks stepping (synced_gpus), and those extra forwards would be
        # recorded as sampled positions.
        raise ValueError("--routing-replay rollout is not supported with --fsdp; use --routing-replay old")
    if args.model is not None and args.tie_embeddings:
        raise ValueError("--tie-embeddings applies to the built-in model only (a --model's config decides)")
    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise ValueError(f"--prompts: file {args.prompts!r} not found")
    samples.check_args(args)


def loss_config(args) -> softpo.LossConfig:
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value
    for name in ("beta", "epsilon", "epsilon_high", "entropy_coef"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    # Entropy is always reported; Dr.GRPO's length constant is the sampling budget.
    overrides.setdefault("compute_entropy", True)
    overrides.setdefault("max_completion_length", args.max_new_tokens)
    try:
        config = softpo.preset(args.loss, **overrides)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--loss/--set: {error}") from error
    return config


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


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: minus the group mean, over the group std (+1e-4) when `scale`."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale and rewards.shape[1] > 1 and rewards.shape[0]:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return advantages


def rollout(model, tokenizer, prompts, args, device, replay=None):
    """Sample G completions per prompt; return the token batch the scoring forwards need (with the experts
    each position was routed to while sampling, under "rollout_experts", when `replay` records them)."""
    from transformers import GenerationConfig

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = encoded.input_ids.repeat_interleave(args.group_size, dim=0)
    prompt_mask = encoded.attention_mask.repeat_interleave(args.group_size, dim=0)
    # A clean config: no top-k/top-p/penalties from the model's defaults, so sampling is exactly
    # softmax(z / T), the distribution every log-prob below is taken under.
    generation = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    # Sharded layers all-gather in every forward: each rank keeps stepping until all ranks are done.
    with torch.no_grad(), (replay.route() if replay else contextlib.nullcontext()) as recording:
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation,
                                   synced_gpus=distributed.is_sharded(model))
    model.train()
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
    if recording is not None:
        batch["rollout_experts"] = recording.generation_layout(sequences.shape[0])
    return batch


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
    (softpo/distributed.py says why)."""
    def run():
        hidden, router, used = routed_forward(model, batch, rows, moe, replay, force)
        return head(hidden, model.lm_head.weight), router, used

    return distributed.call_inside(model, run)


def top_k_sets(router, start, k):
    """[layers, rows, completion, k] sorted expert indices of the positions that score completion tokens."""
    return torch.stack([layer[:, start:-1].topk(k, dim=-1).indices.sort(dim=-1).values for layer in router])


def load_balancing(router, valid, num_experts, k):
    """Switch-Transformer aux loss over valid tokens, and expert load per layer (fraction of top-k picks)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    aux = load_balancing_loss_func(tuple(layer.flatten(0, 1) for layer in router), num_experts, k, valid)
    with torch.no_grad():
        picks = [layer[valid].topk(k, dim=-1).indices.flatten() for layer in router]
        load = torch.stack([torch.bincount(p, minlength=num_experts).float() / max(p.numel(), 1) for p in picks])
    return aux, load


def reduce_metrics(values: dict, world: int, device) -> dict:
    """Average across minibatches (lists) and ranks; *_min and *_max keep their extreme."""
    out = {}
    for key, items in sorted(values.items()):
        op = min if key.endswith("_min") else max if key.endswith("_max") else None
        out[key] = op(items) if op else sum(items) / len(items)
    if world > 1:
        for suffix, op in (("_min", dist.ReduceOp.MIN), ("_max", dist.ReduceOp.MAX), ("", dist.ReduceOp.SUM)):
            keys = [k for k in out if k.endswith(suffix) and (suffix or not k.endswith(("_min", "_max")))]
            buffer = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(buffer, op=op)
            for key, value in zip(keys, buffer.tolist()):
                out[key] = value / world if not suffix else value
    return out


def offline_pool(args, config, tokenizer, model, scale_rewards):
    """The off-policy groups (--offline files, --replay buffer), or None; bad files are a usage error."""
    if not (args.offline or args.replay):
        return None

    def score(group):
        rewards = torch.tensor([group.rewards])
        group.advantages = group_advantages(rewards, scale_rewards)[0].tolist()
        group.q0 = softpo.spo_q0(rewards, config.beta).item() if config.objective == "spo" else 0.0

    try:
        groups = samples.load(samples.offline_paths(args), tokenizer, model.config.vocab_size,
                              None if config.objective == "spo" else config.name)
    except samples.SampleFileError as error:
        raise _UsageError(str(error)) from None
    return samples.Pool(groups, args.replay, score)


def average_gradients(params, world):
    """DDP's gradient average, as one flat all-reduce (nothing to do on one rank)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def plot(run_dir, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The fourth panel shows the KL to the reference when there is one, else the gate's statistic.
    present = [key for key in ("kl", "gate_weight", "clip_fraction") if any(r.get(key) is not None for r in rows)]
    gate = (present or ["kl"])[0]
    titles = {"kl": "KL to reference", "gate_weight": "SAPO gate weight", "clip_fraction": "clip fraction"}
    panels = [("reward_mean", "reward"), ("loss", "loss"), ("entropy", "entropy"), (gate, titles[gate]),
              ("routing_drift", "routing drift"), ("aux_loss", "router aux loss")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes.flat, panels):
        values = [r.get(key) for r in rows]
        points = [(s, v) for s, v in zip(steps, values) if v is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, lw=0.8, alpha=0.5)
            window = max(1, len(ys) // 20)
            smooth = [sum(ys[max(0, i - window + 1): i + 1]) / min(i + 1, window) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=1.6)
        else:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "metrics.png"), dpi=110)
    plt.close(fig)


class _UsageError(Exception):
    """A bad argument found after parsing: reported in one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except ValueError as error:
        print(f"softpo train: error: --{error}", file=sys.stderr)
        return 2
    try:
        return train(args)
    except _UsageError as error:
        print(f"softpo train: error: {error}", file=sys.stderr)
        return 2


def train(args) -> int:
    run = setup(args)
    from tqdm import tqdm

    bar = tqdm(range(run.start, args.steps), initial=run.start, total=args.steps,
               disable=not run.main_rank or args.no_progress, dynamic_ncols=True)
    for step in bar:
        began = time.perf_counter()
        data = collect(run, step)
        logged, loads = update(run, data)
        row = record(run, step, data, logged, loads, time.perf_counter() - began)
        if run.main_rank:
            shown = math.nan if row["reward_mean"] is None else row["reward_mean"]
            bar.set_postfix(reward=f"{shown:.3f}", loss=f"{row['loss']:.4f}", refresh=False)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(run.run_dir, step + 1, run.model, run.optimizer, run.device, run.world,
                            {"entropy_control": control_state(run.entropy_control)},
                            replay=None if run.pool is None else run.pool.recent_state())
            if run.main_rank and not args.no_progress and data.prompts:
                bar.write(f"step {step + 1}: {data.prompts[0]!r} -> {data.batch['texts'][0]!r} "
                          f"(reward {data.rewards[0].item():.2f})")
    bar.close()
    finish(run)
    return 0


# ---------------------------------------------------------------- the loop's steps


@dataclasses.dataclass
class Run:
    """What setup decides once: the processes, the models, the loss, the optimizer, the run directory."""

    args: argparse.Namespace
    config: softpo.LossConfig
    task: object
    reward_fn: object
    prompt_pool: list | None
    world: int
    rank: int
    device: torch.device
    tokenizer: object
    model: torch.nn.Module
    reference: torch.nn.Module | None
    moe: bool
    num_experts: int
    top_k: int
    aux_coef: float
    scale_rewards: bool
    pool: samples.Pool | None
    replay: routing.RoutingReplay | None
    params: list
    optimizer: torch.optim.Optimizer
    run_dir: str
    start: int
    history: list
    slices: list
    # use_adaptive_entropy: the coefficient's controller, state the loop owns (and checkpoints).
    entropy_control: softpo.AdaptiveEntropy | None = None

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def per_rank(self) -> int:
        return self.args.prompts_per_step // self.world

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    @property
    def samples_path(self) -> str:
        return os.path.join(self.run_dir, "samples.jsonl")


@dataclasses.dataclass
class Collected:
    """One step's samples, fresh rows first, then offline ones, with what the updates need of them."""

    prompts: list
    batch: dict
    rewards: torch.Tensor
    advantages: torch.Tensor
    q0: torch.Tensor | None
    online_rows: int
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    rollout_logp: torch.Tensor | None
    old_experts: list
    replayed: torch.Tensor | None
    fresh: list | None


def setup(args) -> Run:
    """Arguments, processes, device, tokenizer, models (sharded with --fsdp), loss, optimizer, run directory."""
    try:
        check_args(args)
        task = tasks.TASKS[args.task]
        args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
        reward_fn = tasks.load_reward(args.reward) if args.reward else task.reward
        prompt_pool = tasks.load_prompts(args.prompts) if args.prompts else None
        config = loss_config(args)
    except ValueError as error:
        raise _UsageError(str(error)) from None
    world, rank, device = start_processes(args)
    if args.prompts_per_step % world:
        raise _UsageError(f"--prompts-per-step ({args.prompts_per_step}) must be divisible by the {world} ranks")

    tokenizer = build_tokenizer(args)
    # Sharded, the model stays on the CPU until `shard` moves each group's shards to the device.
    model = build_model(args, tokenizer, torch.device("cpu") if args.fsdp else device)
    if args.init_from:
        # Before the reference copy: a fine-tuning run's reference is the model it starts from.
        init_weights(model, args.init_from)
    if world > 1:
        distributed.broadcast_from_first_rank(model, device)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if config.needs_ref else None
    if args.fsdp:
        try:
            distributed.shard(model, device)
        except ValueError as error:
            raise _UsageError(f"--fsdp: {error}") from None
        if reference is not None:
            distributed.shard(reference, device)
    aux_coef = args.router_aux_coef
    if aux_coef is None:
        aux_coef = getattr(model.config, "router_aux_loss_coef", 0.001)
    scale_rewards = (args.scale_rewards or ("none" if config.name == "dr_grpo" else "group")) == "group"
    replay = None
    if args.routing_replay != "none":
        try:
            replay = routing.RoutingReplay(model)
        except ValueError as error:
            raise _UsageError(str(error)) from None
    params = [p for p in model.parameters() if p.requires_grad]
    rows_per_rank = args.prompts_per_step // world * args.group_size
    minibatch_rows = math.ceil(rows_per_rank / args.minibatches)
    run = Run(
        args=args, config=config, task=task, reward_fn=reward_fn, prompt_pool=prompt_pool, world=world, rank=rank,
        device=device, tokenizer=tokenizer, model=model, reference=reference,
        moe=bool(getattr(model.config, "num_experts_per_tok", 0)),
        num_experts=getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", 0),
        top_k=getattr(model.config, "num_experts_per_tok", 0), aux_coef=aux_coef, scale_rewards=scale_rewards,
        pool=offline_pool(args, config, tokenizer, model, scale_rewards), replay=replay, params=params,
        optimizer=torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay),
        # One name for every rank: the clock may tick between ranks.
        run_dir=same_on_every_rank(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")), world),
        start=0, history=[],
        slices=[slice(i, min(i + minibatch_rows, rows_per_rank)) for i in range(0, rows_per_rank, minibatch_rows)],
        entropy_control=softpo.AdaptiveEntropy.start(config) if config.use_adaptive_entropy else None,
    )
    if args.resume:
        load_checkpoint(run)
    else:
        # Decided on rank 0 for all: a rank that refused alone would leave the others in the barrier.
        if same_on_every_rank(os.path.exists(run.metrics_path), world):
            raise _UsageError(f"--out: {run.run_dir} already holds a run; pass --resume {run.run_dir} to continue it")
        torch.manual_seed(args.seed + 1 + rank)
    # Every rank has checked and read the run directory before rank 0 rewrites it.
    barrier(world)
    if run.main_rank:
        write_run_directory(run)
    return run


def collect(run: Run, step: int) -> Collected:
    """This rank's prompts, G samples each (or stored groups, off-policy), rewards, advantages, and the old
    and reference log-probs with the routing they were computed under."""
    args, config, device = run.args, run.config, run.device
    # The same global prompt list on every rank (seeded by step); each rank takes its share, and off-policy
    # groups (--offline, --replay) take the place of the last prompts of that share.
    prompt_rng = random.Random(args.seed * 1_000_003 + step)
    if run.prompt_pool is not None:
        prompts = [prompt_rng.choice(run.prompt_pool) for _ in range(args.prompts_per_step)]
    else:
        prompts = [run.task.sample_prompt(prompt_rng) for _ in range(args.prompts_per_step)]
    per_rank = run.per_rank
    offline_groups = round(args.offline_fraction * per_rank) if run.pool is not None and len(run.pool) else 0
    prompts = prompts[run.rank * per_rank: (run.rank + 1) * per_rank][: per_rank - offline_groups]

    sampler_replay = run.replay if args.routing_replay == "rollout" else None
    batch = rollout(run.model, run.tokenizer, prompts, args, device, sampler_replay) if prompts else None
    repeated = [p for p in prompts for _ in range(args.group_size)]

    def score():
        rewards = torch.tensor(run.reward_fn(repeated, batch["texts"]) if prompts else [], dtype=torch.float32)
        if rewards.shape != (len(repeated),) or not bool(torch.isfinite(rewards).all()):
            raise ValueError(f"reward function must return {len(repeated)} finite floats")
        return rewards

    rewards = raise_on_every_rank(score, run.world, "the reward function")
    grouped = rewards.view(len(prompts), args.group_size)
    advantages = group_advantages(grouped, run.scale_rewards).flatten().to(device)
    q0 = None
    if config.objective == "spo":
        q0 = softpo.spo_q0(grouped, config.beta).repeat_interleave(args.group_size).to(device)
    rewards = rewards.to(device)
    online_rows, stored = len(repeated), None
    if offline_groups:
        drawn = run.pool.draw(offline_groups, args.group_size, random.Random(f"offline {args.seed} {step} {run.rank}"))
        offline, stored = samples.offline_batch(drawn, run.tokenizer.pad_token_id, device)
        batch = samples.concat(batch, offline, run.tokenizer.pad_token_id)
        rewards = torch.cat([rewards, stored["rewards"]])
        advantages = torch.cat([advantages, stored["advantages"]])
        q0 = None if q0 is None else torch.cat([q0, stored["q0"]])

    old_logp, ref_logp, old_experts, replayed = score_old(run, batch)
    # Offline samples' own sampler log-probs turn on the sampler-mismatch correction; fresh rows weigh 1.
    rollout_logp = None
    if stored is not None and stored["behaviour_logp"] is not None and config.objective != "spo":
        rollout_logp = old_logp.clone()
        rollout_logp[online_rows:, : stored["behaviour_logp"].shape[1]] = stored["behaviour_logp"]
    fresh = None
    if prompts and (args.save_samples or args.replay):
        fresh = samples.fresh_groups(step + 1, prompts, batch, rewards, old_logp, args.group_size, run.tokenizer)
        if args.save_samples:
            samples.save(run.samples_path, step + 1, fresh, run.world)
    return Collected(prompts, batch, rewards, advantages, q0, online_rows, old_logp, ref_logp, rollout_logp,
                     old_experts, replayed, fresh)


def score_old(run: Run, batch):
    """(old log-probs, reference log-probs or None, the old forward's top-k sets per minibatch, the experts
    to replay or None), no grad. Under routing replay the old forward's experts (under R3 forced to the
    sampler's) are those every training forward uses."""
    args, targets, mask = run.args, batch["targets"], batch["mask"]
    old_logp = torch.empty(mask.shape, device=run.device)
    ref_logp = torch.empty(mask.shape, device=run.device) if run.reference is not None else None
    old_experts = []
    replayed = None
    if run.replay is not None:
        replayed = torch.empty((*batch["input_ids"].shape, len(run.replay.routers), run.top_k), dtype=torch.long,
                               device=run.device)
    sampled_experts = batch.get("rollout_experts")
    with torch.no_grad():
        for rows in run.slices:
            def logprobs(hidden, weight):
                return softpo.token_logprobs(targets[rows], hidden=hidden, weight=weight,
                                             temperature=args.temperature, impl=args.impl)

            force = None if sampled_experts is None else sampled_experts[rows]
            old_logp[rows], router, used = scored(run.model, batch, rows, run.moe, logprobs, run.replay, force)
            if used is not None:
                replayed[rows] = used
                old_experts.append(routing.top_k_sets(used, batch["prompt_length"] - 1))
            elif router is not None:
                old_experts.append(top_k_sets(router, batch["prompt_length"] - 1, run.top_k))
            if run.reference is not None:
                ref_logp[rows], _, _ = scored(run.reference, batch, rows, False, logprobs)
    return old_logp, ref_logp, old_experts, replayed


def update(run: Run, data: Collected) -> tuple[dict, list]:
    """Minibatches x epochs, one optimizer step each. Returns the per-update metrics and expert loads."""
    args, config, batch = run.args, run.config, data.batch
    targets, mask = batch["targets"], batch["mask"]
    logged, loads = {}, []
    # top_entropy_quantile < 1: the quantile is over every rank's tokens, as in one process.
    entropy_gather = (lambda local: gather_varying(local, run.world)) if config.top_entropy_quantile < 1 else None

    def log(key, value):
        logged.setdefault(key, []).append(value)

    for epoch in range(args.epochs):
        for index, rows in enumerate(run.slices):
            normalizer = None
            if config.loss_aggregation == "token-mean":
                # Gradients are averaged over ranks, so each rank divides by the global count / world.
                normalizer = sum_over_ranks(mask[rows].sum().float(), run.world).clamp(min=1) / run.world

            # Adaptive entropy: this step's coefficient, from the controller.
            step_config = config if run.entropy_control is None else run.entropy_control.loss_config(config)

            def minibatch_loss(hidden, weight):
                return softpo.policy_loss(
                    step_config, targets[rows], mask[rows], data.advantages[rows], hidden=hidden, weight=weight,
                    old_logp=data.old_logp[rows], ref_logp=None if data.ref_logp is None else data.ref_logp[rows],
                    rollout_logp=None if data.rollout_logp is None else data.rollout_logp[rows],
                    rewards=data.rewards[rows], q0=None if data.q0 is None else data.q0[rows],
                    temperature=args.temperature, normalizer=normalizer, impl=args.impl,
                    entropy_gather=entropy_gather,
                )

            out, router, used = scored(run.model, batch, rows, run.moe, minibatch_loss, run.replay,
                                       None if data.replayed is None else data.replayed[rows])
            loss = out.loss
            if run.replay is not None and epoch == 0 and index == 0:
                # Before this step's first update: what replay leaves of the old forward's log-probs.
                gap = ((out.logp - data.old_logp[rows]).abs() * mask[rows]).sum() / mask[rows].sum().clamp(min=1)
                log("replay_logp_gap", gap.item())
            if router is not None:
                aux, load = load_balancing(router, batch["valid"][rows], run.num_experts, run.top_k)
                loss = loss + run.aux_coef * aux
                scoring = batch["prompt_length"] - 1
                now = top_k_sets(router, scoring, run.top_k) if used is None else routing.top_k_sets(used, scoring)
                changed = (now != data.old_experts[index]).any(-1)
                log("aux_loss", aux.item())
                log("routing_drift", ((changed & mask[rows]).sum() / mask[rows].sum().clamp(min=1)
                                      / changed.shape[0]).item())
                loads.append(load)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not args.fsdp:  # FSDP2 reduce-scatters its gradients in the backward
                average_gradients(run.params, run.world)
            log("grad_norm", distributed.clip_grad_norm(run.params, args.max_grad_norm).item())
            run.optimizer.step()
            if run.entropy_control is not None:
                # One optimizer step: the step's entropy over every rank moves the coefficient.
                run.entropy_control = run.entropy_control.observe(out).step(
                    config, reduce=lambda stats: sum_over_ranks(stats.to(run.device, copy=True), run.world))
            log("total_loss", loss.item())
            for key, value in out.metrics.items():
                log(key, value.item())
    if data.fresh is not None and args.replay:
        run.pool.add_step(data.fresh)
    return logged, loads


METRIC_KEYS = ("loss", "policy_loss", "total_loss", "kl", "entropy", "ratio_mean", "ratio_min", "ratio_max",
               "clip_fraction", "clip_fraction_low", "clip_fraction_high", "gate_weight", "log_ratio_seq_var",
               "q_mean", "is_weight_mean", "routing_drift", "replay_logp_gap", "aux_loss", "grad_norm")


def record(run: Run, step: int, data: Collected, logged: dict, loads: list, elapsed: float) -> dict:
    """The step's metrics row (averaged over minibatches and ranks), appended to metrics.jsonl by rank 0."""
    metrics = reduce_metrics(logged, run.world, run.device)
    mask, online_rows = data.batch["mask"], data.online_rows
    # Rewards, lengths and generated tokens of the fresh samples; the stored ones are logged apart.
    tokens = sum_over_ranks(torch.stack([mask.sum(), mask[:online_rows].sum()]).float(), run.world)
    fresh_rewards = gather_over_ranks(data.rewards[:online_rows], run.world)
    stored_rewards = gather_over_ranks(data.rewards[online_rows:], run.world)
    generated = tokens[1].item()
    history = run.history
    row = {
        "step": step + 1,
        "reward_mean": fresh_rewards.mean().item() if fresh_rewards.numel() else None,
        "reward_std": fresh_rewards.std().item() if fresh_rewards.numel() > 1 else 0.0,
        "completion_length": generated / fresh_rewards.numel() if fresh_rewards.numel() else None,
        "offline_fraction": stored_rewards.numel() / (stored_rewards.numel() + fresh_rewards.numel()),
        "offline_reward_mean": stored_rewards.mean().item() if stored_rewards.numel() else None,
        "generated_tokens": generated,
        "generated_tokens_cumulative": generated + (history[-1]["generated_tokens_cumulative"] if history else 0),
        **{key: metrics.get(key) for key in METRIC_KEYS},
        "expert_load": torch.stack(loads).mean(0).tolist() if loads else None,
        "tokens_per_s": tokens[0].item() / elapsed,
        "peak_mem_mb": peak_memory_mb(run.device),
        "step_time_s": elapsed,
    }
    history.append(row)
    if run.main_rank:
        with open(run.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    return row


def finish(run: Run) -> None:
    """The plot and the closing lines (rank 0), then the processes torn down together."""
    history = run.history
    if run.main_rank and history:
        plot(run.run_dir, history)
        rewarded = [r["reward_mean"] for r in history if r["reward_mean"] is not None] or [math.nan]
        tenth = max(1, len(rewarded) // 10)
        first = sum(rewarded[:tenth]) / tenth
        last = sum(rewarded[-tenth:]) / tenth
        largest = max(s.stop - s.start for s in run.slices) * run.args.max_new_tokens
        logits_mb = largest * run.model.lm_head.weight.shape[0] * 4 / 2**20
        print(f"reward: first 10% of steps {first:.3f}, last 10% {last:.3f} (gain {last - first:+.3f})")
        print(f"peak memory: {peak_memory_mb(run.device):.0f} MiB "
              f"({'CUDA allocated' if run.device.type == 'cuda' else 'process RSS'}); "
              f"one minibatch's [tokens, vocab] fp32 logits would take {logits_mb:.1f} MiB")
        print(f"run directory: {run.run_dir} (config.json, metrics.jsonl, metrics.png, checkpoint.pt)")
    if dist.is_initialized():
        # Tear down together: a rank that leaves while rank 0 still writes the plot can abort in gloo.
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- run directory and checkpoints


def save_checkpoint(run_dir, step, model, optimizer, device, world, extra=None, replay=None):
    """checkpoint.pt (and the FSDP2 shards): model, optimizer, every rank's RNG state and replay buffer
    (`replay`: this rank's `Pool.recent_state()`), plus `extra`."""
    states = [(rng_state(device), replay)]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, (rng_state(device), replay))
    sharded = distributed.is_sharded(model)
    if sharded:
        # Each rank writes its shards; checkpoint.pt (written last) holds the step, RNG states and world size.
        distributed.save_sharded(os.path.join(run_dir, "checkpoint.dcp"), model, optimizer, step)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = os.path.join(run_dir, "checkpoint.pt")
    state = {"step": step, "rng": [rng for rng, _ in states], "replay": [buffer for _, buffer in states],
             "world_size": world, "sharded": sharded, **(extra or {})}
    if not sharded:
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def init_weights(model, run_dir: str) -> None:
    """--init-from: the weights of an earlier (unsharded) run's checkpoint.pt."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise _UsageError(f"--init-from: no checkpoint.pt in {run_dir}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "model" not in state:
        raise _UsageError(f"--init-from: {path} holds sharded weights (checkpoint.dcp); convert it first")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise _UsageError(f"--init-from: the model flags differ from that run's: {str(error).splitlines()[0]}") from None


def load_checkpoint(run: Run) -> None:
    """--resume: model and optimizer (sharded under --fsdp), this rank's RNG, the step and the metrics so far."""
    checkpoint_path = os.path.join(run.run_dir, "checkpoint.pt")
    if not os.path.isfile(checkpoint_path):
        raise _UsageError(f"--resume: no checkpoint.pt in {run.run_dir}")
    # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if state["world_size"] != run.world:
        raise _UsageError(f"--resume: the run used {state['world_size']} ranks, this one has {run.world}")
    if bool(state.get("sharded")) != run.args.fsdp:
        raise _UsageError(f"--resume: the run was saved {'with' if state.get('sharded') else 'without'} --fsdp")
    if run.args.fsdp:
        try:
            distributed.load_sharded(os.path.join(run.run_dir, "checkpoint.dcp"), run.model, run.optimizer,
                                     state["step"])
        except ValueError as error:
            raise _UsageError(str(error)) from None
    else:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"][run.rank]["torch"])
    if run.device.type == "cuda" and "cuda" in state["rng"][run.rank]:
        torch.cuda.set_rng_state(state["rng"][run.rank]["cuda"], run.device)
    run.start = state["step"]
    if run.pool is not None and state.get("replay"):
        run.pool.restore_recent(state["replay"][run.rank])
    if run.entropy_control is not None and state.get("entropy_control") is not None:
        run.entropy_control = softpo.AdaptiveEntropy(**state["entropy_control"])
    if os.path.isfile(run.metrics_path):
        with open(run.metrics_path, encoding="utf-8") as handle:
            run.history = [row for row in map(json.loads, handle) if row["step"] <= run.start]


def write_run_directory(run: Run) -> None:
    """config.json, metrics.jsonl up to the resumed step, samples.jsonl trimmed to it; the opening line."""
    os.makedirs(run.run_dir, exist_ok=True)
    resolved = {
        "args": dict(vars(run.args)), "loss_config": dataclasses.asdict(run.config),
        "model_config": run.model.config.to_dict(), "world_size": run.world, "device": str(run.device),
        "scale_rewards": run.scale_rewards, "router_aux_coef": run.aux_coef,
        "versions": {"softpo": softpo.__version__, "torch": torch.__version__},
    }
    with open(os.path.join(run.run_dir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(resolved, handle, indent=2, default=str)
    with open(run.metrics_path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in run.history)
    samples.truncate(run.samples_path, run.start)
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"softpo train: {run.args.model or 'Qwen3-MoE (random init)'}, {n_params / 1e6:.2f}M parameters, "
          f"loss {run.config.name}, {run.world} process(es) on {run.device}, run dir {run.run_dir}", file=sys.stderr)


# ---------------------------------------------------------------- processes: one helper per collective pattern


def start_processes(args) -> tuple[int, int, torch.device]:
    """(world, rank, device) from torchrun's environment; gloo on the CPU, nccl on GPUs (one per rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.fsdp and "MASTER_ADDR" not in os.environ:
        raise _UsageError("--fsdp: launch with torchrun (it sets RANK, WORLD_SIZE and MASTER_ADDR)")
    if world > 1 or args.fsdp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or 1)
    return world, rank, device


def control_state(control):
    """The adaptive-entropy controller between optimizer steps (its window is empty then), for checkpoint.pt."""
    return None if control is None else {"coef": control.coef, "last_entropy": control.last_entropy}


def raise_on_every_rank(compute, world: int, what: str):
    """compute() on this rank; if it raised on any rank, every rank raises, naming the rank and its error.
    User code (a reward function) may fail on one rank only: alone, that rank would leave the others
    waiting in their next collective."""
    try:
        value, error = compute(), None
    except Exception as exc:  # noqa: BLE001 -- any failure of user code is reported on every rank
        value, error = None, exc
    mine = None if error is None else f"{type(error).__name__}: {error}"
    errors = [mine]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, mine)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        rank, message = failed[0]
        where = f" on rank {rank}" if world > 1 else ""
        raise RuntimeError(f"{what} failed{where}: {message}") from error
    return value


def same_on_every_rank(value, world: int):
    """Rank 0's `value` (any picklable object) on every rank."""
    if world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_varying(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's 1-d tensor, concatenated in rank order, when ranks hold different lengths."""
    if world == 1:
        return tensor
    lengths = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([tensor.numel()], device=tensor.device))
    longest = int(max(length.item() for length in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(length.item())] for part, length in zip(gathered, lengths)])


def gather_over_ranks(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (every rank holds as many as the others)."""
    if world == 1 or tensor.numel() == 0:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


if __name__ == "__main__":
    raise SystemExit(main())
