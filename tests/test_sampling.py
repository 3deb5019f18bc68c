"""softpo.sampling: the sampler's settings, its transform of the logits, and the per-row truncation thresholds
found over vocabulary chunks, against transformers' own warpers on materialized float64 logits."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from softpo import sampling
from softpo.sampling import SamplerTransform, ThresholdSearch, check_sampling_args, find_thresholds


def warped(z, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """The scores `generate` samples from: its warpers in its order, on z [n, V]."""
    ids = torch.zeros(z.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, z.clone()) if temperature != 1.0 else z.clone()
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores


def search_in_chunks(z, transform, chunk=97, candidates=sampling.TOP_P_CANDIDATES):
    """Thresholds of z [n, V] fed to the search one vocabulary chunk at a time, columns shuffled."""
    perm = torch.randperm(z.shape[1])

    def chunks_for(rows):
        part = z if rows is None else z[rows]
        for v0 in range(0, z.shape[1], chunk):
            yield part[:, perm[v0: v0 + chunk]]

    return find_thresholds(transform, z.shape[0], z.shape[1], chunks_for, z, candidates)


def kept_by_warpers(z, **settings):
    return torch.isfinite(warped(z, **settings)) & torch.isfinite(z)


def kept_by_threshold(z, threshold):
    keep = torch.isfinite(z)
    return keep if threshold is None else keep & (z >= threshold[:, None])


SETTINGS = [
    pytest.param(dict(top_k=50), id="topk50"),
    pytest.param(dict(top_k=1), id="topk1"),
    pytest.param(dict(top_p=0.9), id="topp0.9"),
    pytest.param(dict(top_p=0.3), id="topp0.3"),
    pytest.param(dict(min_p=0.05), id="minp0.05"),
    pytest.param(dict(min_p=1.0), id="minp1"),
    pytest.param(dict(top_k=20, top_p=0.8), id="topk20-topp0.8"),  # top-p's softmax is over the top-k set
    pytest.param(dict(top_k=300, top_p=0.95, min_p=0.01), id="all-three"),
    pytest.param(dict(top_p=0.5, min_p=0.2), id="topp-minp"),
]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_thresholds_give_the_warpers_kept_sets(settings, temperature):
    z = 2.5 * torch.randn(24, 1000, dtype=torch.float64)
    z[3, :700] = float("-inf")  # a row with a banned vocabulary
    transform = check_sampling_args(**settings)
    threshold = search_in_chunks(z / temperature, transform)
    expected = kept_by_warpers(z, temperature=temperature, **settings)
    assert torch.equal(kept_by_threshold(z / temperature, threshold), expected)


@pytest.mark.parametrize("settings", [
    pytest.param(dict(top_p=0.99), id="topp0.99"),
    pytest.param(dict(top_p=0.7, min_p=0.001), id="topp0.7-minp"),
    pytest.param(dict(top_k=400, top_p=0.95), id="topk400-topp0.95"),
])
def test_wide_nucleus_takes_the_exact_fallback(settings):
    # Flat rows: the nucleus spans hundreds of tokens, past the 16 candidates kept in the first sweep.
    z = 0.3 * torch.randn(10, 1000, dtype=torch.float64)
    z[0] = 5 * torch.randn(1000, dtype=torch.float64)  # one peaked row resolves from its candidates
    transform = check_sampling_args(**settings)
    search = ThresholdSearch(transform, 10, 1000, z, top_p_candidates=16)
    if not transform.top_k_active(1000):
        search.update(z)
        _, unresolved = search.finish()
        assert 0 < unresolved.numel() < 10
    threshold = search_in_chunks(z, transform, candidates=16)
    assert torch.equal(kept_by_threshold(z, threshold), kept_by_warpers(z, **settings))


def test_ties_at_the_boundaries():
    # Logits on a coarse grid: many exact ties at the k-th value and at the nucleus boundary.
    z = torch.randint(-6, 6, (32, 200)).double() * 0.5
    for settings in (dict(top_k=7), dict(top_k=30, min_p=0.2), dict(top_p=0.6), dict(top_k=40, top_p=0.9)):
        threshold = search_in_chunks(z, check_sampling_args(**settings), chunk=13, candidates=24)
        ours = kept_by_threshold(z, threshold)
        theirs = kept_by_warpers(z, **settings)
        # top-k keeps ties with the k-th value, as the warper does; at the top-p boundary every token tied
        # with the last kept one is kept, where the warper keeps the ones its sort happened to put first.
        last_kept = torch.where(theirs, z, float("inf")).amin(1, keepdim=True)
        assert torch.equal(ours, z >= last_kept), settings
        if "top_p" not in settings:
            assert torch.equal(ours, theirs), settings
        assert (ours | ~theirs).all()


@pytest.mark.parametrize("settings", [
    pytest.param(dict(top_k=0), id="topk0"),
    pytest.param(dict(top_k=1000), id="topk-V"),
    pytest.param(dict(top_k=5000), id="topk-over-V"),
    pytest.param(dict(top_p=1.0), id="topp1"),
    pytest.param(dict(min_p=0.0), id="minp0"),
    pytest.param(dict(), id="none"),
])
def test_no_truncation_gives_no_threshold(settings):
    z = torch.randn(4, 1000, dtype=torch.float64)
    assert search_in_chunks(z, check_sampling_args(**settings)) is None


def test_single_column_vocabulary():
    z = torch.randn(5, 1, dtype=torch.float64)
    for settings in (dict(top_k=1, top_p=0.5, min_p=0.5), dict(top_p=0.1)):
        threshold = search_in_chunks(z, check_sampling_args(**settings))
        assert threshold is None or torch.equal(kept_by_threshold(z, threshold), torch.ones_like(z, dtype=torch.bool))


def test_shards_merge_to_the_whole_row():
    # A vocab-parallel rank sees a slice: all-gathered candidates and log-sum-exps give the same thresholds.
    z = 2 * torch.randn(16, 600, dtype=torch.float64)
    for settings in (dict(top_p=0.9), dict(top_k=25, top_p=0.8, min_p=0.01)):
        transform = check_sampling_args(**settings)
        shards = []
        for part in z.split([250, 350], 1):
            s = ThresholdSearch(transform, 16, 600, z)
            s.update(part)
            shards.append(s)
        merged = ThresholdSearch(transform, 16, 600, z)
        merged.merge([s.candidates for s in shards], None if shards[0].lse is None else [s.lse for s in shards])
        threshold, unresolved = merged.finish()
        assert unresolved.numel() == 0
        assert torch.equal(kept_by_threshold(z, threshold), kept_by_warpers(z, **settings))


def test_process_matches_the_definition():
    x = 20 * torch.randn(6, 50, dtype=torch.float64)
    x[0, :3] = float("-inf")
    inv_t = 1 / torch.rand(6, dtype=torch.float64).add(0.5)
    for scale, cap in ((1.0, None), (0.0625, None), (2.0, 30.0), (-1.0, 5.0), (-0.5, None)):
        transform = check_sampling_args(logit_scale=scale, softcap=cap)
        z = x * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        z = torch.where(x == float("-inf"), x, z / (1 / inv_t[:, None]))
        out = sampling.process(x, transform, inv_t)
        assert torch.allclose(out, z, rtol=1e-6, atol=1e-9, equal_nan=False), (scale, cap)
        # The hand-formed chain rule equals autograd's.
        xg = x.clone().clamp(min=-100).requires_grad_()
        sampling.process(xg, transform, inv_t).sum().backward()
        grad = sampling.process_grad(xg.detach(), transform, inv_t).expand_as(xg)
        assert torch.allclose(grad, xg.grad, rtol=1e-6, atol=1e-12), (scale, cap)


@pytest.mark.parametrize("kwargs,name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_k=True), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"),
    (dict(softcap=0.0), "softcap"), (dict(softcap=-3.0), "softcap"), (dict(softcap=float("inf")), "softcap"),
    (dict(logit_scale=0.0), "logit_scale"), (dict(logit_scale=float("inf")), "logit_scale"),
    (dict(logit_scale=float("nan")), "logit_scale"),
])
def test_bad_settings_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        check_sampling_args(**kwargs)


def test_settings_normalize_no_truncation():
    t = check_sampling_args(top_k=0, min_p=0.0, top_p=1.0)
    assert t == SamplerTransform(top_p=1.0) and not t.truncates(10) and t.is_identity()
    assert check_sampling_args(logit_scale=0.0625, softcap=30).kernel_kwargs() == dict(logit_scale=0.0625,
                                                                                       softcap=30.0)


def test_temperature_shapes():
    targets_shape = (3, 5)
    assert sampling.check_temperature(0.7, targets_shape) == 0.7
    per_seq = sampling.check_temperature(torch.tensor([0.5, 1.0, 2.0]), targets_shape)
    assert per_seq.shape == targets_shape and per_seq.dtype == torch.float32 and (per_seq[:, 3] == per_seq[:, 0]).all()
    per_token = torch.rand(targets_shape) + 0.1
    assert torch.equal(sampling.check_temperature(per_token, targets_shape), per_token)
    assert sampling.check_temperature(torch.tensor(1.5), targets_shape) == 1.5
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, torch.tensor([1.0, 0.0, 1.0]),
                torch.tensor([1.0, float("nan"), 1.0]), torch.ones(5), torch.ones(3, 5, dtype=torch.long),
                torch.ones(3, 4)):
        with pytest.raises(ValueError, match="temperature"):
            sampling.check_temperature(bad, targets_shape)


def test_inverse_temperature_picks_rows():
    t = torch.tensor([[0.5, 2.0], [4.0, 1.0]])
    assert torch.equal(sampling.inverse_temperature(t, torch.tensor([3, 0])), torch.tensor([1.0, 2.0]))
    assert sampling.inverse_temperature(2.0) == 0.5
    assert math.isclose(sampling.inverse_temperature(3.0), 1 / 3)
