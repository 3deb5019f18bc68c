"""Off-policy data for `softpo train`: saved samples, offline files, the replay buffer, and the mixed batch.

A sample file is JSONL, one completion a line. `--save-samples` writes
  {"step", "prompt", "completion", "completion_ids", "reward", "logprobs"}
where `completion_ids` are the sampled tokens up to and including EOS and `logprobs` their log-probs
under the sampling distribution (the no-grad forward at the sampling weights, which scores the very
distribution `generate` drew from). A file from elsewhere needs only `prompt`, `completion` and
`reward`: its completion is tokenized and EOS appended.

Samples form groups: the lines of one file that share `step` (when present) and `prompt`. An offline
sample's advantage (and SPO's q0) comes from its own group's stored rewards, exactly as a fresh
group's comes from its G samples. Each step draws whole groups and takes G samples from each (a
random G of a larger group, a smaller group's samples in turn), so every rank's batch keeps the shape
of an online one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random

import torch


class SampleFileError(ValueError):
    """A bad sample file: the message starts with FILE:LINE."""


def offline_paths(offline: str | None) -> list[str]:
    """--offline's comma-separated files."""
    return [p for p in (offline or "").split(",") if p]


@dataclasses.dataclass
class Group:
    """Samples of one prompt; rewards, advantages and q0 are the group's own."""

    prompt: str
    where: str
    prompt_ids: list[int]
    completions: list[list[int]]
    texts: list[str]
    rewards: list[float]
    logprobs: list[list[float] | None]
    advantages: list[float] = dataclasses.field(default_factory=list)
    q0: float = 0.0


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_line(line: str, tokenizer, vocab_size: int):
    """One JSONL line -> (key, prompt_ids, completion_ids, text, reward, logprobs); ValueError says what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("prompt", "completion", "reward") if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {missing}; a sample needs prompt, completion and reward")
    prompt, text, reward = record["prompt"], record["completion"], record["reward"]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(text, str):
        raise ValueError(f"completion must be a string, got {type(text).__name__}")
    if not _finite_number(reward):
        raise ValueError(f"reward must be a finite number, got {reward!r}")
    unk = tokenizer.unk_token_id
    prompt_ids = _encode(tokenizer, prompt)
    if not prompt_ids or (unk is not None and unk in prompt_ids):
        raise ValueError(f"the tokenizer cannot encode prompt {prompt!r}")
    ids = record.get("completion_ids")
    if ids is None:
        if record.get("logprobs") is not None:
            raise ValueError("logprobs need completion_ids (the tokens they score)")
        ids = _encode(tokenizer, text)
        if unk is not None and unk in ids:
            raise ValueError(f"the tokenizer cannot encode completion {text!r}")
        ids = ids + [tokenizer.eos_token_id]
    elif not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("completion_ids must be a non-empty list of integers")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"completion_ids {bad[:3]} lie outside the vocabulary [0, {vocab_size})")
    logprobs = record.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, list) or len(logprobs) != len(ids):
            raise ValueError(f"logprobs must be a list with one value per completion id ({len(ids)})")
        if not all(_finite_number(v) and v <= 0 for v in logprobs):
            raise ValueError("logprobs must be finite numbers <= 0")
    step = record.get("step")
    return (step, prompt), prompt_ids, ids, text, float(reward), logprobs


def load(paths: list[str], tokenizer, vocab_size: int, needs_logprobs: str | None) -> list[Group]:
    """Read and check sample files into prompt groups.

    needs_logprobs: the name of a ratio-based loss, which cannot train on a sample without the
    behaviour policy's log-probs; None (SPO) accepts any sample. Raises SampleFileError("FILE:LINE: ...").
    """
    groups: list[Group] = []
    for path in paths:
        by_key: dict = {}
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    key, prompt_ids, ids, text, reward, logprobs = _parse_line(line, tokenizer, vocab_size)
                except ValueError as error:
                    raise SampleFileError(f"{where}: {error}") from None
                if logprobs is None and needs_logprobs:
                    raise SampleFileError(
                        f"{where}: no logprobs, and --loss {needs_logprobs} weighs each token by its ratio to the "
                        "policy that sampled it; pass samples saved with logprobs, or train on these with --loss spo")
                group = by_key.get(key)
                if group is None:
                    group = by_key[key] = Group(key[1], where, prompt_ids, [], [], [], [])
                    groups.append(group)
                group.completions.append(ids)
                group.texts.append(text)
                group.rewards.append(reward)
                group.logprobs.append(logprobs)
        if not by_key:
            raise SampleFileError(f"{path}:1: holds no sample")
    return groups


class Pool:
    """Offline groups (from files) plus the last N steps' own groups (the replay buffer)."""

    def __init__(self, groups: list[Group], replay_steps: int, score):
        # score(group) fills the group's advantages and q0 from its stored rewards.
        self.score = score
        self.offline = groups
        for group in groups:
            score(group)
        self.recent = collections.deque(maxlen=replay_steps) if replay_steps else None

    def __len__(self):
        return len(self.offline) + (sum(map(len, self.recent)) if self.recent is not None else 0)

    def add_step(self, groups: list[Group]) -> None:
        if self.recent is not None:
            for group in groups:
                self.score(group)
            self.recent.append(groups)

    def recent_state(self) -> list[list[dict]] | None:
        """The replay buffer as plain data, for a checkpoint (the offline groups come from their files)."""
        return None if self.recent is None else [[dataclasses.asdict(g) for g in step] for step in self.recent]

    def restore_recent(self, state: list[list[dict]] | None) -> None:
        """The replay buffer a checkpoint saved (scored already); a smaller --replay keeps its last steps."""
        if self.recent is not None and state:
            self.recent.extend([Group(**g) for g in step] for step in state)

    def draw(self, count: int, group_size: int, rng: random.Random):
        """`count` groups, G samples each: [(group, sample indices)]."""
        every = self.offline + [g for step in (self.recent or ()) for g in step]
        drawn = []
        for _ in range(count):
            group = rng.choice(every)
            n = len(group.rewards)
            picks = rng.sample(range(n), group_size) if n >= group_size else [i % n for i in range(group_size)]
            drawn.append((group, picks))
        return drawn


