"""The RL loop (`softpo train`): rewards, advantages, sampling/scoring agreement, run directory, resume,
presets, bad arguments and data parallel. Tiny runs only: the default job (about a minute) is not a test."""

import json
import os
import shutil

import pytest
import torch

import softpo
from softpo import train
from softpo.train import checkpoint, collectives, flags, loop, policy, tasks

# A model and batch small enough that one step takes a fraction of a second on one core.
TINY = ["--hidden-size", "32", "--layers", "1", "--experts", "4", "--prompts-per-step", "4", "--group-size", "4",
        "--no-progress", "--threads", "1"]
TIMING_KEYS = {"tokens_per_s", "peak_mem_mb", "step_time_s"}
METRIC_KEYS = {
    "step", "reward_mean", "reward_std", "completion_length", "loss", "policy_loss", "total_loss", "kl", "entropy",
    "ratio_mean", "ratio_min", "ratio_max", "clip_fraction", "clip_fraction_low", "clip_fraction_high",
    "gate_weight", "log_ratio_seq_var", "q_mean", "routing_drift", "aux_loss", "grad_norm", "expert_load",
    "is_weight_mean", "replay_logp_gap", "offline_fraction", "offline_reward_mean", "generated_tokens",
    "generated_tokens_cumulative", "sampler_logp_gap",
} | TIMING_KEYS


@pytest.fixture(autouse=True)
def _restore_threads():
    # main() pins the thread count for speed; other test files should not inherit that.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_count_reward_partial_credit():
    prompts = ["7", "456", "8901", "3", "3", "3", "3", "3", "3"]
    completions = ["8901", "7890", "2345", "45", "456789", "x567", "", "4667", "5678"]
    # Mean of the answer credit (matching positions) and the counting credit (steps of +1), each over
    # max(4, len): "x567" matches 3 positions and counts up twice (x breaks the chain), "5678" counts
    # up 3 times from the wrong start and matches nothing.
    expected = [1.0, 1.0, 1.0, 0.5, 4 / 6, (3 / 4 + 2 / 4) / 2, 0.0, (3 / 4 + 2 / 4) / 2, (0 + 3 / 4) / 2]
    assert tasks.count_reward(prompts, completions) == pytest.approx(expected, abs=1e-12)


def test_count_prompts_are_counting_runs():
    import random

    rng = random.Random(0)
    for _ in range(200):
        prompt = tasks.count_prompt(rng)
        assert 1 <= len(prompt) <= 4
        assert all((int(b) - int(a)) % 10 == 1 for a, b in zip(prompt, prompt[1:]))
        assert tasks.count_reward([prompt], [tasks.count_answer(prompt)]) == [1.0]


def test_count_reward_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        tasks.count_reward(["1"], ["2", "3"])


def test_load_reward():
    assert tasks.load_reward("softpo.train.tasks:count_reward") is tasks.count_reward
    for spec, match in (("no_colon", "module:function"), ("softpo.no_such_module:f", "cannot import"),
                        ("softpo.train.tasks:no_such_function", "no function")):
        with pytest.raises(ValueError, match=match):
            tasks.load_reward(spec)


@pytest.mark.parametrize("scale", [True, False], ids=["std-scaled", "mean-only"])
def test_group_advantages(scale):
    rewards = torch.tensor([[0.0, 0.5, 1.0, 0.5], [0.2, 0.2, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0]])
    gt = rewards.double() - rewards.double().mean(1, keepdim=True)
    if scale:
        gt = gt / (rewards.double().std(1, keepdim=True) + 1e-4)
    out = loop.group_advantages(rewards, scale)
    torch.testing.assert_close(out.double(), gt, rtol=1e-6, atol=1e-6)
    # A group whose samples all score the same carries no signal, and no NaN.
    assert torch.equal(out[1], torch.zeros(4))


def test_group_advantages_single_sample():
    assert torch.equal(loop.group_advantages(torch.tensor([[0.3], [0.9]]), True), torch.zeros(2, 1))


def test_scored_logprobs_equal_sampling_distribution():
    """The training forward (left-padded prompts, position ids, temperature) scores completions under the
    very distribution `generate` sampled them from."""
    from transformers import GenerationConfig

    torch.set_num_threads(1)
    args = flags.parse_args(["--temperature", "0.7", "--vocab-size", "300", *TINY])
    args.max_new_tokens = 5
    tokenizer = policy.build_tokenizer(args)
    model = policy.build_model(args, tokenizer, torch.device("cpu"))
    prompts = ["7", "456", "1234"]
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=5,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              output_scores=True, return_dict_in_generate=True)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(1)
    sampled = model.generate(input_ids=encoded.input_ids.repeat_interleave(4, 0),
                             attention_mask=encoded.attention_mask.repeat_interleave(4, 0), generation_config=config)
    torch.manual_seed(1)
    args.group_size = 4
    batch = policy.rollout(model, tokenizer, prompts, args, torch.device("cpu"))
    assert torch.equal(batch["targets"], sampled.sequences[:, encoded.input_ids.shape[1]:])
    scores = torch.stack(sampled.scores, 1).double()
    gt = torch.log_softmax(scores, -1).gather(-1, batch["targets"][..., None]).squeeze(-1)
    hidden, router = policy.forward(model, batch, slice(None), moe=True)
    out = softpo.token_logprobs(batch["targets"], hidden=hidden, weight=model.lm_head.weight, temperature=0.7)
    mask = batch["mask"]
    assert (out.double() - gt)[mask].abs().max() <= 1e-5
    assert len(router) == 1 and router[0].shape == (*batch["input_ids"].shape, 4)


