"""policy_loss's metrics: computed at their first read (none of their kernels run in the loss call), equal to
the objective's eagerly computed ones, and right against first principles for the subtle ones."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import softpo
from softpo import objectives

from reference import all_configs, loss_kwargs

B, T, H, V = 3, 6, 8, 29


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (each a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _call(config, uses_rollout, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a sequence with no token
    logp0 = torch.log_softmax(hidden.detach() @ weight.T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kwargs = loss_kwargs(config, logp0, uses_rollout, seed=seed)
    advantages = kwargs.pop("advantages", None)
    out = softpo.policy_loss(config, targets, mask, advantages, hidden=hidden, weight=weight, impl="torch", **kwargs)
    return out, mask, advantages, kwargs


@pytest.mark.parametrize("config,uses_rollout", all_configs())
def test_lazy_metrics_equal_the_objectives(config, uses_rollout):
    out, mask, advantages, kwargs = _call(config, uses_rollout)
    _, expected = objectives.policy_objective(config, out.logp, mask, advantages, entropy=out.entropy, **kwargs)
    assert isinstance(out.metrics, softpo.LazyMetrics)
    assert set(out.metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-12, atol=1e-12, equal_nan=False, msg=name)
        assert out.metrics[name].dim() == 0 and not out.metrics[name].requires_grad, name


def test_metric_kernels_run_at_the_first_read_only():
    """The loss call launches none of the metrics' ops; the first read launches them, later reads none."""
    config = softpo.GRPO.replace(beta=0.04)
    with _CountOps() as call_lazy:
        out, *_ = _call(config, False)
    with _CountOps() as first_read:
        ratio_mean = out.metrics["ratio_mean"]
    with _CountOps() as second_read:
        assert dict(out.metrics)["ratio_mean"] is ratio_mean
    assert first_read.count > 20, first_read.count  # ratio, clip and KL metrics: dozens of small ops
    assert second_read.count == 0
    out.loss.backward()  # the loss itself needed none of them
    # The eager objective on the same inputs costs the lazy call's objective plus the metrics' ops.
    _, mask, advantages, kwargs = _call(config, False)
    with _CountOps() as loss_only:
        objectives.objective_loss(config, out.logp, mask, advantages, **kwargs)
    with _CountOps() as loss_and_metrics:
        objectives.policy_objective(config, out.logp, mask, advantages, **kwargs)
    assert loss_and_metrics.count - loss_only.count == first_read.count
    assert call_lazy.count > loss_only.count  # the sweep and validation ran in the call


def test_off_policy_kept_counts_the_off_policy_mask_alone():
    """With a top-entropy quantile too, off_policy_kept is the off-policy mask's own fraction (as TRL logs it),
    and the loss acts on the tokens both keep."""
    config = softpo.GRPO.replace(off_policy_mask_threshold=0.0, top_entropy_quantile=0.5)
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    advantages = torch.tensor([-1.0], dtype=torch.float64)
    # The sequence's mean old_logp - logp is 0.5, above the threshold 0: with A < 0 it is dropped whole.
    old = logp + 0.5
    entropy = torch.tensor([[0.1, 0.2, 3.0, 4.0]], dtype=torch.float64)
    loss, metrics = objectives.policy_objective(config, logp, mask, advantages, old_logp=old, entropy=entropy)
    keep = objectives.off_policy_keep(config, logp, old, mask, advantages.unsqueeze(-1))
    assert float(metrics["off_policy_kept"]) == float(keep.double().mean())
    assert float(metrics["off_policy_kept"]) == 0.0 and float(metrics["policy_loss"]) == 0.0
    # Kept by the off-policy mask (A > 0): the fraction is 1 though the top-entropy mask keeps half.
    _, metrics = objectives.policy_objective(config, logp, mask, -advantages, old_logp=old, entropy=entropy)
    assert float(metrics["off_policy_kept"]) == 1.0


def test_ratio_and_clip_metrics_from_first_principles():
    config = softpo.GRPO
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    old = logp - torch.tensor([[0.5, 0.0, -0.5], [0.1, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    _, m = objectives.policy_objective(config, logp, mask, advantages, old_logp=old)
    ratios = torch.tensor([0.5, 0.0, -0.5, 0.1], dtype=torch.float64).exp()
    torch.testing.assert_close(m["ratio_mean"], ratios.mean())
    torch.testing.assert_close(m["ratio_min"], ratios.min())
    torch.testing.assert_close(m["ratio_max"], ratios.max())
    # e^0.5 > 1.2 with A > 0 is clipped high; e^-0.5 < 0.8 has A > 0 (not clipped); e^0.1 with A < 0 is in range.
    assert float(m["clip_fraction_high"]) == 0.25 and float(m["clip_fraction_low"]) == 0.0


@pytest.mark.parametrize("path", ["hidden", "logits"])
@pytest.mark.parametrize("config", [softpo.GRPO.replace(beta=0.04), softpo.SAPO.replace(entropy_coef=0.01),
                                    softpo.CISPO], ids=["grpo-kl", "sapo-entropy", "cispo"])
def test_metrics_of_the_fused_routes(config, path):
    """With the terms evaluated in the kernel epilogue, the ratio metrics are formed at the first read: the same
    values as the objective's own on the same log-probs."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    inputs = {"logits": (hidden @ weight.T).requires_grad_()} if path == "logits" else {
        "hidden": hidden.requires_grad_(), "weight": weight}
    advantages = torch.randn(B, generator=g)
    old_logp = torch.randn(B, T, generator=g) * 0.2 - 3
    ref_logp = torch.randn(B, T, generator=g) * 0.2 - 3
    out = softpo.policy_loss(config, targets, mask, advantages, old_logp=old_logp, ref_logp=ref_logp, impl="triton",
                             **inputs)
    out.loss.backward()
    _, expected = objectives.policy_objective(config, out.logp, mask, advantages, old_logp=old_logp,
                                              ref_logp=ref_logp, entropy=out.entropy)
    assert set(out.metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
