"""`softpo compare`: several losses, each trained from several seeds on the built-in MoE task, side by side.

Arms (each a `softpo train` run, several seeds each):
  sapo, gspo, grpo         the presets as they are
  grpo_routing_replay      GRPO whose training forwards reuse the experts of the old log-probs' forward
                           (--routing-replay old)
  spo                      SPO, every completion freshly sampled
  spo_half                 SPO half-online: half of each step's prompt groups are the run's own samples of
                           the last --replay-steps steps (--replay N --offline-fraction 0.5), so it generates
                           half the completions
The setting drifts off-policy on purpose: several minibatches per generation, two epochs, a larger
learning rate, so the policy and the routing move between sampling and the last update.

The results folder holds every run's metrics.jsonl (runs/ARM/seedS/), `results.json` (settings,
versions, date, wall time and the summary), `table.md`, `curves.json` (each run's per-step reward,
drift, entropy, gradient norm, largest ratio, generated tokens) and `rewards.png` / `drift.png`. `--quick` is a
smoke-sized set (tiny model, two seeds, a few steps) for CI: it checks the machinery, not the algorithms.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time

from softpo.helptext import HelpFormatter

ARMS = {
    "sapo": ["--loss", "sapo"],
    "gspo": ["--loss", "gspo"],
    "grpo": ["--loss", "grpo"],
    "grpo_routing_replay": ["--loss", "grpo", "--routing-replay", "old"],
    "spo": ["--loss", "spo"],
    "spo_half": ["--loss", "spo", "--offline-fraction", "0.5"],
}
# Several updates per generation, two passes, a larger learning rate: the old log-probs and the routing
# they were computed under go stale within each step.
DRIFTING = ["--minibatches", "4", "--epochs", "2", "--lr", "3e-3"]
FULL = ["--prompts-per-step", "16", "--group-size", "8"]
QUICK = ["--hidden-size", "32", "--layers", "1", "--experts", "4", "--prompts-per-step", "4", "--group-size", "4"]
TARGET = 0.6
EXAMPLES = """examples:
  softpo compare --quick --out /tmp/compare
  softpo compare --arms sapo,grpo,grpo_routing_replay --seeds 3 --jobs 2
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"softpo compare: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser():
    p = _Parser(prog="softpo compare", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                formatter_class=HelpFormatter)
    p.add_argument("--out", default=os.path.join("bench", "results", "compare"), help="results folder")
    p.add_argument("--quick", action="store_true", help="CI size: tiny model, 2 seeds, 4 steps")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run, any of")
    p.add_argument("--seeds", type=int, help="seeds per arm; default: 3, or 2 with --quick")
    p.add_argument("--steps", type=int, help="steps per run; default: 200, or 4 with --quick")
    p.add_argument("--replay-steps", type=int, default=4, help="spo_half: steps of own samples kept for reuse")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each")
    return p


def run_argv(arm, seed, args, run_dir):
    argv = [*(QUICK if args.quick else FULL), *DRIFTING, *ARMS[arm], "--steps", str(args.steps),
            "--seed", str(seed), "--save-every", str(args.steps), "--threads", "1", "--no-progress",
            "--out", run_dir]
    if arm == "spo_half":
        argv += ["--replay", str(args.replay_steps)]
    return argv


