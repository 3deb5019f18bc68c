"""The run directory of `softpo train`: config.json, metrics.jsonl, samples.jsonl, metrics.png and the
checkpoint (checkpoint.pt, plus checkpoint.dcp with --fsdp), written and read back."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

import softpo
from softpo.train import collectives, flags, fsdp, samples
from softpo.train.flags import UsageError


def save_checkpoint(run_dir, step, model, optimizer, device, world, extra=None, replay=None):
    """checkpoint.pt (and the FSDP2 shards): model, optimizer, every rank's RNG state and replay buffer
    (`replay`: this rank's `Pool.recent_state()`), plus `extra`."""
    states = collectives.gather_objects((rng_state(device), replay), world)
    sharded = fsdp.is_sharded(model)
    if sharded:
        # Each rank writes its shards; checkpoint.pt (written last) holds the step, RNG states and world size.
        fsdp.save_sharded(os.path.join(run_dir, "checkpoint.dcp"), model, optimizer, step)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = os.path.join(run_dir, "checkpoint.pt")
    state = {"step": step, "rng": [rng for rng, _ in states], "replay": [buffer for _, buffer in states],
             "world_size": world, "sharded": sharded, **(extra or {})}
    if not sharded:
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def save(run, step: int) -> None:
    """The run's checkpoint after `step` (every rank takes part)."""
    save_checkpoint(run.run_dir, step, run.model, run.optimizer, run.device, run.world,
                               {"entropy_control": control_state(run.entropy_control)},
                               replay=None if run.pool is None else run.pool.recent_state())


def init_weights(model, run_dir: str) -> None:
    """--init-from: the weights of an earlier (unsharded) run's checkpoint.pt."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"--init-from: no checkpoint.pt in {run_dir}")
    state = _read(path)
    if "model" not in state:
        raise UsageError(f"--init-from: {path} holds sharded weights (checkpoint.dcp); convert it first")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UsageError(f"--init-from: the model flags differ from that run's: {str(error).splitlines()[0]}") from None


def _read(path: str) -> dict:
    """checkpoint.pt as a dict; a file that is not one (truncated, empty, another format) is a usage error."""
    try:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 -- torch.load raises many types for a damaged file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or not {"step", "rng", "world_size"} <= state.keys():
        raise UsageError(f"{path}: not a softpo train checkpoint (no step, RNG states or world size)")
    return state


def load_checkpoint(run) -> None:
    """--resume: model and optimizer (sharded under --fsdp), this rank's RNG, the step and the metrics so far.
    Reads only: the run directory is rewritten after every rank has loaded."""
    checkpoint_path = os.path.join(run.run_dir, "checkpoint.pt")
    if not os.path.isfile(checkpoint_path):
        raise UsageError(f"--resume: no checkpoint.pt in {run.run_dir}")
    state = _read(checkpoint_path)
    if state["world_size"] != run.world:
        raise UsageError(f"--resume: the run used {state['world_size']} ranks, this one has {run.world}")
    if bool(state.get("sharded")) != run.args.fsdp:
        raise UsageError(f"--resume: the run was saved {'with' if state.get('sharded') else 'without'} --fsdp")
    if run.args.fsdp:
        try:
            fsdp.load_sharded(os.path.join(run.run_dir, "checkpoint.dcp"), run.model, run.optimizer, state["step"])
        except ValueError as error:
            raise UsageError(str(error)) from None
    else:
        try:
            run.model.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UsageError(f"{checkpoint_path}: does not fit this model ({reason})") from None
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


def write_run_directory(run) -> None:
    """config.json, metrics.jsonl up to the resumed step, samples.jsonl trimmed to it; the opening line."""
    os.makedirs(run.run_dir, exist_ok=True)
    resolved = {
        "args": flags.saved_settings(run.args), "loss_config": dataclasses.asdict(run.config),
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
    if run.args.resume:
        print(f"resumed {run.run_dir} at step {run.start} of {run.args.steps}", file=sys.stderr)


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def control_state(control):
    """The adaptive-entropy controller between optimizer steps (its window is empty then), for checkpoint.pt."""
    return None if control is None else {"coef": control.coef, "last_entropy": control.last_entropy}


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
