"""Loss aggregation with a caller's normalizer (global counts across ranks) and the plain token sum."""

import pytest
import torch

import softpo
from softpo import objectives

# Ragged lengths with an empty row: the sequence modes count sequences, the token modes tokens.
LENGTHS = [5, 0, 2, 7]


def batch():
    g = torch.Generator().manual_seed(0)
    terms = torch.randn(len(LENGTHS), 7, generator=g, dtype=torch.float64)
    mask = torch.arange(7).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    return terms, mask


def expected(mode, terms, mask, normalizer):
    rows = [terms[b, : LENGTHS[b]] for b in range(len(LENGTHS))]
    total = sum(r.sum() for r in rows)
    if mode == "token-sum":
        return total / normalizer
    if mode == "token-mean":
        return total / normalizer
    if mode == "seq-mean-token-mean":
        return sum(r.mean() for r in rows if len(r)) / normalizer
    if mode == "seq-mean-token-sum":
        return total / normalizer
    return total / (normalizer * 11)  # seq-mean-token-sum-norm with max_completion_length = 11


@pytest.mark.parametrize("mode", ["token-sum", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("normalizer", [0.5, 3.0])
def test_normalizer_replaces_the_local_count(mode, normalizer):
    terms, mask = batch()
    config = softpo.GRPO.replace(loss_aggregation=mode, max_completion_length=11)
    out = objectives.aggregate(config, terms, mask, normalizer)
    torch.testing.assert_close(out, expected(mode, terms, mask, normalizer))


def test_token_sum_without_normalizer_is_the_masked_sum():
    terms, mask = batch()
    terms[~mask] = float("nan")  # padded positions never leak in
    out = objectives.aggregate(softpo.GRPO.replace(loss_aggregation="token-sum"), terms, mask)
    torch.testing.assert_close(out, torch.where(mask, terms, 0.0).sum())


def test_cispo_floor_clamps_the_weight_from_below():
    logp = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.0, -1.0, -1.5], dtype=torch.float64)  # ratios e^-1, 1, e^0.5
    adv = torch.ones(3, dtype=torch.float64)
    config = softpo.CISPO.replace(epsilon_high=1.2, cispo_floor=0.8)
    terms = objectives.token_terms(config, logp, advantages=adv, old_logp=old)
    (grad,) = torch.autograd.grad(terms.sum(), logp)
    torch.testing.assert_close(grad, -torch.tensor([0.8, 1.0, 1.2], dtype=torch.float64))


def test_cispo_floor_must_be_nonnegative():
    with pytest.raises(ValueError, match="cispo_floor"):
        softpo.CISPO.replace(cispo_floor=-0.1)
