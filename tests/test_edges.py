"""Edges of the vocabulary sweep on both paths: -inf logits (masked vocabularies, padded vocab rows) and
logits so large that a cancelling entropy formula loses digits in fp32."""

import pytest
import torch

import softpo
from softpo import chunked

from reference import TOLERANCE, assert_close_to_gt, reference_logprobs

pytestmark = pytest.mark.usefixtures("poison_empty")

N, V = 6, 200
# The Triton interpreter's vocabulary block and the chunked path's vocabulary chunk (set below) are 64.
CHUNK = 64
PATHS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "VOCAB_CHUNK", CHUNK)
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 4)


def _neg_inf_pattern(name, targets):
    blocked = torch.zeros(N, V, dtype=torch.bool)
    if name == "one-column":
        blocked[:, 3] = True
    elif name == "half":
        blocked[:, ::2] = True
    elif name == "all-but-target":
        blocked[:] = True
    elif name == "first-chunk":
        blocked[:, :CHUNK] = True
    blocked[torch.arange(N), targets] = False  # the target itself stays finite: logp is finite
    return blocked


def _finite_reference(z, targets, temperature):
    """float64 log-prob and entropy with -inf as -1e4: exp underflows to exactly 0 there, as for -inf,
    but 0 * -1e4 is 0 where 0 * -inf is NaN, so autograd gives those columns their true zero gradient."""
    z = torch.where(torch.isinf(z), torch.full_like(z, -1e4), z)
    return reference_logprobs(targets, logits=z, temperature=temperature)


@pytest.mark.parametrize("pattern", ["one-column", "half", "all-but-target", "first-chunk"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_negative_infinite_logits(path, dtype, pattern):
    if path == "triton" and dtype == torch.float64:
        pytest.skip("the kernels sweep in fp32; float64 is the torch path's")
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (N,), generator=g)
    z64 = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    z64 = z64.masked_fill(_neg_inf_pattern(pattern, targets), float("-inf"))
    g_logp, g_entropy = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

    gt_z = z64.to(dtype).double().requires_grad_()
    gt_logp, gt_entropy = _finite_reference(gt_z, targets, 0.9)
    (gt_logp * g_logp + gt_entropy * g_entropy).sum().backward()

    z = z64.to(dtype).requires_grad_()
    logp, entropy = softpo.token_logprobs(targets, logits=z, temperature=0.9, return_entropy=True, impl=path)
    (logp.double() * g_logp + entropy.double() * g_entropy).sum().backward()
    tol = TOLERANCE[dtype]
    for what, out, gt in (("logp", logp, gt_logp), ("entropy", entropy, gt_entropy), ("d logits", z.grad, gt_z.grad)):
        assert torch.isfinite(out).all(), f"{what} is not finite"
        torch.testing.assert_close(out.double(), gt.detach(), rtol=tol, atol=tol, msg=what)
    assert (z.grad[torch.isinf(z64)] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_entropy_of_large_logits_in_fp32(path, source):
    """Logits around 1e3: lse - sum p z cancels ~1e3 to leave an entropy of a few nats, losing about
    four digits in fp32; the sweeps keep their sums relative to the running max instead."""
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, V, (N,), generator=g)
    if source == "logits":
        z64 = 1000 + torch.randn(N, V, generator=g, dtype=torch.float64) * 2
        inputs = {"logits": z64.float()}
        gt_inputs = {"logits": z64.float().double()}
    else:
        hidden = 1000 + torch.randn(N, 8, generator=g, dtype=torch.float64)
        weight = torch.randn(V, 8, generator=g, dtype=torch.float64) * 0.002 + 0.125
        inputs = {"hidden": hidden.float(), "weight": weight.float()}
        gt_inputs = {"hidden": hidden.float().double(), "weight": weight.float().double()}
    _, gt_entropy = reference_logprobs(targets, **gt_inputs)
    _, ref_entropy = reference_logprobs(targets, **inputs)
    _, entropy = softpo.token_logprobs(targets, return_entropy=True, impl=path, **inputs)
    assert gt_entropy.min() > 0.5  # a spread-out distribution, where the cancellation shows
    assert_close_to_gt(entropy, ref_entropy, gt_entropy, torch.float32, "entropy")
