"""The public API on the chunked torch path, against materialized float64 references."""

import math

import pytest
import torch

import softpo
from softpo import chunked, objectives

from reference import (
    all_configs, assert_close_to_gt, loss_kwargs, random_lm_head_inputs, reference_logprobs, reference_policy_loss,
)

pytestmark = pytest.mark.usefixtures("poison_empty")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def small_chunks(monkeypatch):
    # Chunks smaller than the shapes, so chunk boundaries and ragged last chunks are exercised.
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 5)
    monkeypatch.setattr(chunked, "VOCAB_CHUNK", 64)


def _hidden_inputs(B, T, H, V, dtype, seed=0):
    return random_lm_head_inputs(B, T, H, V, seed=seed, dtype=dtype)


SHAPES = [
    pytest.param(2, 7, 16, 1, id="B2-T7-H16-V1"),  # a single-token vocabulary: logp is exactly 0
    pytest.param(3, 5, 24, 97, id="B3-T5-H24-V97"),  # odd V not a multiple of any chunk
    pytest.param(1, 1, 8, 1000, id="B1-T1-H8-V1000"),  # one token
    pytest.param(2, 13, 40, 1000, id="B2-T13-H40-V1000"),  # many chunks both ways
]


@pytest.mark.parametrize("B,T,H,V", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_token_logprobs_match_reference(small_chunks, B, T, H, V, dtype, path):
    hidden, weight, targets = _hidden_inputs(B, T, H, V, torch.float64)
    temperature = 0.7
    g = torch.Generator().manual_seed(1)
    g_logp, g_entropy = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)

    def run(fn, dt):
        # gt sees the same dtype-rounded inputs, upcast: it measures the computation, not the rounding.
        def leaf(x):
            return x.to(dtype).to(dt).requires_grad_()

        if path == "hidden":
            inputs = {"hidden": leaf(hidden), "weight": leaf(weight)}
        else:
            inputs = {"logits": leaf(hidden @ weight.T)}
        logp, entropy = fn(targets, temperature=temperature, **inputs)
        (logp.double() * g_logp + entropy.double() * g_entropy).sum().backward()
        return [logp, entropy] + [inputs[k].grad for k in sorted(inputs)]

    ours = lambda t, **kw: softpo.token_logprobs(t, return_entropy=True, impl="torch", **kw)  # noqa: E731
    gt = run(reference_logprobs, torch.float64)
    ref = run(reference_logprobs, dtype)
    out = run(ours, dtype)
    assert out[0].dtype == torch.float32
    for name, o, r, e in zip(["logp", "entropy", "grad0", "grad1"], out, ref, gt):
        assert_close_to_gt(o, r, e, dtype, name)


def test_single_token_vocabulary_is_certain():
    hidden, weight, targets = _hidden_inputs(2, 3, 8, 1, torch.float32)
    logp, entropy = softpo.token_logprobs(targets, hidden=hidden, weight=weight, return_entropy=True)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, torch.zeros_like(entropy))