def test_run_writes_every_metric_key(tmp_path):
    run = tmp_path / "run"
    assert train.main([*TINY, "--steps", "3", "--save-every", "2", "--out", str(run)]) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == METRIC_KEYS
        for key in ("reward_mean", "loss", "entropy", "ratio_mean", "gate_weight", "routing_drift", "aux_loss",
                    "tokens_per_s", "peak_mem_mb"):
            assert isinstance(row[key], float) and torch.isfinite(torch.tensor(row[key])), key
        assert 0 <= row["routing_drift"] <= 1
        load = torch.tensor(row["expert_load"])
        assert load.shape == (1, 4)
        torch.testing.assert_close(load.sum(-1), torch.ones(1))
    config = json.loads((run / "config.json").read_text())
    assert config["loss_config"]["name"] == "sapo" and config["args"]["steps"] == 3
    assert (run / "metrics.png").stat().st_size > 0
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3


def test_resume_equals_uninterrupted_run(tmp_path):
    common = [*TINY, "--loss", "grpo", "--beta", "0.05", "--save-every", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train.main([*common, "--steps", "4", "--out", str(whole)]) == 0
    assert train.main([*common, "--steps", "2", "--out", str(split)]) == 0
    assert train.main(["--resume", str(split), "--steps", "4"]) == 0
    expected, got = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert {k: a[k] for k in a.keys() - TIMING_KEYS} == {k: b[k] for k in b.keys() - TIMING_KEYS}
    final_whole = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    final_split = torch.load(split / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(final_whole[k], final_split[k]) for k in final_whole)


@pytest.mark.parametrize("loss", flags.LOSSES)
def test_each_preset_one_step(tmp_path, loss):
    run = tmp_path / loss
    assert train.main([*TINY, "--loss", loss, "--steps", "1", "--out", str(run)]) == 0
    (row,) = read_metrics(run)
    assert torch.isfinite(torch.tensor(row["loss"]))
    config = json.loads((run / "config.json").read_text())["loss_config"]
    assert config["name"] == loss
    if loss == "spo":
        assert row["q_mean"] is not None and row["kl"] is not None
    if loss == "dr_grpo":
        assert json.loads((run / "config.json").read_text())["scale_rewards"] is False


def test_loss_overrides_reach_the_config(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--loss", "dapo", "--beta", "0.02", "--epsilon-high", "0.3", "--set", "kl_estimator=\"k1\"",
            "--set", "delta=3", "--steps", "1", "--out", str(run)]
    assert train.main(argv) == 0
    config = json.loads((run / "config.json").read_text())["loss_config"]
    assert (config["beta"], config["epsilon_high"], config["kl_estimator"], config["delta"]) == (0.02, 0.3, "k1", 3)
    assert read_metrics(run)[0]["kl"] is not None


@pytest.mark.parametrize("argv, message", [
    (["--loss", "ppo"], "name must be one of"),
    (["--model", "/no/such/dir"], "not found"),
    (["--group-size", "0"], "--group-size must be > 0"),
    (["--set", "no_such_field=1"], "unknown LossConfig field"),
    (["--reward", "nowhere"], "module:function"),
    (["--steps", "ten"], "invalid int value"),
    (["--resume", "/no/such/run"], "config.json not found"),
    (["--set", "top_entropy_quantile=1.5"], "top_entropy_quantile"),
], ids=["unknown-preset", "missing-dir", "zero-group", "unknown-field", "bad-reward", "not-an-int", "missing-run",
        "bad-quantile"])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, message):
    assert train.main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _ddp_worker(rank, world, port, argv, dump_dir):
    # Gloo on the loopback interface: the hostname may resolve to another one.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    original = checkpoint.save_checkpoint

    def save_and_dump(run_dir, step, model, *rest, **options):
        torch.save(model.state_dict(), os.path.join(dump_dir, f"rank{rank}.pt"))
        return original(run_dir, step, model, *rest, **options)

    checkpoint.save_checkpoint = save_and_dump
    if train.main(argv) != 0:
        raise SystemExit(1)


