"""Packed sequences (`cu_seqlens=`): the loss, log-probs, entropy, metrics and every gradient equal the padded call
on [S, longest] built from the same sequences, for every preset and option, both paths (hidden, logits), both
impls (Triton under the interpreter), the sequence-tile route and a 2-rank vocab-parallel lm_head; each bad
cu_seqlens is refused by name."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

import softpo
from softpo import checks, fused, tiles as tile_engine

from distributed import run_group
from reference import TOLERANCE, assert_close_to_gt

# Different lengths, one of length 1 and an empty one (cu_seqlens repeats a value); tokens 1 and 6 are masked
# inside their sequences, and the last sequence has no valid token at all.
LENGTHS = [3, 1, 0, 5, 2, 2]
MASKED = [1, 6, 11, 12]
CU = [0]
for _length in LENGTHS:
    CU.append(CU[-1] + _length)
S, N, T = len(LENGTHS), CU[-1], max(LENGTHS)
H, V = 8, 13


def _padded(x, fill=0):
    """[N, ...] -> [S, T, ...], sequence by sequence."""
    out = x.new_full((S, T) + tuple(x.shape[1:]), fill)
    for s, (a, b) in enumerate(zip(CU, CU[1:])):
        out[s, : b - a] = x[a:b]
    return out


def _unpadded(x):
    """[S, T, ...] -> [N, ...]."""
    return torch.cat([x[s, : b - a] for s, (a, b) in enumerate(zip(CU, CU[1:]))])


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2 / math.sqrt(H))
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    mask[MASKED] = False
    return hidden, weight, targets, mask


def _loss_inputs(config, *, rollout=False, per_token_advantages=False, ratio=None, seed=1):
    """Packed float64 loss inputs for `config`: per-token ones [N], per-sequence ones [S]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.full((N,), -2.5, dtype=torch.float64)
    kwargs = {"old_logp": base + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)}
    if config.needs_ref:
        kwargs["ref_logp"] = base + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    if rollout:
        kwargs["rollout_logp"] = kwargs["old_logp"] + 0.2 * torch.randn(N, generator=g, dtype=torch.float64)
    if ratio == "token":
        kwargs["importance_sampling_ratio"] = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    elif ratio == "sequence":
        kwargs["importance_sampling_ratio"] = 0.5 + torch.rand(S, generator=g, dtype=torch.float64)
    if config.objective == "spo":
        kwargs["rewards"] = torch.rand(S, generator=g, dtype=torch.float64)
        kwargs["q0"] = -0.5 * torch.rand(S, generator=g, dtype=torch.float64)
    else:
        kwargs["advantages"] = torch.randn(N if per_token_advantages else S, generator=g, dtype=torch.float64)
    return kwargs


def _call(config, kwargs, *, packed, source, impl, dtype, seed=0, leading_one=False, **options):
    """One policy_loss call, packed or on the padded [S, T] batch; every result in the packed layout, float64."""
    hidden, weight, targets, mask = _inputs(seed)
    kwargs = dict(kwargs)
    if packed:
        options["cu_seqlens"] = torch.tensor(CU, dtype=torch.int32)
    else:
        hidden, targets, mask = _padded(hidden), _padded(targets), _padded(mask, False)
        kwargs = {k: _padded(v) if v.shape == (N,) else v for k, v in kwargs.items()}
        if kwargs.get("importance_sampling_ratio", torch.zeros(0)).shape == (S,):
            kwargs["importance_sampling_ratio"] = kwargs["importance_sampling_ratio"][:, None]  # [B, 1] padded
    if leading_one:
        hidden, targets, mask = hidden[None], targets[None], mask[None]
        kwargs = {k: v[None] if v.shape == (N,) else v for k, v in kwargs.items()}
    weight = weight.to(dtype).requires_grad_()
    hidden = hidden.to(dtype).requires_grad_()
    if source == "hidden":
        sweep = {"hidden": hidden, "weight": weight}
    else:
        sweep = {"logits": (hidden.detach() @ weight.detach().T).requires_grad_()}
    out = softpo.policy_loss(config, targets, mask, temperature=0.9, impl=impl, **sweep, **kwargs, **options)
    if torch.is_grad_enabled():
        out.loss.backward()
    layout = (lambda x: x.reshape(N, *x.shape[1 + leading_one:])) if packed else _unpadded
    result = {"loss": out.loss.detach(), "logp": layout(out.logp)}
    if out.entropy is not None:
        result["entropy"] = layout(out.entropy)
    if torch.is_grad_enabled():
        if source == "hidden":
            result.update(d_hidden=layout(hidden.grad), d_weight=weight.grad)
        else:
            result["d_logits"] = layout(sweep["logits"].grad)
        if not packed:
            # The padded call's padding rows get no gradient: dropping them loses nothing.
            grad = hidden.grad if source == "hidden" else sweep["logits"].grad
            padding = ~_padded(torch.ones(N, dtype=torch.bool), False)
            assert bool((grad[padding] == 0).all())
    result.update({f"metric {k}": v for k, v in out.metrics.items()})
    return {k: v.detach().double() for k, v in result.items()}