def _run(argv):
    """One training run in this process; returns its exit status and wall time."""
    import contextlib
    import io

    from softpo import train

    began = time.perf_counter()
    # Each run prints a few summary lines; the comparison prints its own.
    with contextlib.redirect_stdout(io.StringIO()):
        status = train.main(argv)
    checkpoint = os.path.join(argv[argv.index("--out") + 1], "checkpoint.pt")
    if os.path.exists(checkpoint):
        os.remove(checkpoint)
    return status, time.perf_counter() - began


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def smooth(values, window):
    return [sum(values[max(0, i - window + 1): i + 1]) / min(i + 1, window) for i in range(len(values))]


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize_run(rows):
    """One run's numbers: final reward (mean of the last 10% of steps), steps to reach TARGET (10-step
    moving average of the fresh samples' reward), largest gradient norm, means of the drift statistics."""
    rewards = [r["reward_mean"] for r in rows]
    tenth = max(1, len(rewards) // 10)
    smoothed = smooth(rewards, 10)
    reached = next((r["step"] for r, value in zip(rows, smoothed) if value >= TARGET), None)
    gate = "gate_weight" if any(r.get("gate_weight") is not None for r in rows) else "clip_fraction"
    return {
        "final_reward": sum(rewards[-tenth:]) / tenth,
        "steps_to_target": reached,
        "max_grad_norm": max(r["grad_norm"] for r in rows),
        "routing_drift": _mean([r["routing_drift"] for r in rows]),
        "gate_statistic": gate if any(r.get(gate) is not None for r in rows) else None,
        "gate_value": _mean([r.get(gate) for r in rows]),
        "ratio_max": max((r["ratio_max"] for r in rows if r.get("ratio_max") is not None), default=None),
        "generated_tokens": rows[-1]["generated_tokens_cumulative"],
        "replay_logp_gap": _mean([r.get("replay_logp_gap") for r in rows]),
    }


def summarize_arm(runs):
    finals = [r["final_reward"] for r in runs]
    reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    return {
        "seeds": len(runs),
        "final_reward_mean": statistics.fmean(finals),
        "final_reward_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "final_reward_min": min(finals),
        "final_reward_max": max(finals),
        "seeds_reaching_target": len(reached),
        "steps_to_target_median": statistics.median(reached) if reached else None,
        "max_grad_norm": max(r["max_grad_norm"] for r in runs),
        "routing_drift_mean": _mean([r["routing_drift"] for r in runs]),
        "gate_statistic": runs[0]["gate_statistic"],
        "gate_value_mean": _mean([r["gate_value"] for r in runs]),
        "generated_tokens_mean": statistics.fmean(r["generated_tokens"] for r in runs),
        "replay_logp_gap_mean": _mean([r["replay_logp_gap"] for r in runs]),
        "runs": runs,
    }


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def table(summary, steps):
    lines = [
        f"| arm | seeds | final reward (mean ± std) [min, max] | steps to {TARGET} (median; seeds that got there) "
        "| largest grad norm | mean routing drift | gate weight or clip fraction (mean) | generated tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        reached = f"{_fmt(s['steps_to_target_median'], 0)} ({s['seeds_reaching_target']}/{s['seeds']})"
        gate = f"{s['gate_statistic']} {_fmt(s['gate_value_mean'])}" if s["gate_statistic"] else "-"
        lines.append(
            f"| {arm} | {s['seeds']} | {s['final_reward_mean']:.3f} ± {s['final_reward_std']:.3f} "
            f"[{s['final_reward_min']:.3f}, {s['final_reward_max']:.3f}] | {reached} | {s['max_grad_norm']:.3f} "
            f"| {_fmt(s['routing_drift_mean'])} | {gate} | {s['generated_tokens_mean']:.0f} |"
        )
    lines.append("")
    lines.append(f"Final reward: mean over the last 10% of {steps} steps of the fresh samples' reward. Steps to "
                 f"{TARGET}: first step whose 10-step moving average reaches it.")
    return "\n".join(lines) + "\n"


CURVE_KEYS = ("reward_mean", "routing_drift", "entropy", "grad_norm", "ratio_max", "generated_tokens")


def save_curves(out, curves):
    """Per-step series of every run, small enough to keep beside the table: curves.json."""
    series = {f"{arm}/seed{seed}": {key: [row.get(key) for row in rows] for key in CURVE_KEYS}
              for arm, runs in curves.items() for seed, rows in enumerate(runs)}
    with open(os.path.join(out, "curves.json"), "w", encoding="utf-8") as handle:
        json.dump(series, handle)


def plot(out, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, title, name in (("reward_mean", "reward of fresh samples (10-step average)", "rewards.png"),
                             ("routing_drift", "routing drift (10-step average)", "drift.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for arm, runs in curves.items():
            series = [smooth([r[key] if r[key] is not None else math.nan for r in rows], 10) for rows in runs]
            steps = [r["step"] for r in runs[0]]
            n = min(map(len, series))
            mean = [statistics.fmean(s[i] for s in series) for i in range(n)]
            low = [min(s[i] for s in series) for i in range(n)]
            high = [max(s[i] for s in series) for i in range(n)]
            (line,) = ax.plot(steps[:n], mean, lw=1.6, label=arm)
            ax.fill_between(steps[:n], low, high, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(f"{title}: mean over seeds, band = min to max")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.steps is None:
        args.steps = 4 if args.quick else 200
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    for name, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--jobs", args.jobs),
                        ("--replay-steps", args.replay_steps)):
        if value <= 0:
            print(f"softpo compare: error: {name} must be > 0, got {value}", file=sys.stderr)
            return 2
    if unknown or not arms:
        print(f"softpo compare: error: --arms: unknown {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.out, "results.json")):
        print(f"softpo compare: error: --out: {args.out} already holds results", file=sys.stderr)
        return 2

    jobs = [(arm, seed, run_argv(arm, seed, args, os.path.join(args.out, "runs", arm, f"seed{seed}")))
            for arm in arms for seed in range(args.seeds)]
    began = time.perf_counter()
    if args.jobs == 1:
        results = [_run(argv) for _, _, argv in jobs]
    else:
        # Fresh interpreters: each run pins its own thread count and seeds its own RNG.
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_run, [argv for _, _, argv in jobs], chunksize=1)
    wall = time.perf_counter() - began
    failed = [f"{arm} seed {seed}" for (arm, seed, _), (status, _) in zip(jobs, results) if status != 0]
    if failed:
        print(f"softpo compare: error: runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1

    curves = {arm: [read_metrics(argv[argv.index("--out") + 1]) for a, _, argv in jobs if a == arm] for arm in arms}
    summary = {arm: summarize_arm([summarize_run(rows) for rows in curves[arm]]) for arm in arms}
    import torch
    import transformers

    import softpo

    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"quick": args.quick, "seeds": args.seeds, "steps": args.steps, "replay_steps": args.replay_steps,
                     "jobs": args.jobs, "common_flags": (QUICK if args.quick else FULL) + DRIFTING,
                     "arms": {arm: ARMS[arm] + (["--replay", str(args.replay_steps)] if arm == "spo_half" else [])
                              for arm in arms}},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"softpo": softpo.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "wall_s": wall,
        "run_wall_s": {f"{arm}/seed{seed}": t for (arm, seed, _), (_, t) in zip(jobs, results)},
        "summary": summary,
    }
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    text = table(summary, args.steps)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    save_curves(args.out, curves)
    plot(args.out, curves)
    print(text, end="")
    print(f"{len(jobs)} runs in {wall:.0f} s; results in {args.out} (results.json, table.md, curves.json, "
          "rewards.png, drift.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
