"""token_logprobs and policy_loss under the distribution a sampler draws from (logit_scale, softcap, a temperature
per call, sequence or token, top-k, top-p, min-p), through the public API on every path: chunked torch and Triton
(interpreter), hidden and logits, the loss routes and flat memory, a vocab-parallel lm_head. The reference applies
transformers' own warpers, in generate's order, to materialized float64 processed logits. Also: targets outside
the kept set in policy_loss, batch invariance (bitwise), precision at large logit offsets, validation."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import softpo
from softpo import objectives, tiles

from distributed import run_group
from reference import assert_close_to_gt

pytestmark = [
    pytest.mark.usefixtures("poison_empty"),
    # The interpreter evaluates masked-out lanes too (log 0, inf * 0) before where() discards them.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

B, T, H, V = 2, 5, 16, 37
TRUNCATING = dict(logit_scale=0.7, softcap=3.0, top_k=6, top_p=0.8, min_p=0.05)
SETTINGS = {
    "all": TRUNCATING,  # every option at once, each one biting
    "top-p": dict(top_p=0.6),
    "min-p-negative-scale": dict(logit_scale=-1.3, min_p=0.2),
    "greedy": dict(top_k=1),  # one kept token per row
    "softcap": dict(logit_scale=0.5, softcap=2.5),  # the transform alone, no truncation
}


def temperature_of(kind, targets_shape):
    g = torch.Generator().manual_seed(7)
    if kind == "float":
        return 0.8
    shape = targets_shape[:1] if kind == "sequence" else targets_shape
    return 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)


def warped(x, targets, settings, temperature):
    """(logp, entropy, excluded) of processed logits of x [N, V] (any float dtype, may require grad): scale,
    softcap, then transformers' warpers in generate's order; log_softmax over the kept set. A target outside it
    gets logp -inf."""
    z = x * settings.get("logit_scale", 1.0)
    if settings.get("softcap") is not None:
        z = settings["softcap"] * torch.tanh(z / settings["softcap"])
    ids = torch.zeros(z.shape[0], 1, dtype=torch.long)
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.reshape(-1, 1).to(z.dtype)
    else:
        z = TemperatureLogitsWarper(temperature)(ids, z)
    scores = z.detach()
    if settings.get("top_k"):
        scores = TopKLogitsWarper(settings["top_k"])(ids, scores)
    if settings.get("top_p") is not None:
        scores = TopPLogitsWarper(settings["top_p"])(ids, scores)
    if settings.get("min_p"):
        scores = MinPLogitsWarper(settings["min_p"])(ids, scores)
    # Tokens tied with the last kept one are kept too (the warper splits such a tie by its sort order).
    last_kept = torch.where(torch.isfinite(scores), z.detach(), float("inf")).amin(1, keepdim=True)
    kept = z.detach() >= last_kept
    log_p = torch.log_softmax(torch.where(kept, z, float("-inf")), -1)
    logp = log_p.gather(1, targets.reshape(-1, 1))[:, 0]
    excluded = ~kept.gather(1, targets.reshape(-1, 1))[:, 0]
    entropy = -(log_p.exp() * torch.where(kept, log_p, 0.0)).sum(-1)
    return logp, entropy, excluded


def lm_head(seed=0, dtype=torch.float64, B=B, T=T, H=H, V=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.5 / math.sqrt(H))
    targets = torch.randint(0, V, (B, T), generator=g)
    # Some targets at the row's least likely token: outside any truncated kept set.
    logits = hidden @ weight.T
    targets[0, 1] = logits[0, 1].argmin()
    targets[1, 3] = logits[1, 3].argmin()
    return hidden.to(dtype), weight.to(dtype), targets


def reference(source, hidden, weight, targets, settings, temperature, g_logp, g_entropy, compute):
    """(logp, entropy, excluded, grads) in `compute` precision from the dtype-rounded inputs."""
    h = hidden.detach().to(compute).requires_grad_()
    w = weight.detach().to(compute).requires_grad_()
    if source == "hidden":
        x = h.reshape(-1, h.shape[-1]) @ w.T
        leaves = (h, w)
    else:
        # The logits as the test's dtype holds them.
        x0 = (hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T).to(hidden.dtype)
        x = x0.to(compute).requires_grad_()
        leaves = (x,)
    temp = temperature if not isinstance(temperature, torch.Tensor) else \
        temperature[:, None].expand(targets.shape) if temperature.dim() == 1 else temperature
    logp, entropy, excluded = warped(x, targets, settings, temp.reshape(-1) if isinstance(temp, torch.Tensor) else temp)
    loss = (g_logp.reshape(-1).to(compute) * torch.where(excluded, 0.0, logp)).sum() \
        + (g_entropy.reshape(-1).to(compute) * entropy).sum()
    grads = torch.autograd.grad(loss, leaves)
    return logp.detach(), entropy.detach(), excluded, grads


def run_ours(source, impl, hidden, weight, targets, settings, temperature, g_logp, g_entropy, **kwargs):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    if source == "hidden":
        inputs, leaves = dict(hidden=h, weight=w), (h, w)
    else:
        logits = (hidden.double() @ weight.double().T).to(hidden.dtype).requires_grad_()
        inputs, leaves = dict(logits=logits), (logits,)
    logp, entropy = softpo.token_logprobs(targets, temperature=temperature, return_entropy=True, impl=impl,
                                          **settings, **inputs, **kwargs)
    # The upstream gradient reaches -inf log-probs as well: the sweep itself must give them none.
    grads = torch.autograd.grad([logp, entropy], leaves, [g_logp.float(), g_entropy.float()])
    return logp.detach(), entropy.detach(), grads


def check_against_reference(source, impl, dtype, settings, temperature, **kwargs):
    hidden, weight, targets = lm_head(1, dtype)
    g = torch.Generator().manual_seed(3)
    g_logp, g_entropy = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    logp, entropy, grads = run_ours(source, impl, hidden, weight, targets, settings, temperature, g_logp, g_entropy,
                                    **kwargs)
    gt = reference(source, hidden, weight, targets, settings, temperature, g_logp, g_entropy, torch.float64)
    ref = reference(source, hidden, weight, targets, settings, temperature, g_logp, g_entropy,
                    torch.float64 if dtype == torch.float64 else torch.float32)
    excluded = gt[2].reshape(B, T)
    assert torch.equal(ref[2], gt[2]), "the test's own fp32 reference keeps another set: pick other inputs"
    assert torch.equal(logp == float("-inf"), excluded), "-inf exactly at the targets outside the kept set"
    assert not logp.isnan().any() and torch.isfinite(entropy).all()
    keep = lambda t: torch.where(excluded.reshape(t.shape), 0.0, t.double())  # noqa: E731
    assert_close_to_gt(keep(logp), keep(ref[0].reshape(B, T)), keep(gt[0].reshape(B, T)), dtype, "logp")
    assert_close_to_gt(entropy, ref[1].reshape(B, T), gt[1].reshape(B, T), dtype, "entropy")
    for name, out, r, t in zip(("d first input", "d weight"), grads, ref[3], gt[3]):
        assert torch.isfinite(out).all(), name
        assert_close_to_gt(out, r.reshape(out.shape), t.reshape(out.shape), dtype, name,
                           scale=t.abs().max().expand(out.shape))


# (source, impl, dtype, settings, temperature kind, memory): a spread over the paths, small for the interpreter.
CASES = [
    pytest.param(source, impl, dtype, name, kind, memory,
                 id=f"{source}-{impl}-{str(dtype)[6:]}-{name}-T{kind}" + ("-flat" if memory == "flat" else ""))
    for source, impl, dtype, name, kind, memory in [
        *[("logits", "torch", torch.float32, name, kind, "default") for name in SETTINGS
          for kind in ("float", "sequence", "token")],
        *[("hidden", "torch", torch.float64, name, "sequence", "default") for name in SETTINGS],
        ("hidden", "torch", torch.float32, "all", "token", "flat"),
        ("hidden", "torch", torch.bfloat16, "softcap", "sequence", "default"),
        ("logits", "torch", torch.bfloat16, "all", "token", "default"),
        ("logits", "torch", torch.float16, "top-p", "float", "default"),
        *[("logits", "triton", torch.float32, name, "sequence", "default") for name in SETTINGS],
        ("logits", "triton", torch.bfloat16, "all", "token", "default"),
        ("logits", "triton", torch.float16, "min-p-negative-scale", "float", "default"),
        *[("hidden", "triton", torch.float32, name, "token", "default") for name in ("all", "top-p", "softcap")],
        ("hidden", "triton", torch.float32, "all", "sequence", "flat"),
        ("hidden", "triton", torch.bfloat16, "softcap", "float", "default"),
    ]
]


@pytest.mark.parametrize("source,impl,dtype,settings,kind,memory", CASES)
def test_token_logprobs_match_the_warpers(source, impl, dtype, settings, kind, memory):
    check_against_reference(source, impl, dtype, SETTINGS[settings], temperature_of(kind, (B, T)), memory=memory)


def test_triton_inplace_backward_with_the_sampler():
    hidden, weight, targets = lm_head(2, torch.float32)
    logits = (hidden @ weight.T).requires_grad_()
    produced = logits * 1.0
    logp = softpo.token_logprobs(targets, logits=produced, impl="triton", inplace_backward=True, **TRUNCATING)
    expected = softpo.token_logprobs(targets, logits=logits.detach().requires_grad_(), impl="torch", **TRUNCATING)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    logp.masked_fill(logp == float("-inf"), 0.0).sum().backward()
    assert torch.isfinite(logits.grad).all()


# policy_loss: targets outside the kept set leave the objective as if masked.

def loss_reference(config, source, hidden, weight, targets, mask, kwargs, settings, temperature, normalizer=None):
    """(loss, d inputs, outside) in float64: the objective on logp with the outside tokens masked."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    if source == "hidden":
        x, leaves = h.reshape(-1, H) @ w.T, (h, w)
    else:
        x = (hidden.double().reshape(-1, H) @ weight.double().T).requires_grad_()
        leaves = (x,)
    temp = temperature[:, None].expand(B, T).reshape(-1) if isinstance(temperature, torch.Tensor) else temperature
    logp, entropy, excluded = warped(x, targets, settings, temp)
    logp, entropy, excluded = logp.reshape(B, T), entropy.reshape(B, T), excluded.reshape(B, T)
    outside = mask & excluded
    safe = torch.where(outside, kwargs["old_logp"], logp)
    loss, _ = objectives.objective_loss(config, safe, mask & ~outside, kwargs.get("advantages"),
                                        old_logp=kwargs["old_logp"], ref_logp=kwargs.get("ref_logp"),
                                        rewards=kwargs.get("rewards"), q0=kwargs.get("q0"), normalizer=normalizer,
                                        entropy=entropy if config.needs_entropy else None)
    return loss.detach(), torch.autograd.grad(loss, leaves), outside