def _assert_equal(got, want, what):
    assert set(got) == set(want), what
    for key in want:
        tol = TOLERANCE[torch.float64] * (1 + want[key].abs())
        error = (got[key] - want[key]).abs()
        assert bool((error <= tol).all()), f"{what} {key}: {error.max():.3e}"


def _length_config(config):
    # Dr.GRPO divides by the completion length: with packing it must be the config's, on both calls.
    if config.loss_aggregation == "seq-mean-token-sum-norm":
        return config.replace(max_completion_length=7)
    return config


def _preset_params():
    """Every preset, KL on and off, entropy on and off."""
    params = []
    for name, config in softpo.PRESETS.items():
        for kl in (False, True):
            for entropy in (False, True):
                changed = config
                if kl and config.objective == "policy":
                    changed = changed.replace(beta=0.04)
                if entropy:
                    changed = changed.replace(entropy_coef=0.01)
                if kl and config.objective == "spo":
                    changed = changed.replace(spo_loss="bce")  # SPO always reads ref_logp: vary its loss instead
                kl_id = ("bce" if kl else "squared") if config.objective == "spo" else ("kl" if kl else "nokl")
                ident = f"{name}-{kl_id}-{'entropy' if entropy else 'noentropy'}"
                params.append(pytest.param(_length_config(changed), {}, id=ident))
    return params


OPTIONS = [
    pytest.param(softpo.GRPO.replace(loss_aggregation="token-sum"), {}, id="grpo-token-sum"),
    pytest.param(softpo.GRPO.replace(loss_aggregation="seq-mean-token-sum"), {}, id="grpo-seq-mean-token-sum"),
    pytest.param(softpo.DR_GRPO.replace(max_completion_length=4), {}, id="drgrpo-maxlen-below-longest"),
    pytest.param(softpo.SAPO, {"per_token_advantages": True}, id="sapo-token-advantages"),
    pytest.param(softpo.GSPO, {"per_token_advantages": True}, id="gspo-token-advantages"),
    pytest.param(softpo.GRPO.replace(delta=1.5, use_bias_correction_kl=True, beta=0.04), {}, id="grpo-dual-clip-kl"),
    pytest.param(softpo.DAPO.replace(top_entropy_quantile=0.4, entropy_coef=0.01), {}, id="dapo-top-entropy"),
    pytest.param(softpo.GSPO.replace(off_policy_mask_threshold=0.0), {}, id="gspo-off-policy"),
    pytest.param(softpo.SAPO.replace(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_cap=1.2),
                 {"rollout": True}, id="sapo-rollout-token_mask"),
    pytest.param(softpo.GRPO.replace(vllm_importance_sampling_mode="sequence_truncate",
                                     vllm_importance_sampling_cap=1.5), {"rollout": True}, id="grpo-rollout-sequence"),
    pytest.param(softpo.GSPO.replace(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_cap=1.5),
                 {"rollout": True}, id="gspo-rollout-sequence_mask"),
    pytest.param(softpo.VESPO, {"rollout": True}, id="vespo-rollout"),
    pytest.param(softpo.CISPO, {"ratio": "token"}, id="cispo-given-ratio-per-token"),
    pytest.param(softpo.GSPO, {"ratio": "sequence"}, id="gspo-given-ratio-per-sequence"),
    pytest.param(softpo.GRPO.replace(use_adaptive_entropy=True), {}, id="grpo-adaptive-entropy"),
]


