"""The gradients formed in the forward (hidden and logits paths, token- and sequence-level routes, memory default
and flat) are scaled in place by the loss's upstream gradient: returned untouched (the saved buffers themselves)
when it is 1, scaled exactly otherwise, never copied, and a second backward through one call is refused."""

import pytest
import torch

import softpo
from softpo import fused, tiles

from reference import loss_kwargs, random_lm_head_inputs

B, T, H, V = 2, 9, 16, 61

# (config, path, memory): every route whose backward returns gradients formed in the forward.
ROUTES = [
    pytest.param(softpo.SAPO, "hidden", "default", id="token-level-hidden-default"),
    pytest.param(softpo.SAPO, "hidden", "flat", id="token-level-hidden-flat"),
    pytest.param(softpo.GSPO, "hidden", "default", id="sequence-level-hidden-default"),
    pytest.param(softpo.GSPO, "hidden", "flat", id="sequence-level-hidden-flat"),
    pytest.param(softpo.SAPO, "logits", "default", id="token-level-logits-default"),
]
FUNCTIONS = {"hidden": fused.HiddenGradientInForwardFunction, "logits": fused.LogitsGradientInForwardFunction}


@pytest.fixture
def backward_record(monkeypatch):
    """For each backward of a gradient-in-forward Function: the storages of the tensors it saved, and the
    gradients it returned (with their storages), taken when it returns, while its saved tensors are still held."""
    records = []
    for function in FUNCTIONS.values():
        real = function.backward

        def backward(ctx, *grads, real=real):
            saved = {t.untyped_storage().data_ptr(): t.clone() for t in ctx.saved_tensors if t is not None}
            returned = real(ctx, *grads)
            records.append((saved, [g for g in returned if isinstance(g, torch.Tensor)]))
            return returned

        monkeypatch.setattr(function, "backward", staticmethod(backward))
    return records


def _leaves(path, seed=0):
    hidden, weight, targets = random_lm_head_inputs(B, T, H, V, seed=seed)
    leaves = [hidden.float(), weight.float()] if path == "hidden" else [(hidden @ weight.T).float()]
    return [x.requires_grad_() for x in leaves], targets


def _loss(config, path, memory, leaves, targets):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    kwargs = {k: v.float() for k, v in loss_kwargs(config, torch.zeros(B, T, dtype=torch.float64) - 3,
                                                   uses_rollout=False).items()}
    sweep = dict(hidden=leaves[0], weight=leaves[1]) if path == "hidden" else dict(logits=leaves[0])
    return softpo.policy_loss(config, targets, mask, impl="triton", memory=memory, **sweep, **kwargs).loss


@pytest.mark.parametrize("config, path, memory", ROUTES)
def test_upstream_gradient_one_returns_the_saved_gradients(backward_record, config, path, memory):
    leaves, targets = _leaves(path)
    _loss(config, path, memory, leaves, targets).backward()
    ((saved, returned),) = backward_record
    formed = [g for g in returned if g.untyped_storage().data_ptr() in saved]
    assert formed, "the gradients formed in the forward come back as the saved buffers themselves"
    for g in formed:
        assert torch.equal(g, saved[g.untyped_storage().data_ptr()]), "a factor of 1 leaves them untouched"


@pytest.mark.parametrize("config, path, memory", ROUTES)
@pytest.mark.parametrize("factor", [0.3, -2.5])
def test_factor_scales_the_formed_gradients_exactly_in_place(backward_record, config, path, memory, factor):
    leaves, targets = _leaves(path)
    _loss(config, path, memory, leaves, targets).backward()
    unscaled = [x.grad.clone() for x in leaves]
    scaled_leaves, _ = _leaves(path)
    (factor * _loss(config, path, memory, scaled_leaves, targets)).backward()
    (saved, returned) = backward_record[1]
    assert not _second_copies(saved, returned, scaled_leaves), "scaled where they lie"
    for leaf, base in zip(scaled_leaves, unscaled):
        formed_after = path == "hidden" and memory == "flat" and leaf.shape == (V, H)
        if formed_after:
            torch.testing.assert_close(leaf.grad, factor * base, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(leaf.grad, base * torch.tensor(factor), rtol=0, atol=0)


@pytest.mark.parametrize("config, path, memory", ROUTES)
def test_no_second_copy_of_the_formed_gradients_at_the_backward(backward_record, config, path, memory):
    """When the backward returns, its saved tensors are still held: a gradient of d weight's (d hidden's, d
    logits') shape in a storage of its own would be a second copy of that buffer alive at the backward's peak."""
    leaves, targets = _leaves(path)
    (0.5 * _loss(config, path, memory, leaves, targets)).backward()
    ((saved, returned),) = backward_record
    copies = _second_copies(saved, returned, leaves)
    assert not copies, f"second copies alive next to the saved gradients: {copies}"


def _second_copies(saved, returned, leaves):
    """Shapes of returned gradients in storages of their own next to a saved gradient of that shape (saved
    tensors other than the inputs are the gradients formed in the forward and the per-token gradients)."""
    inputs = {x.untyped_storage().data_ptr() for x in leaves}
    formed_shapes = {tuple(t.shape) for ptr, t in saved.items() if ptr not in inputs}
    return [tuple(g.shape) for g in returned
            if tuple(g.shape) in formed_shapes and g.untyped_storage().data_ptr() not in saved]


@pytest.mark.parametrize("config, path, memory", ROUTES)
def test_second_backward_through_one_call_is_refused(config, path, memory):
    leaves, targets = _leaves(path)
    loss = _loss(config, path, memory, leaves, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_routes_under_test_form_the_gradient_in_the_forward(monkeypatch):
    # The cases above are meaningful only if every one of them takes a gradient-in-forward Function.
    calls = []
    real = tiles.gradient_in_forward
    monkeypatch.setattr(tiles, "gradient_in_forward", lambda *a: calls.append(1) or real(*a))
    for param in ROUTES[:4]:
        config, path, memory = param.values
        leaves, targets = _leaves(path)
        _loss(config, path, memory, leaves, targets)
    assert len(calls) == 4
