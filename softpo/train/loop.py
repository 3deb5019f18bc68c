"""`softpo train`: a thin RL loop for Mixture-of-Experts (and any causal) language models.

With no arguments it trains a small random-init Qwen3-MoE (8 experts, top-2 routing) on the built-in
`count` task (softpo/train/tasks.py) with SAPO, offline, on a CPU, in about a minute, and the reward climbs.

One step:
  prompts -> G samples per prompt (`model.generate`, temperature T) -> rewards -> group advantages
  -> old log-probs (and reference log-probs when beta > 0 or for SPO), no grad
  -> for each minibatch: final hidden states from the base model (never its logits) ->
     softpo.policy_loss(hidden, lm_head.weight) + router load-balancing loss -> AdamW step
  -> metrics.jsonl line, progress bar, checkpoint every --save-every steps.
Ctrl-C (SIGINT) or SIGTERM stops the run at the end of the step, with a checkpoint to --resume from.

Simplifications, on purpose:
- Sampling runs in the training process with transformers' `generate`; there is no inference engine,
  so the sampler's log-probs equal the trainer's and no rollout-mismatch correction is applied to
  fresh samples (offline ones with stored log-probs get it: softpo/train/samples.py).
- Raw-text prompts (no chat template); completions end at EOS or after --max-new-tokens.
- One optimizer step per minibatch, constant learning rate, no gradient accumulation.
- The reference policy is a frozen full copy of the initial weights.
- For SPO, q0 of a prompt comes from the rewards of its own G samples in the same step.
- Data parallel (torchrun) averages gradients with one all-reduce per update: what DDP does, minus
  bucketing and overlap. DDP's reducer expects each parameter to be used by its module's forward
  (or searches the graph every step with find_unused_parameters); here lm_head is used by the loss,
  outside the forward, and an MoE expert may get no token on a rank.
- Checkpoints keep the latest state only.
- --fsdp shards parameters, gradients and optimizer state with FSDP2 (softpo/train/fsdp.py); sampling then
  all-gathers every layer for every generated token, which is slow: an inference engine is the real fix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time

import torch

import softpo
from softpo.train import checkpoint, collectives, flags, fsdp, policy, routing, samples, stopping, tasks
from softpo.train.collectives import (average_gradients, barrier, gather_over_ranks, gather_varying,
                                      raise_on_every_rank, reduce_metrics, same_on_every_rank, sum_over_ranks)
from softpo.train.flags import UsageError
from softpo.train.policy import build_model, build_tokenizer, load_balancing, rollout, sampler_settings, scored


def main(argv: list[str] | None = None) -> int:
    """`softpo train`: 0 when done, 2 for bad arguments, 130 / 143 when stopped by SIGINT / SIGTERM."""
    try:
        args = flags.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except ValueError as error:
        print(f"softpo train: error: --{error}", file=sys.stderr)
        return 2
    try:
        return train(args)
    except UsageError as error:
        print(f"softpo train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Before the first step (loading, setting up): there is nothing new to save.
        print("softpo train: interrupted before the first step; nothing saved", file=sys.stderr)
        return 128 + signal.SIGINT


def train(args) -> int:
    run = setup(args)
    from tqdm import tqdm

    bar = tqdm(range(run.start, args.steps), initial=run.start, total=args.steps,
               disable=not run.main_rank or args.no_progress, dynamic_ncols=True)
    with stopping.StopSignals() as signals:
        for step in bar:
            began = time.perf_counter()
            data = collect(run, step)
            logged, loads = update(run, data)
            row = record(run, step, data, logged, loads, time.perf_counter() - began)
            if run.main_rank:
                shown = math.nan if row["reward_mean"] is None else row["reward_mean"]
                bar.set_postfix(reward=f"{shown:.3f}", loss=f"{row['loss']:.4f}", refresh=False)
            # One collective per step: a signal may have reached only some ranks, and all stop together.
            stop = collectives.any_rank(signals.received, run.world)
            if stop or (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                checkpoint.save(run, step + 1)
                if run.main_rank and not args.no_progress and data.prompts and not stop:
                    bar.write(f"step {step + 1}: {data.prompts[0]!r} -> {data.batch['texts'][0]!r} "
                              f"(reward {data.rewards[0].item():.2f})")
            if stop:
                bar.close()
                return stopping.stopped(run, step + 1, signal.Signals(stop))
    bar.close()
    finish(run)
    return 0


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
    # Sum of |sampler's log-prob - old log-prob| and the token count, over fresh completion tokens (truncated runs).
    sampler_gap: torch.Tensor | None = None


def setup(args) -> Run:
    """Arguments, processes, device, tokenizer, models (sharded with --fsdp), loss, optimizer, run directory."""
    try:
        flags.check_args(args)
        task = tasks.TASKS[args.task]
        args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
        reward_fn = tasks.load_reward(args.reward) if args.reward else task.reward
        prompt_pool = tasks.load_prompts(args.prompts) if args.prompts else None
        config = flags.loss_config(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    world, rank, device = collectives.start_processes(args)
    if args.prompts_per_step % world:
        raise UsageError(f"--prompts-per-step ({args.prompts_per_step}) must be divisible by the {world} ranks")

    tokenizer = build_tokenizer(args)
    # Sharded, the model stays on the CPU until `shard` moves each group's shards to the device.
    model = build_model(args, tokenizer, torch.device("cpu") if args.fsdp else device)
    if args.init_from:
        # Before the reference copy: a fine-tuning run's reference is the model it starts from.
        checkpoint.init_weights(model, args.init_from)
    collectives.broadcast_from_first_rank(model, device)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if config.needs_ref else None
    if args.fsdp:
        try:
            fsdp.shard(model, device)
        except ValueError as error:
            raise UsageError(f"--fsdp: {error}") from None
        if reference is not None:
            fsdp.shard(reference, device)
    aux_coef = args.router_aux_coef
    if aux_coef is None:
        aux_coef = getattr(model.config, "router_aux_loss_coef", 0.001)
    scale_rewards = (args.scale_rewards or ("none" if config.name == "dr_grpo" else "group")) == "group"
    replay = None
    if args.routing_replay != "none":
        try:
            replay = routing.RoutingReplay(model)
        except ValueError as error:
            raise UsageError(str(error)) from None
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
        checkpoint.load_checkpoint(run)
    else:
        # Decided on rank 0 for all: a rank that refused alone would leave the others in the barrier.
        if same_on_every_rank(os.path.exists(run.metrics_path), world):
            raise UsageError(f"--out: {run.run_dir} already holds a run; pass --resume {run.run_dir} to continue it")
        torch.manual_seed(args.seed + 1 + rank)
    # Every rank has checked and read the run directory before rank 0 rewrites it.
    barrier(world)
    if run.main_rank:
        checkpoint.write_run_directory(run)
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
    sampler_gap = None
    if batch is not None and "sampler_logp" in batch:
        # generate's own log-prob of each sampled token against softpo's: ~0 when both score one distribution.
        fresh_mask = batch["mask"][:online_rows]
        diff = (batch["sampler_logp"][:online_rows] - old_logp[:online_rows]).abs()
        sampler_gap = torch.stack([torch.where(fresh_mask, diff, 0.0).sum(), fresh_mask.sum().float()])
    fresh = None
    if prompts and (args.save_samples or args.replay):
        fresh = samples.fresh_groups(step + 1, prompts, batch, rewards, old_logp, args.group_size, run.tokenizer)
        if args.save_samples:
            every_rank = [group for part in collectives.gather_objects(fresh, run.world) for group in part]
            if run.main_rank:
                samples.save(run.samples_path, step + 1, every_rank)
    return Collected(prompts, batch, rewards, advantages, q0, online_rows, old_logp, ref_logp, rollout_logp,
                     old_experts, replayed, fresh, sampler_gap)


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
            def logprobs(hidden, weight, truncated=True):
                return softpo.token_logprobs(targets[rows], hidden=hidden, weight=weight, impl=args.impl,
                                             **sampler_settings(args, truncated))

            def reference_logprobs(hidden, weight):
                # The KL is to the reference's full distribution: a truncated one is -inf (an infinite KL)
                # wherever the reference would not keep the token.
                return logprobs(hidden, weight, truncated=False)

            force = None if sampled_experts is None else sampled_experts[rows]
            old_logp[rows], router, used = scored(run.model, batch, rows, run.moe, logprobs, run.replay, force)
            if used is not None:
                replayed[rows] = used
                old_experts.append(routing.top_k_sets(used, batch["prompt_length"] - 1))
            elif router is not None:
                old_experts.append(routing.top_k_sets(routing.routed_experts(router, run.top_k),
                                                      batch["prompt_length"] - 1))
            if run.reference is not None:
                ref_logp[rows], _, _ = scored(run.reference, batch, rows, False, reference_logprobs)
    # Under truncation a padding target may lie outside the kept set (-inf); masked, it is set to 0 so that no
    # inf - inf reaches a masked ratio or gap.
    return old_logp.masked_fill(~mask, 0.0), ref_logp, old_experts, replayed


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
                    normalizer=normalizer, impl=args.impl, entropy_gather=entropy_gather,
                    **sampler_settings(args),
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
                now = routing.top_k_sets(routing.routed_experts(router, run.top_k) if used is None else used, scoring)
                changed = (now != data.old_experts[index]).any(-1)
                log("aux_loss", aux.item())
                log("routing_drift", ((changed & mask[rows]).sum() / mask[rows].sum().clamp(min=1)
                                      / changed.shape[0]).item())
                loads.append(load)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not args.fsdp:  # FSDP2 reduce-scatters its gradients in the backward
                average_gradients(run.params, run.world)
            log("grad_norm", fsdp.clip_grad_norm(run.params, args.max_grad_norm).item())
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
        "sampler_logp_gap": sampler_logp_gap(data, run.world),
        "expert_load": torch.stack(loads).mean(0).tolist() if loads else None,
        "tokens_per_s": tokens[0].item() / elapsed,
        "peak_mem_mb": policy.peak_memory_mb(run.device),
        "step_time_s": elapsed,
    }
    history.append(row)
    if run.main_rank:
        with open(run.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    return row


def sampler_logp_gap(data: Collected, world: int) -> float | None:
    """Mean |generate's log-prob of the sampled token - softpo's old log-prob| over fresh completion tokens of
    every rank; None when the run does not truncate (then both are softmax(z / T) by construction)."""
    if data.sampler_gap is None:
        return None
    total, count = sum_over_ranks(data.sampler_gap, world).tolist()
    return total / max(count, 1.0)


def finish(run: Run) -> None:
    """The plot and the closing lines (rank 0), then the processes torn down together."""
    history = run.history
    if run.main_rank and history:
        checkpoint.plot(run.run_dir, history)
        rewarded = [r["reward_mean"] for r in history if r["reward_mean"] is not None] or [math.nan]
        tenth = max(1, len(rewarded) // 10)
        first = sum(rewarded[:tenth]) / tenth
        last = sum(rewarded[-tenth:]) / tenth
        tokens = max(s.stop - s.start for s in run.slices) * run.args.max_new_tokens
        print(f"reward: first 10% of steps {first:.3f}, last 10% {last:.3f} (gain {last - first:+.3f})")
        print(policy.memory_line(run.device, tokens, run.model.lm_head.weight.shape[0]))
        print(f"run directory: {run.run_dir} (config.json, metrics.jsonl, metrics.png, checkpoint.pt)")
    collectives.end_processes(run.world)


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: minus the group mean, over the group std (+1e-4) when `scale`."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale and rewards.shape[1] > 1 and rewards.shape[0]:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return advantages


def offline_pool(args, config, tokenizer, model, scale_rewards):
    """The off-policy groups (--offline files, --replay buffer), or None; bad files are a usage error."""
    if not (args.offline or args.replay):
        return None

    def score(group):
        rewards = torch.tensor([group.rewards])
        group.advantages = group_advantages(rewards, scale_rewards)[0].tolist()
        group.q0 = softpo.spo_q0(rewards, config.beta).item() if config.objective == "spo" else 0.0

    try:
        groups = samples.load(samples.offline_paths(args.offline), tokenizer, model.config.vocab_size,
                              None if config.objective == "spo" else config.name)
    except samples.SampleFileError as error:
        raise UsageError(str(error)) from None
    return samples.Pool(groups, args.replay, score)