def _spawn_two_ranks(argv, dump_dir, timeout_s=600):
    from distributed import free_port, spawn_with_deadline

    spawn_with_deadline(_ddp_worker, 2, lambda: (2, free_port(), argv, dump_dir), timeout_s,
                        before_retry=lambda: shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True))


def test_data_parallel_two_processes_stay_identical(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--loss", "dapo", "--steps", "2", "--out", str(run)]
    _spawn_two_ranks(argv, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    torch.manual_seed(0)
    args = flags.parse_args(TINY)
    initial = policy.build_model(args, policy.build_tokenizer(args), torch.device("cpu")).state_dict()
    assert any(not torch.equal(initial[k], rank0[k]) for k in initial)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    # Each rank sampled 2 of the 4 prompts; the logged reward covers all 4 x 4 samples.
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


def reward_failing_on_rank_1(prompts, texts):
    """A --reward function whose own bug shows on one rank only."""
    if os.environ.get("RANK") == "1":
        raise KeyError("a sample this rank's reward code did not expect")
    return [0.5] * len(texts)


def _failing_reward_worker(rank, world, port, argv, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    try:
        train.main(argv)
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w", encoding="utf-8") as handle:
        handle.write(message)


def test_a_reward_failing_on_one_rank_stops_every_rank(tmp_path):
    """Every rank raises, naming rank 1 and its error, instead of rank 0 waiting in the gradient all-reduce
    until the group's timeout (the deadline would fail this test)."""
    from distributed import free_port, spawn_with_deadline

    argv = [*TINY, "--steps", "1", "--reward", "test_train:reward_failing_on_rank_1", "--out", str(tmp_path / "run")]
    spawn_with_deadline(_failing_reward_worker, 2, lambda: (2, free_port(), argv, str(tmp_path)), 300)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "the reward function failed on rank 1: KeyError" in message, (rank, message)


def test_local_dense_model_directory(tmp_path):
    """--model DIR: any local causal LM with its own tokenizer; a dense model has no router metrics."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tasks.make_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model_dir = tmp_path / "dense"
    Qwen3ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = tmp_path / "run"
    assert train.main(["--model", str(model_dir), *TINY, "--steps", "2", "--out", str(run)]) == 0
    rows = read_metrics(run)
    assert len(rows) == 2 and all(set(r) == METRIC_KEYS for r in rows)
    assert all(r["routing_drift"] is None and r["aux_loss"] is None and r["expert_load"] is None for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_adaptive_entropy_moves_the_coefficient_and_resumes_exactly(tmp_path):
    """--set use_adaptive_entropy: the loop owns the controller, moves it once per optimizer step, and
    its checkpoint carries it: a resumed run equals the uninterrupted one."""
    common = [*TINY, "--loss", "dapo", "--save-every", "2", "--minibatches", "2",
              "--set", "use_adaptive_entropy=true", "--set", "entropy_coef=0.01", "--set", "entropy_target=5.0",
              "--set", "entropy_coef_delta=0.002"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train.main([*common, "--steps", "4", "--out", str(whole)]) == 0
    assert train.main([*common, "--steps", "2", "--out", str(split)]) == 0
    saved = torch.load(split / "checkpoint.pt", weights_only=False)["entropy_control"]
    # 2 steps x 2 minibatches = 4 optimizer steps, each with entropy (a few nats) under the target of 5: up 4 times.
    assert saved["coef"] == pytest.approx(0.01 + 4 * 0.002) and 0 < saved["last_entropy"] < 5
    assert train.main(["--resume", str(split), "--steps", "4"]) == 0
    expected, got = read_metrics(whole), read_metrics(split)
    assert len(expected) == len(got) == 4
    for a, b in zip(expected, got):
        assert {k: a[k] for k in a.keys() - TIMING_KEYS} == {k: b[k] for k in b.keys() - TIMING_KEYS}
    final = torch.load(whole / "checkpoint.pt", weights_only=False)["entropy_control"]
    assert final["coef"] == pytest.approx(0.01 + 8 * 0.002)


def _gather_varying_worker(rank, world, out_dir):
    """gather_varying: every rank's entropies, different lengths, in rank order."""
    local = torch.arange(3 + 2 * rank, dtype=torch.float32) + 10 * rank
    torch.save(collectives.gather_varying(local, world), os.path.join(out_dir, f"rank{rank}.pt"))


def test_gather_varying_concatenates_every_rank(tmp_path):
    from distributed import run_group

    run_group(_gather_varying_worker, 2, str(tmp_path), timeout_s=120)
    expected = torch.cat([torch.arange(3.0), torch.arange(5.0) + 10])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def test_top_entropy_quantile_in_the_loop(tmp_path):
    run = tmp_path / "top"
    assert train.main([*TINY, "--loss", "dapo", "--steps", "1", "--set", "top_entropy_quantile=0.5",
                       "--out", str(run)]) == 0
    (row,) = read_metrics(run)
    assert torch.isfinite(torch.tensor(row["loss"]))
