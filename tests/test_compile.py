"""torch.compile(fullgraph=True) of a loss step that calls policy_loss / token_logprobs: no graph break,
and the same loss, metrics and gradients as the eager call, on both paths (the kernels under the
interpreter on CPU). backend="aot_eager" traces the forward and the backward through the same
machinery as inductor (AOT autograd over the custom ops and their fake versions) without a C++ build."""

import pytest
import torch

import softpo

B, T, H, V = 2, 5, 16, 97
CONFIGS = [
    pytest.param(softpo.SAPO, id="sapo"),
    pytest.param(softpo.GSPO, id="gspo"),
    pytest.param(softpo.SPO, id="spo"),
    pytest.param(softpo.GRPO.replace(beta=0.1, entropy_coef=0.01), id="grpo-kl-entropy"),
]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 4
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    extra = dict(advantages=torch.randn(B, generator=g), ref_logp=torch.randn(B, T, generator=g) * 0.1 - 4,
                 old_logp=torch.randn(B, T, generator=g) * 0.1 - 4, rewards=torch.rand(B, generator=g),
                 q0=-torch.rand(B, generator=g))
    return hidden, weight, targets, mask, extra


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compiled_policy_loss_matches_eager(config, source, impl):
    hidden, weight, targets, mask, extra = _inputs()
    if config.objective == "spo":
        extra.pop("advantages")
    else:
        extra.pop("rewards"), extra.pop("q0")

    def loss_fn(hidden, weight):
        sweep = {"hidden": hidden, "weight": weight} if source == "hidden" else {"logits": hidden @ weight.T}
        out = softpo.policy_loss(config, targets, mask, temperature=0.9, impl=impl, **sweep, **extra)
        return out.loss, out.logp, out.metrics

    compare_compiled_step(loss_fn, hidden, weight)


def compare_compiled_step(loss_fn, hidden, weight):
    """Run loss_fn(hidden, weight) -> (loss, logp, metrics) eager and compiled in one graph, forward and backward,
    and check they agree; returns the eager (loss, logp, metrics, d hidden, d weight)."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, logp, metrics = fn(h, w)
        loss.backward()
        results.append((loss.detach(), logp, {k: v.detach() for k, v in metrics.items()}, h.grad, w.grad))
    (loss0, logp0, m0, dh0, dw0), (loss1, logp1, m1, dh1, dw1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp1, logp0, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m0.keys()
    for key in m0:
        torch.testing.assert_close(m1[key], m0[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch.isfinite(dh1).all() and dh0.abs().sum() > 0 and dw0.abs().sum() > 0
    torch.testing.assert_close(dh1, dh0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw1, dw0, rtol=1e-5, atol=1e-6)
    return results[0]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compiled_token_logprobs_with_entropy(impl):
    hidden, weight, targets, _, _ = _inputs(1)

    def fn(hidden, weight):
        logp, entropy = softpo.token_logprobs(targets, hidden=hidden, weight=weight, temperature=1.3,
                                              return_entropy=True, impl=impl)
        return (logp * 2 - entropy).sum(), logp, entropy

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs = []
    for f in (fn, compiled):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        total, logp, entropy = f(h, w)
        total.backward()
        outs.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_the_torch_path():
    """The default backend too (a C++ build on CPU): one loss, forward and backward."""
    hidden, weight, targets, mask, extra = _inputs(2)

    def loss_fn(hidden, weight):
        return softpo.policy_loss(softpo.SAPO, targets, mask, extra["advantages"], hidden=hidden, weight=weight,
                                  impl="torch").loss

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = compiled(h, w)
    loss.backward()
    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_fn(h0, w0).backward()
    torch.testing.assert_close(loss, loss_fn(hidden, weight), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w0.grad, rtol=1e-5, atol=1e-6)


SAMPLERS = [
    pytest.param(dict(temperature="per-sequence"), id="temperature-per-sequence"),
    pytest.param(dict(logit_scale=0.7, softcap=3.0), id="scale-softcap"),
    pytest.param(dict(top_k=9, top_p=0.8, min_p=0.02, softcap=3.0), id="truncated"),
    pytest.param(dict(batch_invariant=True, temperature="per-sequence"), id="batch-invariant"),
]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compiled_sampler_settings_match_eager(sampler, source, impl):
    """The sampler's settings reach the custom ops as arguments: still one graph, the eager results."""
    hidden, weight, targets, mask, extra = _inputs(3)
    extra.pop("rewards"), extra.pop("q0")
    sampler = dict(sampler)
    if sampler.get("temperature") == "per-sequence":
        sampler["temperature"] = torch.tensor([0.8, 1.3])
    # Targets mostly among each row's likeliest, as a sampler's are; one at the least likely, outside any cut.
    logits = hidden @ weight.T
    targets = logits.topk(3, -1).indices[..., 1]
    targets[1, 2] = logits[1, 2].argmin()

    def loss_fn(hidden, weight):
        sweep = {"hidden": hidden, "weight": weight} if source == "hidden" else {"logits": hidden @ weight.T}
        out = softpo.policy_loss(softpo.SAPO.replace(entropy_coef=0.01), targets, mask, impl=impl, **sampler,
                                 **sweep, **extra)
        return out.loss, out.logp, out.metrics

    _, logp, metrics, _, _ = compare_compiled_step(loss_fn, hidden, weight)
    if "top_k" in sampler:
        assert metrics["outside_support"] > 0 and (logp == float("-inf")).any()