def offline_batch(drawn, pad_id: int, device):
    """The drawn samples as a token batch shaped like a rollout's, plus their stored per-row data."""
    prompts = [g.prompt_ids for g, picks in drawn for _ in picks]
    completions = [g.completions[i] for g, picks in drawn for i in picks]
    P, T = max(map(len, prompts)), max(map(len, completions))
    n = len(prompts)
    input_ids = torch.full((n, P + T), pad_id, dtype=torch.long)
    attention = torch.zeros((n, P + T), dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.bool)
    behaviour = torch.zeros((n, T))
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[row, P - len(prompt): P] = torch.tensor(prompt)
        input_ids[row, P: P + len(completion)] = torch.tensor(completion)
        attention[row, P - len(prompt):] = 1
        mask[row, : len(completion)] = True
    logprobs = [g.logprobs[i] for g, picks in drawn for i in picks]
    for row, values in enumerate(logprobs):
        if values is not None:
            behaviour[row, : len(values)] = torch.tensor(values)
    batch = _token_batch(input_ids, attention, mask, P, device)
    batch["texts"] = [g.texts[i] for g, picks in drawn for i in picks]
    stored = {
        "rewards": torch.tensor([g.rewards[i] for g, picks in drawn for i in picks]),
        "advantages": torch.tensor([g.advantages[i] for g, picks in drawn for i in picks]),
        "q0": torch.tensor([g.q0 for g, picks in drawn for _ in picks]),
        "behaviour_logp": behaviour if all(v is not None for v in logprobs) else None,
    }
    return batch, {k: None if v is None else v.to(device) for k, v in stored.items()}


def _token_batch(input_ids, attention, mask, prompt_length, device):
    valid = attention.bool().clone()
    valid[:, prompt_length:] = mask
    return {
        "input_ids": input_ids.to(device), "attention_mask": attention.to(device),
        "position_ids": (attention.cumsum(dim=1) - 1).clamp(min=0).to(device), "valid": valid.to(device),
        "targets": input_ids[:, prompt_length:].to(device), "mask": mask.to(device), "prompt_length": prompt_length,
    }


def concat(online, offline, pad_id: int):
    """Rows of two token batches in one: prompts left-padded and completions right-padded to the longer.

    The completion region is attended to in every row, as it is after generate's own EOS padding.
    "rollout_experts" ([rows, length, layers, k], recorded routing) is padded with -1: none recorded."""
    if online is None:
        return offline
    P = max(online["prompt_length"], offline["prompt_length"])
    T = max(online["targets"].shape[1], offline["targets"].shape[1])

    def widen(batch, tensor, fill):
        left = P - batch["prompt_length"]
        out = tensor.new_full((tensor.shape[0], P + T, *tensor.shape[2:]), fill)
        out[:, left: left + tensor.shape[1]] = tensor
        return out

    merged = {key: torch.cat([widen(online, online[key], fill), widen(offline, offline[key], fill)])
              for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("valid", False))}
    attention = merged["attention_mask"]
    attention[:, P:] = 1
    merged.update(
        position_ids=(attention.cumsum(dim=1) - 1).clamp(min=0), targets=merged["input_ids"][:, P:],
        mask=merged["valid"][:, P:].clone(), prompt_length=P, texts=online["texts"] + offline["texts"],
    )
    if "rollout_experts" in online:
        experts = online["rollout_experts"]
        none = experts.new_full((*offline["input_ids"].shape, *experts.shape[2:]), -1)
        merged["rollout_experts"] = torch.cat([widen(online, experts, -1), widen(offline, none, -1)])
    return merged


def fresh_groups(step, prompts, batch, rewards, old_logp, group_size, tokenizer) -> list[Group]:
    """This step's online rows as groups (for the replay buffer and samples.jsonl)."""
    groups = []
    for index, prompt in enumerate(prompts):
        rows = range(index * group_size, (index + 1) * group_size)
        completions = [batch["targets"][r][batch["mask"][r]].tolist() for r in rows]
        logprobs = [old_logp[r][batch["mask"][r]].tolist() for r in rows]
        groups.append(Group(prompt, f"step {step}", _encode(tokenizer, prompt), completions,
                            [batch["texts"][r] for r in rows], [rewards[r].item() for r in rows], logprobs))
    return groups


def save(path: str, step: int, groups: list[Group]) -> None:
    """Append the groups' samples to `path`, one JSON line each."""
    lines = [json.dumps({"step": step, "prompt": g.prompt, "completion": text, "completion_ids": ids,
                         "reward": reward, "logprobs": logprobs})
             for g in groups for text, ids, reward, logprobs in zip(g.texts, g.completions, g.rewards, g.logprobs)]
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)


def truncate(path: str, last_step: int) -> None:
    """Keep the lines of steps <= last_step (a resumed run rewrites the steps after its checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
