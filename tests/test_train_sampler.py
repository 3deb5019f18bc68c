"""`softpo train` with a truncating sampler (--top-k, --top-p, --min-p): the old and new log-probs are those of
the distribution generate sampled from, which `sampler_logp_gap` (generate's own log-prob of each sampled token
against softpo's old log-prob) measures."""

import inspect

import pytest
import torch

import softpo
from softpo import train
from test_train import TINY, _restore_threads, read_metrics  # noqa: F401

pytestmark = pytest.mark.skipif("top_k" not in inspect.signature(softpo.policy_loss).parameters,
                                reason="softpo.policy_loss has no sampler settings (top_k, top_p, min_p)")
TRUNCATED = ["--top-k", "5", "--top-p", "0.9", "--temperature", "0.8"]


def test_scoring_matches_the_truncated_sampler(tmp_path):
    assert train.main([*TINY, *TRUNCATED, "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    rows = read_metrics(tmp_path / "run")
    for row in rows:
        assert row["sampler_logp_gap"] is not None and row["sampler_logp_gap"] < 1e-4, row["sampler_logp_gap"]
        assert torch.isfinite(torch.tensor([row["loss"], row["entropy"], row["ratio_mean"]])).all()


def test_untruncated_scoring_shows_the_gap(tmp_path):
    argv = [*TINY, *TRUNCATED, "--min-p", "0.05", "--score-untruncated", "--steps", "1", "--out", str(tmp_path / "run")]
    assert train.main(argv) == 0
    assert read_metrics(tmp_path / "run")[0]["sampler_logp_gap"] > 0.01


def test_untruncated_sampling_logs_no_gap(tmp_path):
    assert train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    assert read_metrics(tmp_path / "run")[0]["sampler_logp_gap"] is None


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "-1"], "--top-k"), (["--top-p", "0"], "--top-p"), (["--min-p", "1.5"], "--min-p"),
])
def test_bad_truncation_flags_exit_2(tmp_path, capsys, argv, message):
    assert train.main([*TINY, *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