@pytest.mark.parametrize("config,uses_rollout", all_configs())
def test_policy_loss_matches_materialized_reference(small_chunks, config, uses_rollout):
    B, T, H, V = 4, 6, 12, 50
    hidden, weight, targets = _hidden_inputs(B, T, H, V, torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :] = False  # a fully masked row
    logp0 = reference_logprobs(targets, hidden=hidden, weight=weight)[0]
    kwargs = loss_kwargs(config, logp0, uses_rollout)
    advantages = kwargs.pop("advantages", None)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = softpo.policy_loss(config, targets, mask, advantages, hidden=h1, weight=w1, temperature=0.9,
                             impl="torch", **kwargs)
    out.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    gt = reference_policy_loss(config, targets, mask, advantages, hidden=h2, weight=w2, temperature=0.9, **kwargs)
    gt.backward()
    torch.testing.assert_close(out.loss, gt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(h1.grad[2], torch.zeros_like(h1.grad[2])), "masked row must get exactly zero gradient"
    assert torch.equal(h1.grad[0, 4:], torch.zeros_like(h1.grad[0, 4:]))
    for name, value in out.metrics.items():
        assert value.dim() == 0 and bool(torch.isfinite(value)), name


@pytest.mark.parametrize("config,uses_rollout", all_configs())
def test_policy_loss_gradcheck_float64(small_chunks, config, uses_rollout):
    B, T, H, V = 2, 3, 4, 9
    hidden, weight, targets = _hidden_inputs(B, T, H, V, torch.float64, seed=3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    logp0 = reference_logprobs(targets, hidden=hidden, weight=weight)[0]
    kwargs = loss_kwargs(config, logp0, uses_rollout, seed=4)
    advantages = kwargs.pop("advantages", None)
    if config.gate in ("cispo", "vespo") or config.importance_sampling_level == "sequence_token":
        pytest.skip("its gradient is defined through stop-gradients, so it is not the derivative of the value "
                    "that finite differences see; the materialized-reference test pins it instead")
    # Clip boundaries are kinks: keep ratios away from them so finite differences are meaningful.
    if config.gate in ("clip", "cispo"):
        kwargs["old_logp"] = logp0 + 0.01 * torch.randn(B, T, dtype=torch.float64)

    def loss_of(h, w):
        return softpo.policy_loss(config, targets, mask, advantages, hidden=h, weight=w, temperature=1.3,
                                  impl="torch", **kwargs).loss

    assert torch.autograd.gradcheck(loss_of, (hidden.requires_grad_(), weight.requires_grad_()), eps=1e-6, atol=1e-7)


def test_logits_path_gradcheck_float64(small_chunks):
    hidden, weight, targets = _hidden_inputs(2, 3, 4, 11, torch.float64)
    logits = (hidden @ weight.T).requires_grad_()

    def f(z):
        logp, entropy = softpo.token_logprobs(targets, logits=z, temperature=0.8, return_entropy=True, impl="torch")
        return logp * 0.3 + entropy

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_path_leaves_logits_untouched(small_chunks, temperature, dtype):
    # The sweep scales and overwrites its tiles in place; those must be copies, never the caller's logits.
    _, _, targets = _hidden_inputs(2, 5, 8, 97, torch.float32)
    logits = torch.randn(2, 5, 97).to(dtype).requires_grad_()
    before = logits.detach().clone()
    logp, entropy = softpo.token_logprobs(targets, logits=logits, temperature=temperature, return_entropy=True,
                                          impl="torch")
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(logits.detach(), before)


def test_shift_invariance_of_logits():
    _, _, targets = _hidden_inputs(3, 4, 8, 97, torch.float32)
    logits = torch.randn(3, 4, 97, dtype=torch.float64)
    a = softpo.token_logprobs(targets, logits=logits, return_entropy=True)
    b = softpo.token_logprobs(targets, logits=logits + 123.0, return_entropy=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_at_ratio_one_gates_agree_on_the_gradient():
    """At r = 1 (on-policy) GRPO, GSPO, SAPO and CISPO all reduce to the policy gradient -A grad logp."""
    B, T, H, V = 3, 5, 8, 31
    hidden, weight, targets = _hidden_inputs(B, T, H, V, torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    grads = {}
    for config in (softpo.GRPO, softpo.GSPO, softpo.GSPO_TOKEN, softpo.SAPO, softpo.CISPO.replace(loss_aggregation="seq-mean-token-mean")):
        h = hidden.clone().requires_grad_()
        softpo.policy_loss(config, targets, mask, advantages, hidden=h, weight=weight).loss.backward()
        grads[config.name] = h.grad
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads["grpo"], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("config,uses_rollout", all_configs())
def test_fully_masked_batch_gives_zero_loss_and_gradient(config, uses_rollout):
    B, T = 2, 4
    hidden, weight, targets = _hidden_inputs(B, T, 8, 17, torch.float32)
    targets[0, 0] = -100  # ignored: masked
    mask = torch.zeros(B, T, dtype=torch.bool)
    kwargs = loss_kwargs(config, torch.zeros(B, T), uses_rollout)
    advantages = kwargs.pop("advantages", None)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    out = softpo.policy_loss(config, targets, mask, advantages, hidden=h, weight=w, **kwargs)
    out.loss.backward()
    if config.objective == "spo":  # SPO's loss at S = 0 is the loss of q0 alone: finite, no gradient
        assert bool(torch.isfinite(out.loss))
    else:
        assert out.loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    assert all(bool(torch.isfinite(v)) for v in out.metrics.values())


@pytest.mark.parametrize("config,uses_rollout", all_configs())
@pytest.mark.parametrize("log_ratio", [50.0, -50.0])
def test_extreme_log_ratios_stay_finite(config, uses_rollout, log_ratio):
    B, T = 2, 3
    hidden, weight, targets = _hidden_inputs(B, T, 8, 17, torch.float32)
    mask = torch.ones(B, T, dtype=torch.bool)
    logp0 = reference_logprobs(targets, hidden=hidden, weight=weight)[0]
    kwargs = loss_kwargs(config, logp0, uses_rollout)
    kwargs["old_logp"] = logp0.double() - log_ratio
    if "ref_logp" in kwargs:
        kwargs["ref_logp"] = logp0.double() + log_ratio
    advantages = kwargs.pop("advantages", None)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    out = softpo.policy_loss(config, targets, mask, advantages, hidden=h, weight=w, **kwargs)
    out.loss.backward()
    assert bool(torch.isfinite(out.loss)), out.loss
    assert bool(torch.isfinite(h.grad).all()) and bool(torch.isfinite(w.grad).all())


def test_token_mean_normalizer_overrides_local_count():
    hidden, weight, targets = _hidden_inputs(2, 4, 8, 17, torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    local = softpo.policy_loss(softpo.DAPO, targets, mask, adv, hidden=hidden, weight=weight).loss
    shared = softpo.policy_loss(softpo.DAPO, targets, mask, adv, hidden=hidden, weight=weight, normalizer=32).loss
    torch.testing.assert_close(shared, local * 8 / 32)


def test_aggregations_by_hand():
    terms = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    c = softpo.GRPO
    assert objectives.aggregate(c, terms, mask).item() == pytest.approx((1.5 + 5.0) / 2)
    assert objectives.aggregate(c.replace(loss_aggregation="token-mean"), terms, mask).item() == pytest.approx(18 / 5)
    assert objectives.aggregate(c.replace(loss_aggregation="seq-mean-token-sum"), terms, mask).item() == pytest.approx(9.0)
    assert objectives.aggregate(c.replace(loss_aggregation="seq-mean-token-sum-norm"), terms, mask).item() == pytest.approx(18 / 6)
    norm10 = c.replace(loss_aggregation="seq-mean-token-sum-norm", max_completion_length=10)
    assert objectives.aggregate(norm10, terms, mask).item() == pytest.approx(18 / 20)


def test_gates_by_hand():
    r = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    logp = torch.zeros(3, dtype=torch.float64)
    pos, neg = torch.ones(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64)
    clip = objectives.gate_terms(softpo.GRPO, r, pos, logp)
    assert clip.tolist() == pytest.approx([-0.5, -1.0, -1.2])
    assert objectives.gate_terms(softpo.GRPO, r, neg, logp).tolist() == pytest.approx([0.8, 1.0, 1.5])
    assert objectives.gate_terms(softpo.GRPO.replace(delta=1.4), r, neg, logp).tolist() == pytest.approx([0.8, 1.0, 1.4])
    soft = objectives.gate_terms(softpo.SAPO, r, pos, logp)
    assert soft.tolist() == pytest.approx((-4 * torch.sigmoid(r - 1)).tolist())
    soft_neg = objectives.gate_terms(softpo.SAPO, r, neg, logp)
    assert soft_neg.tolist() == pytest.approx((4 / 1.05 * torch.sigmoid(1.05 * (r - 1))).tolist())


def test_spo_by_hand_and_q0_helper():
    rewards = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    q0 = softpo.spo_q0(rewards, beta=0.5)
    expected = [0.5 * math.log((1 + math.exp(2)) / 2), 1.0]
    assert q0.tolist() == pytest.approx(expected)
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    R, q = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64)
    loss, Q = objectives.spo_loss(softpo.SPO, logp, mask, ref, R, q)
    assert Q.item() == pytest.approx(-0.2 + 0.1 * (0.5 - 1.0))
    assert loss.item() == pytest.approx((Q.item() - 0.3) ** 2 / 2)
    q = torch.tensor([0.4], dtype=torch.float64)  # inside (0, 1), where bce reads Q as a success probability
    bce, Q = objectives.spo_loss(softpo.SPO.replace(spo_loss="bce"), logp, mask, ref, R, q)
    p = math.expm1(Q.item() / 0.1) / math.expm1(1 / 0.1)
    assert bce.item() == pytest.approx(-(0.3 * math.log(p)) - 0.7 * math.log(1 - p))


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.001])
def test_spo_bce_learns_from_rewards_in_0_1(beta):
    """bce reads Q as the success probability p = expm1(Q / beta) / expm1(1 / beta): at Q = q0 (a group's soft
    value) p is the group's success rate, and the gradient pushes Q up where R = 1 and down where R = 0."""
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    q0 = softpo.spo_q0(rewards, beta).expand(4).clone()
    # In log space, as at beta = 0.001 e^(1 / beta) overflows: log p = log expm1(Q / beta) - log expm1(1 / beta).
    log_p0 = objectives._log_expm1(q0[:1] / beta) - objectives._log_expm1(torch.tensor([1 / beta], dtype=q0.dtype))
    assert log_p0.exp().item() == pytest.approx(0.5, rel=1e-9)
    logp = torch.full((4, 3), -1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool)
    loss, q = objectives.spo_loss(softpo.SPO.replace(spo_loss="bce", beta=beta), logp, mask, logp.detach(),
                                  rewards[0], q0)
    assert torch.equal(q, q0) and math.isfinite(loss.item())
    loss.backward()
    per_sequence = logp.grad.sum(-1)
    assert (per_sequence[[1, 2]] < 0).all() and (per_sequence[[0, 3]] > 0).all(), per_sequence


def test_metrics_values():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64))
    old = logp - torch.tensor([[0.0, math.log(2), 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    _, m = objectives.policy_objective(softpo.GRPO, logp, mask, adv, old_logp=old)
    assert m["ratio_max"].item() == pytest.approx(2.0) and m["ratio_min"].item() == pytest.approx(1.0)
    assert m["ratio_mean"].item() == pytest.approx(6 / 5)
    assert m["clip_fraction"].item() == pytest.approx(1 / 5)
    lr = torch.tensor([0.0, math.log(2), 0.0])
    assert m["log_ratio_seq_var"].item() == pytest.approx(lr.var(unbiased=False).item() / 2)
    _, s = objectives.policy_objective(softpo.SAPO, logp, mask, adv, old_logp=old)
    sech2_at_one = 4 * torch.sigmoid(torch.tensor(1.0)) * torch.sigmoid(torch.tensor(-1.0))
    assert s["gate_weight"].item() == pytest.approx((4 + sech2_at_one.item()) / 5)


def test_presets_and_trl_names():
    assert softpo.preset("grpo") is softpo.GRPO
    assert softpo.preset("DR-GRPO") is softpo.DR_GRPO
    assert softpo.preset("sapo", beta=0.1).beta == 0.1
    assert softpo.GSPO.epsilon == 3e-4 and softpo.GSPO.epsilon_upper == 4e-4
    assert softpo.DAPO.epsilon_upper == 0.28 and softpo.DAPO.loss_aggregation == "token-mean"
    assert softpo.CISPO.epsilon_upper == 5.0
    assert (softpo.SAPO.sapo_temperature_pos, softpo.SAPO.sapo_temperature_neg) == (1.0, 1.05)
    with pytest.raises(ValueError, match="name"):
        softpo.preset("ppo2")
    with pytest.raises(ValueError, match="epsilonn"):
        softpo.preset("grpo", epsilonn=0.1)


def test_module_matches_function():
    hidden, weight, targets = _hidden_inputs(2, 4, 8, 17, torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    a = softpo.PolicyLoss(softpo.SAPO)(targets, mask, adv, hidden=hidden, weight=weight).loss
    b = softpo.policy_loss(softpo.SAPO, targets, mask, adv, hidden=hidden, weight=weight).loss
    assert torch.equal(a, b)