LOSS_CASES = [
    pytest.param(preset, source, impl, id=f"{preset}-{source}-{impl}")
    for preset, source, impl in [("SAPO", "logits", "torch"), ("SAPO", "hidden", "torch"), ("GSPO", "hidden", "torch"),
                                 ("GSPO", "logits", "torch"), ("SAPO", "logits", "triton"),
                                 ("GSPO", "hidden", "triton")]
]


@pytest.mark.parametrize("preset,source,impl", LOSS_CASES)
def test_policy_loss_leaves_out_targets_outside_the_kept_set(preset, source, impl):
    config = softpo.preset(preset).replace(beta=0.04, entropy_coef=0.01)
    hidden, weight, targets = lm_head(4, torch.float64 if impl == "torch" else torch.float32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    g = torch.Generator().manual_seed(5)
    kwargs = dict(advantages=torch.randn(B, generator=g, dtype=torch.float64),
                  old_logp=-2.0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
                  ref_logp=-2.0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    temperature = torch.tensor([0.9, 1.2], dtype=torch.float64)
    expected, expected_grads, outside = loss_reference(config, source, hidden, weight, targets, mask, kwargs,
                                                       TRUNCATING, temperature)
    assert outside.any() and (mask & ~outside).any()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    if source == "hidden":
        inputs, leaves = dict(hidden=h, weight=w), (h, w)
    else:
        logits = (hidden.double() @ weight.double().T).to(hidden.dtype).requires_grad_()
        inputs, leaves = dict(logits=logits), (logits,)
    out = softpo.policy_loss(config, targets, mask, temperature=temperature, impl=impl, **TRUNCATING, **inputs,
                             **{k: v.to(hidden.dtype) for k, v in kwargs.items()})
    grads = torch.autograd.grad(out.loss, leaves)
    tol = 1e-9 if hidden.dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.loss.double(), expected, rtol=tol, atol=tol)
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=tol, atol=tol)
    assert torch.equal(out.logp == float("-inf"), outside)
    assert out.metrics["outside_support"].item() == pytest.approx(outside.sum().item() / mask.sum().item())
    plain = softpo.policy_loss(config, targets, mask, impl=impl, **inputs,
                               **{k: v.to(hidden.dtype) for k, v in kwargs.items()})
    assert "outside_support" not in plain.metrics


