"""memory="flat": the hidden path without a V x H fp32 accumulator (d hidden token-major, in the forward where
the gradient is formed there; d weight vocabulary-major) gives the default mode's results, against float64,
on both paths."""

import pytest
import torch

import softpo
from softpo import chunked, fused, tiles

from reference import assert_close_to_gt, assert_norm_close_to_gt, loss_kwargs, random_lm_head_inputs

pytestmark = pytest.mark.usefixtures("poison_empty")

B, T, H, V = 3, 7, 24, 203


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Several vocabulary blocks and token tiles, ragged at the end, on both paths.
    monkeypatch.setattr(chunked, "VOCAB_CHUNK", 64)
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(tiles, "FLAT_TILE_BYTES", 8 * V * 4)
    monkeypatch.setattr(tiles, "FLAT_BLOCK_BYTES", 50 * H * 4)


def _inputs(seed=0):
    hidden, weight, targets = random_lm_head_inputs(B, T, H, V, seed=seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    return hidden, weight, targets, mask


def _run(config, impl, dtype, memory, hidden, weight, targets, mask):
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    kwargs = loss_kwargs(config, torch.zeros(B, T, dtype=torch.float64) - 5, uses_rollout=False)
    out = softpo.policy_loss(config, targets, mask, hidden=h, weight=w, temperature=0.8, impl=impl, memory=memory,
                             **kwargs)
    out.loss.backward()
    return out.loss.detach(), out.logp, h.grad, w.grad


CONFIGS = [
    pytest.param(softpo.SAPO.replace(entropy_coef=0.02), id="sapo-entropy"),
    pytest.param(softpo.GRPO.replace(beta=0.05), id="grpo-kl"),
    pytest.param(softpo.GSPO, id="gspo"),
    pytest.param(softpo.SPO, id="spo"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                        ("triton", torch.float32), ("triton", torch.bfloat16)],
                         ids=["torch-fp32", "torch-bf16", "triton-fp32", "triton-bf16"])
def test_flat_matches_float64_as_default_does(config, impl, dtype):
    inputs = _inputs()
    gt = _run(config, "torch", torch.float64, "default", *inputs)
    default = _run(config, impl, dtype, "default", *inputs)
    flat = _run(config, impl, dtype, "flat", *inputs)
    for i, what in enumerate(("loss", "logp", "d hidden")):
        assert_close_to_gt(flat[i], default[i], gt[i], dtype, what)
    # d weight in half precision: element by element either rounding may fall on the other side.
    check = assert_close_to_gt if dtype == torch.float32 else assert_norm_close_to_gt
    check(flat[3], default[3], gt[3], dtype, "d weight")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_flat_token_logprobs_with_entropy(impl):
    hidden, weight, targets, _ = _inputs(1)
    g = torch.Generator().manual_seed(5)
    g_logp, g_entropy = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    grads = []
    for memory in ("default", "flat"):
        h, w = hidden.float().clone().requires_grad_(), weight.float().clone().requires_grad_()
        logp, entropy = softpo.token_logprobs(targets, hidden=h, weight=w, return_entropy=True, impl=impl,
                                              memory=memory)
        ((logp * g_logp) + entropy * g_entropy).sum().backward()
        grads.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("config", [softpo.SAPO, softpo.GSPO], ids=["token-level", "sequence-level"])
def test_flat_forms_d_hidden_in_the_forward_and_d_weight_in_the_backward(monkeypatch, config):
    """The gradient-in-forward routes under flat: d hidden tile by tile in the forward, no V x H fp32 accumulator,
    d weight from the backward's vocabulary-major pass with the upstream gradient folded into the per-token
    gradients (so a factor of 2 doubles every gradient exactly)."""
    routes, accumulators, passes = [], [], []
    real_apply = fused.HiddenGradientInForwardFunction.apply
    real_buffers, real_flat = tiles._gradient_buffers, tiles._hidden_backward_flat
    monkeypatch.setattr(fused.HiddenGradientInForwardFunction, "apply",
                        staticmethod(lambda *a: routes.append(1) or real_apply(*a)))
    # _gradient_buffers(hidden, weight, need_hidden, need_weight, rows): need_weight allocates the accumulator.
    monkeypatch.setattr(tiles, "_gradient_buffers", lambda *a: accumulators.append(a[3]) or real_buffers(*a))
    monkeypatch.setattr(tiles, "_hidden_backward_flat",
                        lambda *a: passes.append(a[-2:]) or real_flat(*a))
    hidden, weight, targets, mask = _inputs(2)
    _run(config, "triton", torch.float32, "default", hidden, weight, targets, mask)
    assert (routes, accumulators, passes) == ([1], [True], [])
    loss, _, d_hidden, d_weight = _run(config, "triton", torch.float32, "flat", hidden, weight, targets, mask)
    assert (routes, accumulators, passes) == ([1, 1], [True, False], [(False, True)])
    h, w = hidden.float().clone().requires_grad_(), weight.float().clone().requires_grad_()
    kwargs = loss_kwargs(config, torch.zeros(B, T, dtype=torch.float64) - 5, uses_rollout=False)
    out = softpo.policy_loss(config, targets, mask, hidden=h, weight=w, temperature=0.8, impl="triton",
                             memory="flat", **kwargs)
    (2 * out.loss).backward()
    assert torch.equal(h.grad, 2 * d_hidden) and torch.equal(w.grad, 2 * d_weight)


def test_bad_memory_mode():
    hidden, weight, targets, mask = _inputs()
    with pytest.raises(ValueError, match="memory must be one of"):
        softpo.token_logprobs(targets, hidden=hidden, weight=weight, memory="low")
    with pytest.raises(ValueError, match="memory must be one of"):
        softpo.PolicyLoss(softpo.SAPO, memory="tiny")
