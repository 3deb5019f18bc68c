"""Every flag of `softpo train`, in one parser, and what they resolve to before a run starts."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from softpo import config as presets
from softpo.helptext import HelpFormatter
from softpo.train import routing, samples, tasks

DESCRIPTION = """Train a language model with RL (SAPO, GRPO, SPO, ...). With no flags, a small random-init
Qwen3-MoE learns the built-in `count` task on the CPU in about a minute."""
EXAMPLES = """examples:
  softpo train --steps 200 --out runs/sapo
  softpo train --resume runs/sapo --steps 400
  torchrun --nproc-per-node 2 -m softpo.train --fsdp --loss grpo --beta 0.04 --routing-replay old
"""
LOSSES = tuple(presets.PRESETS)
# Flags that only shape how a run is shown or paced on this machine: not the run's settings, so neither saved
# with it nor restored by --resume.
NOT_SAVED = ("resume", "no_progress", "threads")


class UsageError(Exception):
    """A bad argument found after parsing: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"softpo train: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of `softpo train`, grouped by section."""
    p = _Parser(prog="softpo train", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="local directory of any transformers causal LM (with its tokenizer); "
                   "default: a random-init Qwen3-MoE and the built-in character tokenizer")
    g.add_argument("--vocab-size", type=int, help="built-in model's vocabulary (e.g. 151936 for Qwen-sized); "
                   "default: the tokenizer's size")
    g.add_argument("--hidden-size", type=int, default=64, help="built-in model's hidden size")
    g.add_argument("--layers", type=int, default=2, help="built-in model's decoder layers")
    g.add_argument("--experts", type=int, default=8, help="built-in model's experts per MoE layer")
    g.add_argument("--experts-per-token", type=int, default=2, help="built-in model's experts each token is routed to")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    g.add_argument("--tie-embeddings", action="store_true", help="built-in model: lm_head shares the input "
                   "embedding's weight")
    g.add_argument("--init-from", metavar="RUN_DIR", help="start policy (and reference) from the weights of an "
                   "earlier run's checkpoint.pt (same model flags; optimizer and step start fresh); "
                   "default: fresh weights")

    g = p.add_argument_group("task and sampling")
    g.add_argument("--task", choices=sorted(tasks.TASKS), default="count", help="built-in task: its prompts, reward "
                   "and completion length")
    g.add_argument("--prompts", help="text file, one prompt per line; default: the task's prompts")
    g.add_argument("--reward", help="module:function taking (prompts, completions) and returning floats; "
                   "default: the task's reward")
    g.add_argument("--prompts-per-step", type=int, default=32, help="global, split across ranks")
    g.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, help="completion length limit; default: the task's")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, also used in "
                   "every log-prob")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all); the "
                   "old and new log-probs are those of the same truncated distribution")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this "
                   "much probability (1.0: all), after --top-k; scored the same way")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this fraction of the "
                   "most likely one (0: none), after --top-p; scored the same way")
    g.add_argument("--score-untruncated", action="store_true", help="sample truncated but score the full "
                   "softmax(z / T), as a loop unaware of the sampler's truncation would (shows sampler_logp_gap)")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="sapo", help=f"preset: {', '.join(LOSSES)} (or a TRL loss_type)")
    g.add_argument("--beta", type=float, help="KL coefficient (SPO: its temperature); default: the preset's")
    g.add_argument("--epsilon", type=float, help="lower clip range (SAPO: the gate's width); default: the preset's")
    g.add_argument("--epsilon-high", type=float, help="upper clip range; default: the preset's")
    g.add_argument("--entropy-coef", type=float, help="entropy bonus coefficient; default: the preset's")
    g.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any other LossConfig field, value as JSON (repeatable): "
                   "--set delta=3 --set kl_estimator='\"k1\"'; default: none")
    g.add_argument("--scale-rewards", choices=("group", "none"),
                   help="divide advantages by the group's reward std; default: none for dr_grpo, group otherwise")
    g.add_argument("--router-aux-coef", type=float,
                   help="load-balancing loss coefficient; default: the model config's")
    g.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto",
                   help="softpo path: auto = Triton kernels on CUDA, chunked torch otherwise")

    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=400, help="RL steps, each one generation and its updates")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--minibatches", type=int, default=2, help="optimizer steps per epoch over one rollout")
    g.add_argument("--epochs", type=int, default=1, help="passes over one rollout")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient norm clip")

    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory; default: runs/<date-time>")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint; other flags "
                   "given alongside override the saved ones; default: a new run")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every k steps (and at the end, and "
                   "when stopped by Ctrl-C or SIGTERM)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model's weights, the prompts and the sampling")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA when available")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over the "
                   "torchrun processes with FSDP2 (fully_shard per decoder layer and on the model)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads per process (the built-in model is too "
                   "small to gain from more, and oversubscribed threads on a busy machine slow it over tenfold)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("off-policy data")
    g.add_argument("--save-samples", action="store_true",
                   help="append every step's fresh samples to samples.jsonl in the run directory")
    g.add_argument("--offline", metavar="FILE[,FILE...]",
                   help="sample files (JSONL with prompt, completion, reward; completion_ids and logprobs optional); "
                   "default: none")
    g.add_argument("--offline-fraction", type=float, metavar="F",
                   help="share of each step's prompt groups drawn from --offline / --replay data, 0 to 1; "
                   "default: 0.5 (SPO's half-online setting) when either is given, else 0")
    g.add_argument("--replay", type=int, default=0, metavar="N",
                   help="keep the last N steps' own samples and reuse them as off-policy data")

    g = p.add_argument_group("MoE routing")
    g.add_argument("--routing-replay", choices=routing.MODES, default="none",
                   help="force the training forward to recorded experts: old = those of the forward that computed "
                   "the old log-probs, rollout = those chosen while sampling; gate weights stay live")
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.set = args.set or []
    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"resume: {path} not found")
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)["args"]
        # Saved values become defaults, so flags given alongside --resume still win.
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in NOT_SAVED})
        args = parser.parse_args(argv)
        args.set = args.set or []
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
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not (math.isfinite(args.min_p) and 0 <= args.min_p <= 1):
        raise ValueError(f"--min-p must be in [0, 1], got {args.min_p}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.experts_per_token > args.experts:
        raise ValueError(f"--experts-per-token ({args.experts_per_token}) must be <= --experts ({args.experts})")
    if args.model is not None and not os.path.isdir(args.model):
        raise ValueError(f"--model: directory {args.model!r} not found")
    if args.model is not None and args.vocab_size is not None:
        raise ValueError("--vocab-size applies to the built-in model only")
    if args.fsdp and "MASTER_ADDR" not in os.environ:
        raise ValueError("--fsdp: launch with torchrun (it sets RANK, WORLD_SIZE and MASTER_ADDR)")
    if args.fsdp and args.routing_replay == "rollout":
        # Sharded sampling keeps finished ranks stepping (synced_gpus), and those extra forwards would be
        # recorded as sampled positions.
        raise ValueError("--routing-replay rollout is not supported with --fsdp; use --routing-replay old")
    if args.model is not None and args.tie_embeddings:
        raise ValueError("--tie-embeddings applies to the built-in model only (a --model's config decides)")
    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise ValueError(f"--prompts: file {args.prompts!r} not found")
    if args.replay < 0:
        raise ValueError(f"--replay must be >= 0, got {args.replay}")
    has_source = bool(args.offline) or args.replay > 0
    if args.offline_fraction is None:
        args.offline_fraction = 0.5 if has_source else 0.0
    fraction = args.offline_fraction
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError(f"--offline-fraction must lie in [0, 1], got {fraction}")
    if fraction > 0 and not has_source:
        raise ValueError("--offline-fraction needs data: pass --offline FILE or --replay N")
    if fraction == 1 and not args.offline:
        raise ValueError("--offline-fraction 1 with only --replay would never generate a sample to replay")
    for path in samples.offline_paths(args.offline):
        if not os.path.isfile(path):
            raise ValueError(f"--offline: file {path!r} not found")


def loss_config(args) -> presets.LossConfig:
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
        config = presets.preset(args.loss, **overrides)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--loss/--set: {error}") from error
    return config


def saved_settings(args) -> dict:
    """The run's settings for config.json: every flag but those that only shape how it is shown."""
    return {key: value for key, value in vars(args).items() if key not in NOT_SAVED}