ROUTE_CASES = [
    # Without truncation the fused routes run with the transform: gradient in the forward (token-level), sequence
    # tiles (sequence-level), terms (no gradient wanted) and flat memory.
    pytest.param("SAPO", "hidden", "default", True, id="SAPO-hidden-gradient"),
    pytest.param("SAPO", "logits", "default", True, id="SAPO-logits-gradient"),
    pytest.param("SAPO", "hidden", "flat", True, id="SAPO-hidden-gradient-flat"),
    pytest.param("SAPO", "logits", "flat", True, id="SAPO-logits-terms-flat"),
    pytest.param("GSPO", "hidden", "default", True, id="GSPO-hidden-sequence-tiles"),
    pytest.param("GSPO", "hidden", "flat", True, id="GSPO-hidden-sequence-tiles-flat"),
]


@pytest.mark.parametrize("preset,source,memory,_", ROUTE_CASES)
def test_fused_routes_take_the_transform(preset, source, memory, _):
    config = softpo.preset(preset).replace(entropy_coef=0.01)
    hidden, weight, targets = lm_head(6, torch.float32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = False
    g = torch.Generator().manual_seed(8)
    kwargs = dict(advantages=torch.randn(B, generator=g), old_logp=-2.0 + 0.3 * torch.randn(B, T, generator=g))
    settings = SETTINGS["softcap"]
    temperature = torch.tensor([0.9, 1.2])
    results = []
    for impl in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if source == "hidden":
            inputs, leaves = dict(hidden=h, weight=w), (h, w)
        else:
            logits = (hidden @ weight.T).requires_grad_()
            inputs, leaves = dict(logits=logits), (logits,)
        out = softpo.policy_loss(config, targets, mask, temperature=temperature, impl=impl, memory=memory,
                                 **settings, **inputs, **kwargs)
        results.append((out.loss.detach(), *torch.autograd.grad(out.loss, leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


TRUNCATED_ROUTE_CASES = [
    # (preset, its changes, source, memory, normalizer, the route policy_loss must take). The gradient routes form
    # each row's gradient with the weights of the mask as given; what truncation changes of them is corrected
    # by one factor (token-mean), seen whole by a sequence tile (seq-mean-token-mean), or left to "terms" and
    # "plain" (an entropy bonus beside a normalizer other than the token count).
    ("SAPO", dict(loss_aggregation="token-mean", entropy_coef=0.3), "hidden", "default", None, "gradient"),
    ("SAPO", dict(loss_aggregation="token-mean", entropy_coef=0.3), "logits", "default", None, "gradient"),
    ("SAPO", dict(loss_aggregation="token-mean", entropy_coef=0.3), "hidden", "flat", None, "gradient"),
    ("SAPO", dict(loss_aggregation="token-mean", entropy_coef=0.3), "logits", "flat", None, "terms"),
    ("SAPO", dict(), "hidden", "default", None, "sequence-gradient"),
    ("SAPO", dict(entropy_coef=0.3), "hidden", "default", None, "plain"),
    ("GRPO", dict(), "logits", "default", None, "terms"),
    ("DR_GRPO", dict(), "hidden", "default", None, "gradient"),
    ("DAPO", dict(), "hidden", "default", 7.0, "gradient"),
    ("DAPO", dict(entropy_coef=0.3), "logits", "default", 7.0, "terms"),
    ("DAPO", dict(entropy_coef=0.3), "hidden", "default", 7.0, "plain"),
    ("GSPO", dict(), "hidden", "default", None, "sequence-gradient"),
    ("GSPO", dict(), "hidden", "flat", None, "sequence-gradient"),
    ("GSPO_TOKEN", dict(loss_aggregation="token-mean", entropy_coef=0.3), "hidden", "default", None,
     "sequence-gradient"),
    ("SPO", dict(), "hidden", "default", None, "sequence-gradient"),
    # SPO's loss is a mean over sequences whatever loss_aggregation says: no token-count factor, and its entropy
    # bonus (over the tokens) beside it takes "plain".
    ("SPO", dict(loss_aggregation="token-mean"), "hidden", "default", None, "sequence-gradient"),
    ("SPO", dict(loss_aggregation="token-mean", entropy_coef=0.3), "hidden", "default", None, "plain"),
]


@pytest.mark.parametrize("preset,changes,source,memory,normalizer,route", [
    pytest.param(*case, id="-".join([case[0], *(f"{k}={v}" for k, v in case[1].items()), *map(str, case[2:])]))
    for case in TRUNCATED_ROUTE_CASES])
@pytest.mark.parametrize("tile", ["whole-batch", "one-sequence"])
def test_fused_routes_under_truncation(monkeypatch, preset, changes, source, memory, normalizer, route, tile):
    if tile == "one-sequence":
        # Tiles of T rows: a tile's gradient is formed before later tiles' targets are known to be outside.
        for name in ("TILE_BYTES", "FLAT_TILE_BYTES"):
            monkeypatch.setattr(tiles, name, T * V * 4)
    config = softpo.preset(preset).replace(beta=0.04, **changes)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    outside = torch.zeros(B, T, dtype=torch.bool)
    outside[0, 1] = outside[1, 3] = True
    chosen = record_routes(monkeypatch)
    out, leaves, (expected, expected_grads, reference_outside) = truncated_call(
        config, source, outside=outside, mask=mask, normalizer=normalizer, memory=memory)
    assert chosen == [route]
    assert reference_outside.any() and (mask & ~reference_outside).any()
    grads = torch.autograd.grad(out.loss, leaves)
    torch.testing.assert_close(out.loss.double(), expected, rtol=2e-4, atol=2e-4)
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=2e-4, atol=2e-4)
    assert torch.equal((out.logp == float("-inf")) & mask, reference_outside)


def truncated_call(config, source, *, outside, mask, normalizer=None, memory="default", dtype=torch.float32, seed=9,
                   impl="triton"):
    """(policy_loss output, its leaves, the float64 reference's (loss, grads, outside)) with the targets at `outside`
    the least likely token of their row (outside the kept set of TRUNCATING) and the others one of the two most
    likely; old_logp, ref_logp, advantages (or SPO's rewards and q0) drawn, temperature per sequence."""
    hidden, weight, _ = lm_head(seed, torch.float64)
    logits = hidden @ weight.T
    g = torch.Generator().manual_seed(seed + 1)
    drawn = logits.topk(2, -1).indices.gather(-1, torch.randint(0, 2, (B, T, 1), generator=g))[..., 0]
    targets = torch.where(outside, logits.argmin(-1), drawn)
    kwargs = dict(old_logp=-2.0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
                  ref_logp=-2.0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    if config.objective == "spo":
        kwargs.update(rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), q0=torch.zeros(B, dtype=torch.float64))
    else:
        kwargs["advantages"] = torch.randn(B, generator=g, dtype=torch.float64)
    temperature = torch.tensor([0.9, 1.2], dtype=torch.float64)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    expected = loss_reference(config, source, hidden, weight, targets, mask, kwargs, TRUNCATING, temperature,
                              normalizer)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if source == "hidden":
        inputs, leaves = dict(hidden=h, weight=w), (h, w)
    else:
        x = (hidden.double() @ weight.double().T).to(dtype).requires_grad_()
        inputs, leaves = dict(logits=x), (x,)
    out = softpo.policy_loss(config, targets, mask, temperature=temperature.to(dtype), impl=impl, memory=memory,
                             normalizer=normalizer, **TRUNCATING, **inputs,
                             **{k: v.to(dtype) for k, v in kwargs.items()})
    return out, leaves, expected


def record_routes(monkeypatch):
    chosen, choose = [], softpo.routes.choose

    def recording_choose(*args, **kwargs):
        decision = choose(*args, **kwargs)
        chosen.append(decision[0])
        return decision

    monkeypatch.setattr(softpo.routes, "choose", recording_choose)
    return chosen


EMPTIED_CASES = [
    # (preset, changes, source, memory, normalizer, route): each gradient route, its token-count factor and the
    # per-sequence counts it must see, when truncation leaves a sequence, or the whole batch, without a token.
    ("DAPO", dict(), "hidden", "default", None, "gradient"),
    ("DAPO", dict(), "logits", "default", None, "gradient"),
    ("BNPO", dict(entropy_coef=0.3), "hidden", "flat", None, "gradient"),
    ("CISPO", dict(entropy_coef=0.3), "logits", "default", None, "gradient"),
    ("DR_GRPO", dict(), "hidden", "default", 3.0, "gradient"),
    ("GRPO", dict(), "hidden", "default", None, "sequence-gradient"),
    ("GRPO", dict(), "logits", "default", None, "terms"),
    ("GSPO", dict(), "hidden", "default", None, "sequence-gradient"),
    ("GSPO_TOKEN", dict(loss_aggregation="token-mean", entropy_coef=0.3), "hidden", "flat", None,
     "sequence-gradient"),
    ("LUSPO", dict(), "hidden", "default", None, "sequence-gradient"),
    ("VESPO", dict(), "hidden", "default", None, "sequence-gradient"),
    ("SPO", dict(), "hidden", "default", None, "sequence-gradient"),
]


@pytest.mark.parametrize("preset,changes,source,memory,normalizer,route", [
    pytest.param(*case, id="-".join([case[0], *(f"{k}={v}" for k, v in case[1].items()), *map(str, case[2:])]))
    for case in EMPTIED_CASES])
@pytest.mark.parametrize("emptied", ["one-sequence", "every-sequence"])
def test_fused_routes_when_truncation_empties_sequences(monkeypatch, preset, changes, source, memory, normalizer,
                                                        route, emptied):
    # Tiles of one sequence: the emptied sequence's tile and the other's form their gradients apart.
    for name in ("TILE_BYTES", "FLAT_TILE_BYTES"):
        monkeypatch.setattr(tiles, name, T * V * 4)
    config = softpo.preset(preset).replace(beta=0.04, **changes)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = mask[0, 2] = False
    outside = torch.zeros(B, T, dtype=torch.bool)
    outside[1] = True  # every valid token of the second sequence
    if emptied == "every-sequence":
        outside[:] = True  # count kept 0: the loss is finite and has no gradient
    else:
        outside[0, 3] = True
    chosen = record_routes(monkeypatch)
    out, leaves, (expected, expected_grads, reference_outside) = truncated_call(
        config, source, outside=outside, mask=mask, normalizer=normalizer, memory=memory)
    assert chosen == [route]
    assert torch.equal(reference_outside, outside & mask)
    grads = torch.autograd.grad(out.loss, leaves)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double(), expected, rtol=2e-4, atol=2e-4)
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all()
        if emptied == "every-sequence":
            assert not got.any()
        torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=2e-4, atol=2e-4)
    assert torch.equal(out.logp == float("-inf"), outside & mask)
    assert out.metrics["outside_support"].item() == pytest.approx((outside & mask).sum().item() / mask.sum().item())


@pytest.mark.parametrize("preset,changes,source,route", [
    ("DAPO", dict(entropy_coef=0.3), "hidden", "gradient"),
    ("DAPO", dict(entropy_coef=0.3), "logits", "gradient"),  # d logits scaled in place in the backward
    ("VESPO", dict(), "hidden", "sequence-gradient"),
])
def test_truncation_factor_follows_the_upstream_gradient(monkeypatch, preset, changes, source, route):
    """(c * loss).backward() gives c times the gradient with the token-count factor applied, in every dtype the
    factor could be folded into; a second backward through one call is still refused."""
    config = softpo.preset(preset).replace(beta=0.04, **changes)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    outside = torch.zeros(B, T, dtype=torch.bool)
    outside[0, 1] = outside[1, 3] = outside[1, 0] = True
    chosen = record_routes(monkeypatch)
    grads = {}
    for c in (1.0, 2.0, -0.5):
        out, leaves, (_, expected_grads, _) = truncated_call(config, source, outside=outside, mask=mask)
        (c * out.loss).backward(retain_graph=c == -0.5)
        grads[c] = [leaf.grad for leaf in leaves]
    assert chosen == [route] * 3
    for got, want in zip(grads[1.0], expected_grads):
        torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=2e-4, atol=2e-4)
    for c in (2.0, -0.5):
        for got, once in zip(grads[c], grads[1.0]):
            torch.testing.assert_close(got, c * once, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


@pytest.mark.parametrize("preset,changes", [("DAPO", dict(entropy_coef=0.3)), ("GRPO", dict())])
def test_fused_routes_under_truncation_in_bf16(preset, changes):
    """bf16 logits: the fused routes (gradient with its factor, terms) against the chunked torch path on the same
    logits. (On the hidden path the logits tiles are rounded to the inputs' dtype, which moves ties at the
    top-k boundary: no float64 reference of the unrounded product applies there.)"""
    config = softpo.preset(preset).replace(beta=0.04, **changes)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    outside = torch.zeros(B, T, dtype=torch.bool)
    outside[0, 1] = outside[1, 3] = outside[1, 0] = True
    results = []
    for impl in ("triton", "torch"):
        out, leaves, _ = truncated_call(config, "logits", outside=outside, mask=mask, dtype=torch.bfloat16, impl=impl)
        assert torch.equal(out.logp == float("-inf"), outside & mask)
        results.append((out.loss.detach().float(), *(g.float() for g in torch.autograd.grad(out.loss, leaves))))
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert (got - want).norm() <= 1e-2 * want.norm()

@pytest.mark.parametrize("impl,source", [("torch", "hidden"), ("triton", "hidden"), ("triton", "logits")])
def test_old_logp_taken_under_the_same_truncation(impl, source):
    """old_logp from token_logprobs under the same sampler is -inf where the old policy's kept set left the
    target out: policy_loss leaves that token out too, as if masked, and counts it in outside_support."""
    config = softpo.DAPO.replace(beta=0.04)
    dtype = torch.float64 if impl == "torch" else torch.float32
    hidden, weight, targets = lm_head(14, dtype)
    g = torch.Generator().manual_seed(15)
    old_weight = weight + 0.5 * torch.randn(weight.shape, generator=g, dtype=torch.float64).to(dtype) / math.sqrt(H)
    temperature = torch.tensor([0.9, 1.2], dtype=dtype)
    per_token = temperature.double()[:, None].expand(B, T).reshape(-1)

    def kept(w):
        """[B, T, V]: whether each token lies in each row's kept set under head w."""
        x = hidden.double().reshape(-1, H) @ w.double().T
        return torch.stack([~warped(x, torch.full((B * T,), v), TRUNCATING, per_token)[2]
                            for v in range(V)], -1).view(B, T, V)

    kept_now, kept_before = kept(weight), kept(old_weight)
    # Per position, a token in both kept sets, only in the old one, or only in the new one, in turn.
    choice = [kept_now & kept_before, kept_before & ~kept_now, kept_now & ~kept_before]
    for i in range(B * T):
        b, t = divmod(i, T)
        options = [c[b, t].nonzero()[:, 0] for c in choice]
        pick = options[i % 3] if options[i % 3].numel() else options[0]
        targets[b, t] = pick[0]
    old_logp = softpo.token_logprobs(targets, hidden=hidden, weight=old_weight, temperature=temperature,
                                     impl="torch", **TRUNCATING)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    before = mask & (old_logp == float("-inf"))
    kwargs = dict(advantages=torch.randn(B, generator=g, dtype=torch.float64),
                  old_logp=torch.where(before, 0.0, old_logp).double(),
                  ref_logp=-2.0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    expected, expected_grads, now = loss_reference(config, source, hidden, weight, targets, mask & ~before, kwargs,
                                                   TRUNCATING, temperature)
    assert before.any() and now.any() and (mask & ~before & ~now).any()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if source == "hidden":
        inputs, leaves = dict(hidden=h, weight=w), (h, w)
    else:
        logits = (hidden.double() @ weight.double().T).to(dtype).requires_grad_()
        inputs, leaves = dict(logits=logits), (logits,)
    out = softpo.policy_loss(config, targets, mask, kwargs["advantages"].to(dtype), old_logp=old_logp,
                             ref_logp=kwargs["ref_logp"].to(dtype), temperature=temperature, impl=impl,
                             **TRUNCATING, **inputs)
    grads = torch.autograd.grad(out.loss, leaves)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.loss.double(), expected, rtol=tol, atol=tol)
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=tol, atol=tol)
    assert out.metrics["outside_support"].item() == pytest.approx((before | now).sum().item() / mask.sum().item())
    # Without truncation a -inf old log-prob is no log-prob at all.
    with pytest.raises(ValueError, match="old_logp must be finite at every unmasked position"):
        softpo.policy_loss(config, targets, mask, kwargs["advantages"].to(dtype), old_logp=old_logp,
                           ref_logp=kwargs["ref_logp"].to(dtype), impl=impl, **inputs)