@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("config,how", _preset_params() + OPTIONS)
def test_packed_equals_padded_torch(config, how, source):
    kwargs = _loss_inputs(config, **how)
    call = dict(source=source, impl="torch", dtype=torch.float64)
    want = _call(config, kwargs, packed=False, **call)
    got = _call(config, kwargs, packed=True, **call)
    _assert_equal(got, want, "packed")


def test_leading_one_and_int64_boundaries():
    # [1, total] inputs, as a padding-free trainer's batch of one row holds them, come back as [1, total].
    config = softpo.GSPO.replace(entropy_coef=0.01, beta=0.04)
    kwargs = _loss_inputs(config, per_token_advantages=True)
    call = dict(source="hidden", impl="torch", dtype=torch.float64)
    want = _call(config, kwargs, packed=False, **call)
    got = _call(config, kwargs, packed=True, leading_one=True, **call)
    _assert_equal(got, want, "[1, total]")
    hidden, weight, targets, mask = _inputs()
    out = softpo.policy_loss(config, targets[None], mask[None], kwargs["advantages"][None], hidden=hidden[None],
                             weight=weight, old_logp=kwargs["old_logp"][None], ref_logp=kwargs["ref_logp"][None],
                             cu_seqlens=torch.tensor(CU, dtype=torch.int64))
    assert out.logp.shape == (1, N) and out.entropy.shape == (1, N)


def test_module_passes_cu_seqlens():
    config = softpo.SAPO.replace(entropy_coef=0.01)
    kwargs = _loss_inputs(config)
    hidden, weight, targets, mask = _inputs()
    cu = torch.tensor(CU)
    function = softpo.policy_loss(config, targets, mask, hidden=hidden, weight=weight, cu_seqlens=cu, **kwargs)
    module = softpo.PolicyLoss(config)(targets, mask, hidden=hidden, weight=weight, cu_seqlens=cu, **kwargs)
    assert torch.equal(function.loss, module.loss) and torch.equal(function.logp, module.logp)


