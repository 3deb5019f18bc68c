"""Sequence-level objectives on the Triton hidden path with the gradient formed in the forward: tiles of
whole sequences, each tile's per-token gradients from the objective by autograd. Same loss, log-probs and
gradients as the two-pass route, against float64 (the kernels under the interpreter on CPU)."""

import pytest
import torch

import softpo
from softpo import fused, tiles as tile_engine

from reference import TOLERANCE, assert_close_to_gt, loss_kwargs, random_lm_head_inputs

B, T, H, V = 5, 6, 16, 97

CONFIGS = [
    pytest.param(softpo.GSPO, False, id="gspo"),
    # Entropy swept for the metrics only, as softpo train and the TRL drop-in ask: no entropy gradient.
    pytest.param(softpo.GSPO.replace(compute_entropy=True), False, id="gspo-entropy-metric"),
    pytest.param(softpo.GSPO_TOKEN.replace(entropy_coef=0.02), False, id="gspo-token-entropy"),
    pytest.param(softpo.GSPO.replace(beta=0.04, use_bias_correction_kl=True), False, id="gspo-kl"),
    pytest.param(softpo.SPO, False, id="spo"),
    pytest.param(softpo.SPO.replace(entropy_coef=0.01), False, id="spo-entropy"),
    pytest.param(softpo.LUSPO, False, id="luspo"),
    pytest.param(softpo.VESPO, False, id="vespo"),
    pytest.param(softpo.GSPO.replace(off_policy_mask_threshold=0.05), False, id="gspo-offpolicy-mask"),
    pytest.param(softpo.GSPO.replace(vllm_importance_sampling_mode="sequence_truncate",
                                     vllm_importance_sampling_cap=1.5), True, id="gspo-rollout"),
]


def _inputs(seed=0):
    hidden, weight, targets = random_lm_head_inputs(B, T, H, V, seed=seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3] = False  # a fully masked sequence
    return hidden, weight, targets, mask


def _run(config, uses_rollout, impl, dtype):
    hidden, weight, targets, mask = _inputs()
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    kwargs = loss_kwargs(config, torch.zeros(B, T, dtype=torch.float64) - 4.5, uses_rollout, seed=1)
    out = softpo.policy_loss(config, targets, mask, hidden=h, weight=w, temperature=0.8, impl=impl, **kwargs)
    out.loss.backward()
    return out.loss.detach(), out.logp, h.grad, w.grad


@pytest.fixture
def two_sequences_a_tile(monkeypatch):
    # Tiles of 12 rows: two whole sequences of 6 (fewer where masked tokens leave room).
    monkeypatch.setattr(tile_engine, "TILE_BYTES", 12 * V * 4)
    calls = []
    real = fused.HiddenGradientInForwardFunction.apply
    monkeypatch.setattr(fused.HiddenGradientInForwardFunction, "apply",
                        staticmethod(lambda *a: calls.append(a[3]) or real(*a)))
    return calls


@pytest.mark.parametrize("config,uses_rollout", CONFIGS)
def test_sequence_tiles_match_float64(two_sequences_a_tile, config, uses_rollout):
    gt = _run(config, uses_rollout, "torch", torch.float64)
    ref = _run(config, uses_rollout, "torch", torch.float32)
    out = _run(config, uses_rollout, "triton", torch.float32)
    (tiles,) = two_sequences_a_tile
    assert tiles is not None and len(tiles) >= 2, "the sequence-gradient route was not taken"
    assert all(t.numel() <= 12 for t in tiles)
    for i, what in enumerate(("loss", "logp", "d hidden", "d weight")):
        assert_close_to_gt(out[i], ref[i], gt[i], torch.float32, what)


def test_a_sequence_longer_than_a_tile_takes_two_passes(monkeypatch):
    monkeypatch.setattr(tile_engine, "TILE_BYTES", 4 * V * 4)  # 4 rows: shorter than a sequence of 6
    calls = []
    real = fused.HiddenGradientInForwardFunction.apply
    monkeypatch.setattr(fused.HiddenGradientInForwardFunction, "apply",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    gt = _run(softpo.GSPO, False, "torch", torch.float64)
    out = _run(softpo.GSPO, False, "triton", torch.float32)
    assert not calls
    for i in range(4):
        torch.testing.assert_close(out[i].double(), gt[i], rtol=TOLERANCE[torch.float32] * 10, atol=1e-5)


def test_sequence_tiles_hold_whole_sequences():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # A tile of 3 rows: the last sequence (4 valid tokens) fits none.
    assert tile_engine.sequence_tiles(mask.reshape(-1), 4, V=(1 << 30) // 3, element_size=1) is None
    tiles = tile_engine.sequence_tiles(mask.reshape(-1), 4, V=(1 << 30) // 5, element_size=1)
    assert [t.tolist() for t in tiles] == [[0, 1, 2, 4, 5], [12, 13, 14, 15]]