# Batch invariance: the same rows inside batches of different sizes and orders give the same bits.

@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("settings", ["all", "softcap"])
def test_batch_invariance_is_bitwise(impl, source, settings):
    g = torch.Generator().manual_seed(9)
    N = 11
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    targets = torch.randint(0, V, (N,), generator=g)
    temperature = 0.5 + torch.rand(N, generator=g)
    g_logp, g_entropy = torch.randn(N, generator=g), torch.randn(N, generator=g)
    logits_all = hidden @ weight.T

    def run(rows):
        h = hidden[rows].clone().requires_grad_()
        x = logits_all[rows].clone().requires_grad_()
        inputs = dict(hidden=h, weight=weight) if source == "hidden" else dict(logits=x)
        logp, entropy = softpo.token_logprobs(targets[rows], temperature=temperature[rows], return_entropy=True,
                                              impl=impl, batch_invariant=True, **SETTINGS[settings], **inputs)
        (d,) = torch.autograd.grad([logp, entropy], [h if source == "hidden" else x], [g_logp[rows], g_entropy[rows]])
        return {int(r): (logp[i], entropy[i], d[i]) for i, r in enumerate(rows)}

    small = run(torch.tensor([3, 7, 1]))
    large = run(torch.randperm(N, generator=g))
    single = run(torch.tensor([7]))
    for row, values in small.items():
        for a, b in zip(values, large[row]):
            assert torch.equal(a, b), f"row {row} differs inside a larger batch"
    for a, b in zip(small[7], single[7]):
        assert torch.equal(a, b), "row 7 differs alone"


