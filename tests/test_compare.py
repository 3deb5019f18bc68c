"""`softpo compare`: the --quick set end to end (what CI can afford), and the summary arithmetic."""

import json

import pytest

from softpo.train import compare


def test_quick_comparison_writes_results(tmp_path, capsys):
    out = tmp_path / "compare"
    assert compare.main(["--quick", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    summary = record["summary"]
    assert list(summary) == list(compare.ARMS)
    for arm, s in summary.items():
        assert s["seeds"] == 2 and len(s["runs"]) == 2
        assert 0 <= s["final_reward_min"] <= s["final_reward_mean"] <= s["final_reward_max"] <= 1
        for seed in (0, 1):
            rows = [json.loads(line) for line in (out / "runs" / arm / f"seed{seed}" / "metrics.jsonl").open()]
            assert [r["step"] for r in rows] == [1, 2, 3, 4]
            assert not (out / "runs" / arm / f"seed{seed}" / "checkpoint.pt").exists()
    # R2 pins the routing; the other arms drift in this setting.
    assert summary["grpo_routing_replay"]["routing_drift_mean"] == 0
    assert all(summary[arm]["routing_drift_mean"] > 0 for arm in ("sapo", "gspo", "grpo", "spo"))
    assert summary["sapo"]["gate_statistic"] == "gate_weight" and summary["grpo"]["gate_statistic"] == "clip_fraction"
    # Half-online generates fewer completions: its first step has nothing to replay, the rest half.
    assert summary["spo_half"]["generated_tokens_mean"] < 0.8 * summary["spo"]["generated_tokens_mean"]
    table = (out / "table.md").read_text()
    assert all(f"| {arm} | 2 |" in table for arm in compare.ARMS)
    assert (out / "rewards.png").stat().st_size > 0 and (out / "drift.png").stat().st_size > 0
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves) == 12 and len(curves["sapo/seed0"]["reward_mean"]) == 4
    assert curves["grpo_routing_replay/seed1"]["routing_drift"] == [0, 0, 0, 0]
    assert "12 runs" in capsys.readouterr().out
    # A results folder is never overwritten.
    assert compare.main(["--quick", "--out", str(out)]) == 2


def rows(rewards, **extra):
    return [{"step": i + 1, "reward_mean": r, "grad_norm": 0.5 + i, "routing_drift": 0.1, "gate_weight": None,
             "clip_fraction": 0.2, "ratio_max": 1.5, "generated_tokens_cumulative": 10 * (i + 1), **extra}
            for i, r in enumerate(rewards)]


def test_summary_of_one_run():
    # Ten steps at 0.5 then ten at 0.9: the 10-step average first reaches 0.6 at step 13 (3 x 0.9 + 7 x 0.5).
    run = compare.summarize_run(rows([0.5] * 10 + [0.9] * 10))
    assert run["steps_to_target"] == 13
    assert run["final_reward"] == pytest.approx(0.9)
    assert run["max_grad_norm"] == 19.5 and run["generated_tokens"] == 200
    assert run["gate_statistic"] == "clip_fraction" and run["gate_value"] == pytest.approx(0.2)
    assert compare.summarize_run(rows([0.5] * 20))["steps_to_target"] is None


def test_summary_over_seeds():
    runs = [compare.summarize_run(rows([r] * 10)) for r in (0.2, 0.4, 0.9)]
    arm = compare.summarize_arm(runs)
    assert arm["final_reward_mean"] == pytest.approx(0.5)
    assert arm["final_reward_std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)
    assert (arm["final_reward_min"], arm["final_reward_max"]) == (0.2, 0.9)
    assert arm["seeds_reaching_target"] == 1 and arm["steps_to_target_median"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--arms", "sapo,ppo"], "unknown ['ppo']"),
    (["--seeds", "0"], "--seeds must be > 0"),
], ids=["unknown-arm", "zero-seeds"])
def test_bad_arguments(tmp_path, capsys, argv, message):
    assert compare.main([*argv, "--quick", "--out", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err
