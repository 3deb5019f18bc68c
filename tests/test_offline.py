"""Off-policy data in `softpo train`: saved samples, offline files, the replay buffer, the mixed batch, the
refusal of ratio objectives without behaviour log-probs, and every bad-file case."""

import json
import math
import random

import pytest
import torch

import softpo
from softpo import train
from softpo.train import flags, loop, policy, samples, tasks

# The tiny model of test_train, and its fixture that restores the thread count main() pins.
from test_train import TINY, _restore_threads  # noqa: E402, F401


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def unscored(groups):
    for group in groups:
        group.advantages, group.q0 = [0.0] * len(group.rewards), 0.0


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Three steps of a tiny run with --save-samples: the offline data of the tests below."""
    run = tmp_path_factory.mktemp("saved") / "run"
    assert train.main([*TINY, "--steps", "3", "--save-samples", "--out", str(run)]) == 0
    return run


def test_saved_samples_hold_what_the_run_sampled(saved_run):
    lines = read_jsonl(saved_run / "samples.jsonl")
    assert len(lines) == 3 * 4 * 4 and [r["step"] for r in lines] == [s for s in (1, 2, 3) for _ in range(16)]
    tokenizer = tasks.make_tokenizer()
    for record in lines:
        assert set(record) == {"step", "prompt", "completion", "completion_ids", "reward", "logprobs"}
        ids = record["completion_ids"]
        assert len(record["logprobs"]) == len(ids) >= 1 and all(v <= 0 for v in record["logprobs"])
        # Tokens up to and including the first EOS (or the length cap), and the text they decode to.
        assert tokenizer.eos_token_id not in ids[:-1] and len(ids) <= tasks.TASKS["count"].max_new_tokens
        assert tokenizer.decode(ids, skip_special_tokens=True) == record["completion"]
        # Stored as the trainer used it: float32.
        expected = tasks.count_reward([record["prompt"]], [record["completion"]])[0]
        assert record["reward"] == pytest.approx(expected, rel=1e-6)
    rows = read_jsonl(saved_run / "metrics.jsonl")
    # Each step's generated tokens are its saved completions' tokens.
    for row in rows:
        saved = sum(len(r["completion_ids"]) for r in lines if r["step"] == row["step"])
        assert row["generated_tokens"] == saved and row["offline_fraction"] == 0
    assert rows[-1]["generated_tokens_cumulative"] == sum(len(r["completion_ids"]) for r in lines)


def test_saved_logprobs_are_the_sampling_distribution(saved_run):
    """The logprobs column scores each saved completion under the weights that sampled it: re-scoring the
    first step's samples with the initial model (same seed) gives them back."""
    args = flags.parse_args(TINY)
    tokenizer = policy.build_tokenizer(args)
    model = policy.build_model(args, tokenizer, torch.device("cpu"))
    groups = samples.load([str(saved_run / "samples.jsonl")], tokenizer, model.config.vocab_size, "grpo")
    unscored(groups)
    # A group's `where` is its first line; step 1's samples are lines 1 to 16.
    first = [g for g in groups if int(g.where.rsplit(":", 1)[1]) <= 16]
    drawn = [(g, list(range(len(g.rewards)))) for g in first]
    batch, stored = samples.offline_batch(drawn, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        hidden, _ = policy.forward(model, batch, slice(None), moe=True)
        logp = softpo.token_logprobs(batch["targets"], hidden=hidden, weight=model.lm_head.weight)
    mask = batch["mask"]
    assert mask.sum() > 0
    assert (logp - stored["behaviour_logp"])[mask].abs().max() <= 1e-5


def test_offline_rows_score_as_they_would_alone(saved_run):
    """Merging offline rows into an online batch (more left padding, more right padding) leaves every row's
    log-probs unchanged: padding and position ids are right."""
    args = flags.parse_args(TINY)
    tokenizer = policy.build_tokenizer(args)
    model = policy.build_model(args, tokenizer, torch.device("cpu"))
    groups = samples.load([str(saved_run / "samples.jsonl")], tokenizer, model.config.vocab_size, None)
    unscored(groups)
    offline, _ = samples.offline_batch([(groups[0], [0, 1]), (groups[-1], [2, 3])], tokenizer.pad_token_id, "cpu")
    args.group_size, args.max_new_tokens = 2, 3
    online = policy.rollout(model, tokenizer, ["7", "12345678"], args, torch.device("cpu"))
    merged = samples.concat(online, offline, tokenizer.pad_token_id)
    assert merged["prompt_length"] == 8 and merged["targets"].shape[0] == 8

    def score(batch):
        with torch.no_grad():
            hidden, _ = policy.forward(model, batch, slice(None), moe=True)
            return softpo.token_logprobs(batch["targets"], hidden=hidden, weight=model.lm_head.weight)

    alone = [score(online), score(offline)]
    both = score(merged)
    for part, rows in zip(alone, (slice(0, 4), slice(4, 8))):
        width = part.shape[1]
        assert torch.equal(merged["mask"][rows, :width], (online if rows.start == 0 else offline)["mask"])
        assert not merged["mask"][rows, width:].any()
        mask = merged["mask"][rows, :width]
        assert (both[rows, :width] - part)[mask].abs().max() <= 1e-5
    assert merged["texts"] == online["texts"] + offline["texts"]


def test_offline_advantages_come_from_their_own_group():
    tokenizer = tasks.make_tokenizer()
    rewards = [0.1, 0.9, 0.5, 0.3, 0.7]
    group = samples.Group("12", "f:1", [4, 5], [[6, 1]] * 5, ["4"] * 5, rewards, [None] * 5)
    seen = {}

    def score(g):
        seen["scored"] = True
        r = torch.tensor([g.rewards])
        g.advantages = loop.group_advantages(r, True)[0].tolist()
        g.q0 = softpo.spo_q0(r, 0.1).item()

    pool = samples.Pool([group], 0, score)
    assert seen["scored"] and len(pool) == 1
    # Drawn G = 3 of the group's 5: advantages and q0 stay those of all 5 stored rewards.
    drawn = pool.draw(1, 3, random.Random(0))
    (_, picks), = drawn
    _, stored = samples.offline_batch(drawn, tokenizer.pad_token_id, "cpu")
    r = torch.tensor(rewards, dtype=torch.float64)
    gt = (r - r.mean()) / (r.std() + 1e-4)
    torch.testing.assert_close(stored["advantages"].double(), gt[picks], rtol=1e-5, atol=1e-5)
    q0 = 0.1 * (torch.logsumexp(r / 0.1, 0) - math.log(5))
    torch.testing.assert_close(stored["q0"].double(), q0.expand(3), rtol=1e-5, atol=1e-5)
    assert stored["behaviour_logp"] is None
    # A group smaller than G gives its samples in turn.
    assert pool.draw(1, 12, random.Random(0))[0][1] == [i % 5 for i in range(12)]


def test_spo_half_online_learns_from_saved_samples(saved_run, tmp_path):
    """SPO on half offline samples (saved by an earlier run) and half fresh ones: the policy moves toward the
    saved completions that scored above their group and away from those below, while generating completions
    for half the prompts. (Its reward on the built-in task climbs too slowly for a test; see the comparison.)"""
    run = tmp_path / "half"
    saved = str(saved_run / "samples.jsonl")
    assert train.main([*TINY, "--loss", "spo", "--steps", "8", "--lr", "1e-2", "--offline", saved,
                       "--offline-fraction", "0.5", "--out", str(run)]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["offline_fraction"] == 0.5 for r in rows)
    # Half the prompts are sampled: generated tokens are those of 2 prompts x 4 samples a step.
    assert all(r["generated_tokens"] == r["completion_length"] * 8 for r in rows)
    assert rows[-1]["generated_tokens_cumulative"] == sum(r["generated_tokens"] for r in rows)

    args = flags.parse_args(TINY)
    tokenizer = policy.build_tokenizer(args)
    model = policy.build_model(args, tokenizer, torch.device("cpu"))  # the run's initial weights (same seed)
    groups = samples.load([saved], tokenizer, model.config.vocab_size, None)
    unscored(groups)
    drawn = [(g, list(range(len(g.rewards)))) for g in groups]
    batch, stored = samples.offline_batch(drawn, tokenizer.pad_token_id, torch.device("cpu"))

    def sequence_logp():
        with torch.no_grad():
            hidden, _ = policy.forward(model, batch, slice(None), moe=True)
            logp = softpo.token_logprobs(batch["targets"], hidden=hidden, weight=model.lm_head.weight)
        return (logp * batch["mask"]).sum(-1)

    before = sequence_logp()
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["model"])
    shift = sequence_logp() - before
    above, below = [], []
    offset = 0
    for group in groups:
        rewards = torch.tensor(group.rewards)
        part = shift[offset: offset + len(rewards)]
        above += part[rewards > rewards.mean()].tolist()
        below += part[rewards < rewards.mean()].tolist()
        offset += len(rewards)
    assert len(above) >= 5 and len(below) >= 5
    assert sum(above) / len(above) > sum(below) / len(below) + 0.1, (above, below)