# Precision at any logit offset: never worse than torch's fp32 log_softmax.

@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("offset", [1e3, 1e5, 2.0 ** 24])
@pytest.mark.parametrize("settings", ["none", "threshold"])
def test_precision_at_large_logit_offsets(impl, offset, settings):
    g = torch.Generator().manual_seed(10)
    N = 9
    logits = (3 * torch.randn(N, V, generator=g) + offset).float()
    targets = torch.randint(0, V, (N,), generator=g)
    g_logp = torch.randn(N, generator=g)
    # A min-p threshold far below every logit: the thresholds' path runs, and the kept set is the whole row.
    chosen = {} if settings == "none" else dict(min_p=1e-12)
    x = logits.clone().requires_grad_()
    logp = softpo.token_logprobs(targets, logits=x, impl=impl, **chosen)
    (d_ours,) = torch.autograd.grad(logp, x, g_logp)
    gt_x = logits.double().requires_grad_()
    gt = torch.log_softmax(gt_x, -1).gather(1, targets[:, None])[:, 0]
    (d_gt,) = torch.autograd.grad(gt, gt_x, g_logp.double())
    ref_x = logits.clone().requires_grad_()
    ref = torch.log_softmax(ref_x, -1).gather(1, targets[:, None])[:, 0]
    (d_ref,) = torch.autograd.grad(ref, ref_x, g_logp)
    if settings != "none":
        assert torch.isfinite(logp).all(), "a min-p of 1e-12 keeps every token of these rows"
    assert_close_to_gt(logp, ref, gt, torch.float32, "logp")
    assert_close_to_gt(d_ours, d_ref, d_gt, torch.float32, "d logits")