def test_token_logprobs_takes_packed_rows_as_they_are():
    # Per token already: packed rows need no boundaries, and give the padded call's log-probs.
    hidden, weight, targets, _ = _inputs()
    packed = softpo.token_logprobs(targets, hidden=hidden, weight=weight, return_entropy=True)
    padded = softpo.token_logprobs(_padded(targets), hidden=_padded(hidden), weight=weight, return_entropy=True)
    for got, want in zip(packed, padded):
        torch.testing.assert_close(got, _unpadded(want), rtol=0, atol=1e-12)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 6 rows (the longest sequence is 5), so that the hidden path sweeps several tiles; records the
    sequence tiles of the sequence-gradient route."""
    monkeypatch.setattr(tile_engine, "TILE_BYTES", 6 * V * 4)
    calls = []
    real = fused.HiddenGradientInForwardFunction.apply
    monkeypatch.setattr(fused.HiddenGradientInForwardFunction, "apply",
                        staticmethod(lambda *a: calls.append(a[3]) or real(*a)))
    return calls


def _triton_params():
    """Every preset with KL and entropy both off and both on; a sampler correction and a top-entropy mask."""
    params = [p for p in _preset_params()
              if p.id.endswith(("-nokl-noentropy", "-kl-entropy", "-squared-noentropy", "-bce-entropy"))]
    return params + [p for p in OPTIONS if p.id in ("gspo-rollout-sequence_mask", "sapo-rollout-token_mask",
                                                    "dapo-top-entropy", "gspo-token-advantages")]


@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("config,how", _triton_params())
def test_packed_equals_padded_triton(small_tiles, config, how, source):
    kwargs = _loss_inputs(config, **how)
    gt = _call(config, kwargs, packed=False, source=source, impl="torch", dtype=torch.float64)
    ref = _call(config, kwargs, packed=False, source=source, impl="triton", dtype=torch.float32)
    small_tiles.clear()
    out = _call(config, kwargs, packed=True, source=source, impl="triton", dtype=torch.float32)
    sequence_route = source == "hidden" and not config.per_token_terms and config.top_entropy_quantile == 1
    if sequence_route:
        (tiles,) = small_tiles
        assert tiles is not None and len(tiles) >= 2, "the sequence-tile route was not taken"
        assert all(t.numel() <= 6 for t in tiles)
        # Each tile holds whole sequences: contiguous packed rows.
        rows = torch.cat(tiles)
        assert torch.equal(rows, torch.arange(N)[_inputs()[3]])
    assert set(out) == set(gt)
    for key in gt:
        assert_close_to_gt(out[key], ref[key], gt[key], torch.float32, key)


@pytest.mark.parametrize("config", [pytest.param(softpo.GRPO.replace(beta=0.04), id="grpo-kl"),
                                    pytest.param(softpo.SAPO.replace(entropy_coef=0.01), id="sapo-entropy")])
def test_packed_terms_route_without_gradient(config):
    # No gradient wanted: token-level objectives take the epilogue's terms, on the packed rows.
    kwargs = _loss_inputs(config, per_token_advantages=True)
    with torch.no_grad():
        gt = _call(config, kwargs, packed=False, source="hidden", impl="torch", dtype=torch.float64)
        ref = _call(config, kwargs, packed=False, source="hidden", impl="triton", dtype=torch.float32)
        out = _call(config, kwargs, packed=True, source="hidden", impl="triton", dtype=torch.float32)
    for key in gt:
        assert_close_to_gt(out[key], ref[key], gt[key], torch.float32, key)


@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("config", [
    pytest.param(softpo.GSPO.replace(beta=0.04, entropy_coef=0.01), id="gspo-kl-entropy"),
    pytest.param(softpo.DAPO.replace(entropy_coef=0.01), id="dapo-entropy"),
])
def test_packed_flat_memory_and_normalizer(small_tiles, config, source):
    # memory="flat" and a caller's normalizer change how the gradient is formed and scaled, not the layout.
    kwargs = _loss_inputs(config)
    options = dict(source=source, memory="flat", normalizer=7.0)
    gt = _call(config, kwargs, packed=False, impl="torch", dtype=torch.float64, **options)
    ref = _call(config, kwargs, packed=False, impl="triton", dtype=torch.float32, **options)
    out = _call(config, kwargs, packed=True, impl="triton", dtype=torch.float32, **options)
    for key in gt:
        assert_close_to_gt(out[key], ref[key], gt[key], torch.float32, key)


VOCAB_PARALLEL = [
    ("gspo-kl-entropy", softpo.GSPO.replace(beta=0.04, entropy_coef=0.01), "hidden"),
    ("sapo-entropy", softpo.SAPO.replace(entropy_coef=0.01), "logits"),
    ("spo", softpo.SPO, "hidden"),
    ("drgrpo", _length_config(softpo.DR_GRPO), "logits"),
]
SHARDS = [(0, 6), (6, V)]  # uneven rows of the vocabulary


def _sharded_call(config, source, rows, group):
    hidden, weight, targets, mask = _inputs()
    hidden = hidden.requires_grad_()
    shard = weight[rows[0]:rows[1]].clone().requires_grad_()
    if source == "hidden":
        sweep = {"hidden": hidden, "weight": shard}
    else:
        sweep = {"logits": (hidden.detach() @ weight.T)[:, rows[0]:rows[1]].clone().requires_grad_()}
    out = softpo.policy_loss(config, targets, mask, temperature=0.9, impl="torch", process_group=group,
                             cu_seqlens=torch.tensor(CU), **sweep, **_loss_inputs(config))
    out.loss.backward()
    result = {"loss": out.loss, "logp": out.logp}
    if out.entropy is not None:
        result["entropy"] = out.entropy
    if source == "hidden":
        result.update(d_hidden=hidden.grad, d_weight=shard.grad)
    else:
        result["d_logits"] = sweep["logits"].grad
    result.update({f"metric {k}": v for k, v in out.metrics.items()})
    return {k: v.detach().double() for k, v in result.items()}


def _vocab_parallel_worker(rank, world, out_dir):
    results = {name: _sharded_call(config, source, SHARDS[rank], dist.group.WORLD)
               for name, config, source in VOCAB_PARALLEL}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_packed_vocab_parallel_equals_padded(tmp_path):
    run_group(_vocab_parallel_worker, 2, str(tmp_path), timeout_s=240)
    for rank, (start, stop) in enumerate(SHARDS):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, config, source in VOCAB_PARALLEL:
            want = _call(config, _loss_inputs(config), packed=False, source=source, impl="torch",
                         dtype=torch.float64)
            if source == "hidden":
                want["d_weight"] = want["d_weight"][start:stop]
            else:
                want["d_logits"] = want["d_logits"][:, start:stop]
            _assert_equal(got[name], want, f"rank {rank} {name}")


def _bad(**changes):
    config = changes.pop("config", softpo.GRPO)
    hidden, weight, targets, mask = _inputs()
    kwargs = dict(hidden=hidden, weight=weight, cu_seqlens=torch.tensor(CU), **_loss_inputs(config))
    kwargs.update(changes)
    args = (config, kwargs.pop("targets", targets), kwargs.pop("mask", mask))
    return lambda: softpo.policy_loss(*args, **kwargs)


@pytest.mark.parametrize("call,message", [
    pytest.param(_bad(cu_seqlens=torch.tensor(CU, dtype=torch.float32)), "cu_seqlens must be an int32 or int64",
                 id="float-dtype"),
    pytest.param(_bad(cu_seqlens=CU), "cu_seqlens must be an int32 or int64", id="a-list"),
    pytest.param(_bad(cu_seqlens=torch.tensor([CU, CU])), r"cu_seqlens must be a 1-D tensor \[S \+ 1\]",
                 id="two-dimensional"),
    pytest.param(_bad(cu_seqlens=torch.tensor([], dtype=torch.int64)), "cu_seqlens must be a 1-D", id="empty"),
    pytest.param(_bad(cu_seqlens=torch.tensor([1] + CU[1:])), "cu_seqlens must start at 0, got 1", id="not-from-0"),
    pytest.param(_bad(cu_seqlens=torch.tensor([0, 4, 3, 8, 10, 12, N])), "cu_seqlens must be non-decreasing",
                 id="decreasing"),
    pytest.param(_bad(cu_seqlens=torch.tensor(CU[:-1] + [N - 1])),
                 f"cu_seqlens must end at the number of tokens, {N}, got {N - 1}", id="short-of-total"),
    pytest.param(_bad(cu_seqlens=torch.tensor(CU[:-1] + [N + 3])),
                 f"cu_seqlens must end at the number of tokens, {N}, got {N + 3}", id="past-total"),
    pytest.param(_bad(cu_seqlens=torch.tensor(CU, device="meta")), "cu_seqlens is on meta but targets is on cpu",
                 id="other-device"),
    pytest.param(_bad(targets=torch.zeros(2, N // 2, dtype=torch.long)), r"targets must be a \[total\] or \[1, total\]",
                 id="targets-2d"),
    pytest.param(_bad(advantages=torch.zeros(S + 1, dtype=torch.float64)), r"advantages must have shape \[S\]",
                 id="advantages-shape"),
    pytest.param(_bad(old_logp=torch.zeros(S, T, dtype=torch.float64)), r"old_logp must have shape \[total\]",
                 id="old_logp-padded"),
    pytest.param(_bad(config=softpo.SPO, rewards=torch.zeros(N, dtype=torch.float64)), "rewards must have shape",
                 id="rewards-per-token"),
    pytest.param(_bad(config=softpo.DR_GRPO), "config.max_completion_length is required with cu_seqlens",
                 id="drgrpo-without-length"),
])
def test_bad_packed_inputs_raise_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_boundaries_are_read_in_the_one_host_sync(monkeypatch):
    # cu_seqlens' values (for the padded layout's shape) come back with the value checks and valid counts.
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or real_tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("an extra host sync (item)"))
    config = softpo.GSPO.replace(beta=0.04)
    hidden, weight, targets, mask = _inputs()
    kwargs = _loss_inputs(config)
    inputs = checks.validate_loss_inputs(
        config, targets, mask, kwargs.pop("advantages"), hidden, weight, None, kwargs["old_logp"],
        kwargs["ref_logp"], None, None, None, None, 1.0, None, "torch", "default", check_targets=True,
        cu_seqlens=torch.tensor(CU),
    )
    assert len(reads) == 1
    assert inputs.valid_counts == [3 - 1, 1, 0, 5 - 1, 2, 0]
    assert inputs.mask.shape == (S, T)