def test_ratio_objective_uses_stored_logprobs(saved_run, tmp_path):
    run = tmp_path / "grpo"
    assert train.main([*TINY, "--loss", "grpo", "--steps", "2", "--offline", str(saved_run / "samples.jsonl"),
                       "--out", str(run)]) == 0
    for row in read_jsonl(run / "metrics.jsonl"):
        # The sampler-mismatch weight is on: stored log-probs of other weights make it differ from 1.
        assert row["is_weight_mean"] is not None and row["is_weight_mean"] != 1.0
        assert row["offline_fraction"] == 0.5 and row["offline_reward_mean"] is not None


def test_replay_buffer_reuses_own_samples(tmp_path):
    run = tmp_path / "replay"
    assert train.main([*TINY, "--loss", "gspo", "--steps", "3", "--replay", "2", "--out", str(run)]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    # Step 1 has nothing to replay yet; from step 2 on half the groups are the run's own earlier ones.
    assert [r["offline_fraction"] for r in rows] == [0.0, 0.5, 0.5]
    assert all(r["offline_reward_mean"] is not None for r in rows[1:])


def test_resume_with_replay_equals_uninterrupted_run(tmp_path):
    """The replay buffer is in the checkpoint: a run resumed at step 2 replays what the whole run replays."""
    common = [*TINY, "--loss", "gspo", "--replay", "2", "--save-every", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train.main([*common, "--steps", "4", "--out", str(whole)]) == 0
    assert train.main([*common, "--steps", "2", "--out", str(split)]) == 0
    saved = torch.load(split / "checkpoint.pt", weights_only=False)["replay"]
    # The groups this rank generated: all 4 at step 1; at step 2, 2 (the other 2 were replayed).
    assert [len(step) for step in saved[0]] == [4, 2]
    assert train.main(["--resume", str(split), "--steps", "4"]) == 0
    timing = {"tokens_per_s", "peak_mem_mb", "step_time_s"}
    expected, got = read_jsonl(whole / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert {k: a[k] for k in a.keys() - timing} == {k: b[k] for k in b.keys() - timing}, a["step"]


def test_fully_offline_spo(saved_run, tmp_path):
    run = tmp_path / "offline"
    assert train.main([*TINY, "--loss", "spo", "--steps", "2", "--offline", str(saved_run / "samples.jsonl"),
                       "--offline-fraction", "1", "--out", str(run)]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["offline_fraction"] == 1 and r["generated_tokens"] == 0 and r["reward_mean"] is None for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_ratio_objective_refuses_samples_without_logprobs(tmp_path, capsys):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "12", "completion": "3456", "reward": 1.0},
                                                 {"prompt": "12", "completion": "3", "reward": 0.2}])
    run = tmp_path / "run"
    assert train.main([*TINY, "--loss", "grpo", "--steps", "1", "--offline", path, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"softpo train: error: {path}:1: no logprobs") and err.count("\n") == 1
    assert "--loss spo" in err and not run.exists()
    # SPO needs no behaviour log-probs: the same file trains.
    assert train.main([*TINY, "--loss", "spo", "--steps", "1", "--offline", path, "--out", str(run)]) == 0


GOOD = {"prompt": "12", "completion": "3456", "reward": 1.0}
BAD_FILES = [
    ("malformed-json", ['{"prompt": "12", "completion": "3"', ], 1, "malformed JSON"),
    ("not-an-object", ['[1, 2]'], 1, "expected a JSON object"),
    ("missing-reward", [{"prompt": "12", "completion": "3"}], 1, "missing key(s) ['reward']"),
    ("missing-prompt", [GOOD, {"completion": "3", "reward": 0.0}], 2, "missing key(s) ['prompt']"),
    ("id-outside-vocab", [{**GOOD, "completion_ids": [5, 999]}], 1, "outside the vocabulary"),
    ("negative-id", [{**GOOD, "completion_ids": [-1]}], 1, "outside the vocabulary"),
    ("unencodable-prompt", [GOOD, GOOD, {**GOOD, "prompt": "abc"}], 3, "cannot encode prompt 'abc'"),
    ("nan-reward", ['{"prompt": "12", "completion": "3", "reward": NaN}'], 1, "reward must be a finite number"),
    ("inf-reward", ['{"prompt": "12", "completion": "3", "reward": Infinity}'], 1, "reward must be a finite"),
    ("string-reward", [{**GOOD, "reward": "high"}], 1, "reward must be a finite number"),
    ("logprobs-length", [{**GOOD, "completion_ids": [5, 1], "logprobs": [-0.1]}], 1, "one value per completion id"),
    ("logprobs-without-ids", [{**GOOD, "logprobs": [-0.1]}], 1, "logprobs need completion_ids"),
]


@pytest.mark.parametrize("records, line, message", [case[1:] for case in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_offline_file_one_line_exit_2(tmp_path, capsys, records, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", records)
    run = tmp_path / "run"
    assert train.main([*TINY, "--loss", "spo", "--steps", "1", "--offline", path, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"softpo train: error: {path}:{line}: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not run.exists()


@pytest.mark.parametrize("argv, message", [
    (["--offline-fraction", "0.5"], "needs data"),
    (["--offline-fraction", "1.5", "--replay", "2"], "must lie in [0, 1]"),
    (["--replay", "-1"], "--replay must be >= 0"),
    (["--offline", "/no/such.jsonl"], "not found"),
    (["--offline-fraction", "1", "--replay", "2"], "would never generate"),
], ids=["fraction-without-data", "fraction-above-1", "negative-replay", "missing-file", "replay-only-offline"])
def test_bad_offline_arguments(tmp_path, capsys, argv, message):
    assert train.main([*TINY, *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_data_parallel_offline_and_saved_samples(saved_run, tmp_path):
    """Two gloo ranks: each draws its own offline groups, the logged rewards and generated tokens cover both
    ranks, and rank 0 writes both ranks' fresh samples."""
    from test_train import _spawn_two_ranks

    run = tmp_path / "run"
    argv = [*TINY, "--loss", "grpo", "--steps", "2", "--offline", str(saved_run / "samples.jsonl"),
            "--save-samples", "--out", str(run)]
    _spawn_two_ranks(argv, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    rows = read_jsonl(run / "metrics.jsonl")
    saved = read_jsonl(run / "samples.jsonl")
    # 4 prompts over 2 ranks, half of each rank's share offline: 2 fresh prompts x 4 samples a step.
    assert [r["offline_fraction"] for r in rows] == [0.5, 0.5]
    assert len(saved) == 2 * 2 * 4
    for row in rows:
        assert row["generated_tokens"] == sum(len(r["completion_ids"]) for r in saved if r["step"] == row["step"])


@pytest.mark.parametrize("mode", ["old", "rollout"])
def test_routing_replay_with_offline_rows(saved_run, tmp_path, mode):
    """Offline rows have no rollout routing: under R3 they route live in the old forward and are replayed from
    it, so the training forwards drift nowhere."""
    run = tmp_path / mode
    assert train.main([*TINY, "--loss", "grpo", "--steps", "2", "--minibatches", "2", "--epochs", "2", "--lr", "2e-2",
                       "--offline", str(saved_run / "samples.jsonl"), "--routing-replay", mode,
                       "--out", str(run)]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["routing_drift"] == 0 and r["replay_logp_gap"] <= 1e-5 for r in rows)


def test_resume_keeps_samples_up_to_the_checkpoint(tmp_path):
    path = write_jsonl(tmp_path / "samples.jsonl", [{**GOOD, "step": s} for s in (1, 1, 2, 3, 3)])
    samples.truncate(path, 2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 1, 2]
    samples.truncate(str(tmp_path / "absent.jsonl"), 2)  # a run that never saved samples
    assert not (tmp_path / "absent.jsonl").exists()


def test_spo_half_online_fine_tuning_gains_reward_on_half_the_sampling(tmp_path):
    """The seed's claim in miniature: SPO fine-tuning a reference that already puts some mass on good answers
    (a 40-step SAPO run of the default model), half of each step's groups taken from that run's saved
    samples, gains reward on the built-in task while generating completions for half the prompts.
    (From a random-init reference SPO's pull toward pi_ref exp(R / beta) is too weak to show in a test.)"""
    warm = tmp_path / "warm"
    quiet = ["--no-progress", "--threads", "1"]
    assert train.main(["--loss", "sapo", "--steps", "40", "--save-samples", "--out", str(warm), *quiet]) == 0
    run = tmp_path / "spo-half"
    assert train.main(["--loss", "spo", "--beta", "0.02", "--init-from", str(warm), "--steps", "60",
                       "--offline", str(warm / "samples.jsonl"), "--offline-fraction", "0.5",
                       "--out", str(run), *quiet]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["offline_fraction"] == 0.5 for r in rows)
    first = sum(r["reward_mean"] for r in rows[:6]) / 6
    last = sum(r["reward_mean"] for r in rows[-6:]) / 6
    assert last - first > 0.1, (first, last)
    # Half the prompts are sampled: 16 of 32 prompts x 8 samples a step.
    assert all(r["generated_tokens"] == pytest.approx(r["completion_length"] * 16 * 8) for r in rows)


def test_init_from_a_missing_run_is_a_usage_error(tmp_path, capsys):
    assert train.main([*TINY, "--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    assert "--init-from: no checkpoint.pt" in capsys.readouterr().err