# Validation: ValueError naming the argument.

BAD = [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"), (dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"),
    (dict(logit_scale=0.0), "logit_scale"), (dict(logit_scale=float("inf")), "logit_scale"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=torch.tensor([1.0, 0.0])), "temperature"),
    (dict(temperature=torch.tensor([1.0, float("inf")])), "temperature"),
    (dict(temperature=torch.ones(3)), "temperature"), (dict(temperature=torch.ones(B, T, dtype=torch.long)),
                                                       "temperature"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_sampler_settings_raise_naming_the_argument(kwargs, name):
    hidden, weight, targets = lm_head(0, torch.float32)
    with pytest.raises(ValueError, match=name):
        softpo.token_logprobs(targets, hidden=hidden, weight=weight, impl="torch", **kwargs)
    with pytest.raises(ValueError, match=name):
        softpo.policy_loss(softpo.GRPO, targets, torch.ones(B, T), torch.ones(B), hidden=hidden, weight=weight,
                           impl="torch", **kwargs)
    if "temperature" not in kwargs:
        with pytest.raises(ValueError, match=name):
            softpo.TokenLogprobs(**kwargs)
        with pytest.raises(ValueError, match=name):
            softpo.PolicyLoss(softpo.GRPO, **kwargs)


def test_masked_temperature_may_hold_anything_and_modules_store_the_sampler():
    hidden, weight, targets = lm_head(0, torch.float32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2:] = False
    per_token = torch.full((B, T), 0.9)
    per_token[1, 2:] = 0.0  # padding
    out = softpo.policy_loss(softpo.GRPO, targets, mask, torch.ones(B), hidden=hidden, weight=weight, impl="torch",
                             temperature=per_token, top_k=5)
    assert torch.isfinite(out.loss)
    module = softpo.TokenLogprobs(0.9, top_k=5, impl="torch")
    torch.testing.assert_close(module(targets, hidden=hidden, weight=weight),
                               softpo.token_logprobs(targets, hidden=hidden, weight=weight, temperature=0.9, top_k=5))
    loss_module = softpo.PolicyLoss(softpo.GRPO, impl="torch", top_k=5)
    torch.testing.assert_close(loss_module(targets, mask, torch.ones(B), hidden=hidden, weight=weight,
                                           temperature=per_token).loss, out.loss)


# A vocab-parallel lm_head: uneven shards of 2 and 3 ranks against the single-process call.

SHARDED_V = 301  # wide enough that a flat nucleus of top-p reaches past the 256 candidates (the exact fallback)
LAYOUTS = {2: [151, 150], 3: [101, 100, 100]}
SHARDED_CASES = [
    ("hidden", "torch", "all"), ("logits", "torch", "all"), ("hidden", "triton", "all"),
    ("logits", "triton", "top-p"), ("logits", "torch", "wide-top-p"), ("logits", "torch", "offset"),
]


def _sharded_case(source, impl, name, rows=None, group=None):
    g = torch.Generator().manual_seed(11)
    dtype = torch.float64 if impl == "torch" else torch.float32
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(SHARDED_V, H, generator=g, dtype=torch.float64) * (2.5 / math.sqrt(H))
    targets = torch.randint(0, SHARDED_V, (B, T), generator=g)
    settings = SETTINGS.get(name, {})
    if name == "wide-top-p":
        weight = weight * 0.02
        settings = dict(top_p=0.95)
    full_logits = hidden @ weight.T
    targets[0, 2] = full_logits[0, 2].argmin()
    if name == "offset":
        full_logits = full_logits * 3 + 2.0 ** 24
        dtype = torch.float32
        settings = dict(top_k=20)
    rows = rows or slice(0, SHARDED_V)
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype)[rows].clone().requires_grad_()
    x = full_logits.to(dtype)[..., rows].clone().requires_grad_()
    inputs, leaves = (dict(hidden=h, weight=w), (h, w)) if source == "hidden" else (dict(logits=x), (x,))
    shard = {} if group is None else dict(process_group=group)
    temperature = torch.tensor([0.8, 1.1], dtype=dtype)
    logp, entropy = softpo.token_logprobs(targets, temperature=temperature, return_entropy=True, impl=impl,
                                          **settings, **inputs, **shard)
    g_logp, g_entropy = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    grads = torch.autograd.grad([logp, entropy], leaves, [g_logp.to(dtype), g_entropy.to(dtype)])
    out = dict(logp=logp, entropy=entropy, d_first=grads[0])
    if len(grads) > 1:
        out["d_weight"] = grads[1]
    if name == "all" and source == "hidden" and impl == "torch":
        mask = torch.ones(B, T, dtype=torch.bool)
        loss = softpo.policy_loss(softpo.SAPO, targets, mask, torch.tensor([1.0, -0.5], dtype=dtype),
                                  temperature=temperature, impl=impl, **settings, **inputs, **shard)
        out["loss"] = loss.loss.detach()
        out["outside_support"] = loss.metrics["outside_support"]
    return {k: v.detach().double() for k, v in out.items()}


def _sharded_worker(rank, world, out_dir):
    sizes = LAYOUTS[world]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    results = {case: _sharded_case(*case, rows=rows, group=dist.group.WORLD) for case in SHARDED_CASES}
    torch.save({"results": results, "rows": (rows.start, rows.stop)}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_sampler_equals_single_process(tmp_path, world):
    run_group(_sharded_worker, world, str(tmp_path))
    dumps = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in SHARDED_CASES:
        single = _sharded_case(*case)
        assert (single["logp"] == float("-inf")).any() or case[2] == "softcap", case
        for dump in dumps:
            rows = slice(*dump["rows"])
            got = dump["results"][case]
            for key, value in got.items():
                want = single[key][rows] if key == "d_weight" else \
                    single[key][..., rows] if key == "d_first" and case[0] == "logits" else single[key]
                assert torch.equal(value == float("-inf"), want == float("-inf")), (case, key)
                finite = torch.isfinite(want)
                tol = 1e-9 if case[1] == "torch" and case[2] != "offset" else 2e-4
                torch.testing.assert_close(value[finite], want[finite], rtol=tol, atol=tol, msg=f"{case} {key}")


@pytest.mark.parametrize("impl,preset,changes", [
    ("torch", "SAPO", {}),
    # The Triton gradient routes: sequence tiles, and gradient in the forward with one factor (token-mean).
    ("triton", "SAPO", {}), ("triton", "GSPO", {}), ("triton", "SAPO", dict(loss_aggregation="token-mean",
                                                                          entropy_coef=0.3)),
])
def test_packed_sequences_take_a_temperature_per_sequence(impl, preset, changes):
    """cu_seqlens with a temperature per packed sequence ([S]) and truncation equals the padded call."""
    dtype = torch.float64 if impl == "torch" else torch.float32
    hidden, weight, targets = lm_head(12, dtype)
    likely = (hidden.double() @ weight.double().T).argmax(-1)
    targets[1, :2] = likely[1, :2]  # two drawn from the kept set, beside the least likely at [1, 3]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # the second sequence is 4 tokens long
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    g = torch.Generator().manual_seed(13)
    advantages = torch.randn(B, generator=g, dtype=dtype)
    old_logp = -2.0 + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    temperature = torch.tensor([0.9, 1.2], dtype=dtype)
    config = softpo.preset(preset).replace(**changes)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    padded = softpo.policy_loss(config, targets, mask, advantages, hidden=h, weight=w, old_logp=old_logp,
                                temperature=temperature, impl=impl, **TRUNCATING)
    padded_grads = torch.autograd.grad(padded.loss, (h, w))
    h_packed, w = hidden[mask].clone().requires_grad_(), weight.clone().requires_grad_()
    packed = softpo.policy_loss(config, targets[mask], torch.ones(int(mask.sum()), dtype=torch.bool), advantages,
                                hidden=h_packed, weight=w, old_logp=old_logp[mask], temperature=temperature,
                                impl=impl, cu_seqlens=cu, **TRUNCATING)
    packed_grads = torch.autograd.grad(packed.loss, (h_packed, w))
    tol = 1e-12 if impl == "torch" else 1e-6
    torch.testing.assert_close(packed.loss, padded.loss, rtol=tol, atol=tol)
    torch.testing.assert_close(packed_grads[0], padded_grads[0][mask], rtol=tol, atol=tol)
    torch.testing.assert_close(packed_grads[1], padded_grads[1], rtol=tol, atol=tol)
    assert torch.equal(packed.logp, padded.logp[mask])
    assert 0 < packed.metrics["outside_support"] == padded.metrics["outside_support"] < 1
