"""The Triton sweeps (softpo.fused and softpo.tiles over softpo.kernels) against materialized float64 references.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest) on small shapes; with CUDA the
same tests run compiled, plus production-sized shapes.
"""

import math

import pytest
import torch

import softpo
from softpo.kernels import logits as logits_sweep
from softpo import objectives, tiles
from softpo.fused import triton_fused_token_terms, triton_token_logprobs

from compile_sm90 import compile_in_a_fresh_process
from reference import (
    all_configs,
    assert_close_to_gt,
    assert_norm_close_to_gt,
    loss_kwargs,
    reference_logprobs,
    reference_policy_loss,
)

pytestmark = [
    pytest.mark.usefixtures("poison_empty"),
    # The interpreter evaluates masked-out lanes too (log 0, inf * 0) before where() discards them.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case(N, H, V, dtype, why, **extra):
    tags = "".join(f"-{v if isinstance(v, str) else k}" for k, v in extra.items() if v and k != "tile_rows")
    tags += f"-tiles{extra['tile_rows']}" if extra.get("tile_rows") else ""
    return pytest.param(N, H, V, dtype, extra, id=f"N{N}-H{H}-V{V}-{DTYPE_NAMES[dtype]}{tags}", marks=())


SHAPES = [
    _case(1, 16, 1, torch.float32, "one token, one-word vocabulary: logp is exactly 0"),
    _case(1, 8, 1000, torch.bfloat16, "one token, H below one tile"),
    _case(63, 40, 97, torch.bfloat16, "odd H and V, ragged last tiles both ways", masked=True),
    _case(45, 40, 300, torch.float16, "valid tokens in tiles of 8, the last one ragged", masked=True, tile_rows=8),
    _case(63, 64, 1000, torch.float16, "many vocabulary tiles", masked=True),
    _case(33, 40, 1000, torch.float32, "strided hidden and transposed weight", noncontig=True, masked=True),
    _case(17, 24, 97, torch.bfloat16, "every token masked", all_masked=True),
]
if CUDA:
    SHAPES += [
        _case(300, 4096, 151936, torch.bfloat16, "production vocabulary and width", masked=True),
        _case(129, 4096, 32003, torch.float32, "production width, odd vocabulary, fp32 (tf32x3 dots)"),
    ]


def _inputs(N, H, V, extra, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2 / math.sqrt(H))
    targets = torch.randint(0, V, (N,), generator=g)
    if extra.get("all_masked"):
        valid = torch.zeros(N, dtype=torch.bool)
    elif extra.get("masked"):
        valid = torch.rand(N, generator=g) < 0.6
    else:
        valid = None
    if valid is not None:
        # Masked tokens may hold any target; the API passes 0.
        targets = torch.where(valid, targets, 0)
    g_logp = torch.randn(N, generator=g, dtype=torch.float64)
    g_entropy = torch.randn(N, generator=g, dtype=torch.float64)
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [move(t) for t in (hidden, weight, targets, valid, g_logp, g_entropy)]


def _strided(x, kind):
    """The same values with other strides: a transposed copy, or a view into a wider buffer."""
    if kind == "transposed":
        return x.T.contiguous().T
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    view = wide[:, ::2] if kind == "every_other" else wide[:, : x.shape[1]]
    view.copy_(x)
    return view


def _run(fn, inputs, targets, valid, g_logp, g_entropy, temperature):
    logp, entropy = fn(targets, temperature=temperature, **inputs)
    if valid is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
    (logp.double() * g_logp + entropy.double() * g_entropy).sum().backward()
    return [logp, entropy] + [inputs[k].grad for k in sorted(inputs)]


def _reference(targets, **kw):
    return reference_logprobs(targets, **kw)


def _ours(valid):
    return lambda targets, **kw: triton_token_logprobs(targets, return_entropy=True, valid=valid, **kw)


def _check_all(out, ref, gt, dtype, names):
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    for name, o, r, e in zip(names, out, ref, gt):
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        if name == "d_weight" and dtype in (torch.bfloat16, torch.float16):
            # d logits enter the d weight matmul rounded to the inputs' dtype, as in plain torch.
            assert_norm_close_to_gt(o, r, e, dtype, name)
        else:
            assert_close_to_gt(o, r, e, dtype, name)


def _small_tiles(monkeypatch, rows, V, dtype):
    # Production shapes take several logits tiles; force that on small ones.
    monkeypatch.setattr(tiles, "TILE_BYTES", rows * V * dtype.itemsize)


@pytest.mark.parametrize("N,H,V,dtype,extra", SHAPES)
def test_hidden_path_matches_reference(monkeypatch, N, H, V, dtype, extra):
    if extra.get("tile_rows"):
        _small_tiles(monkeypatch, extra["tile_rows"], V, dtype)
    hidden, weight, targets, valid, g_logp, g_entropy = _inputs(N, H, V, extra)
    temperature = 0.7

    def run(fn, dt, layout=False):
        def leaf(x, kind):
            x = x.to(dtype).to(dt)
            if layout and extra.get("noncontig"):
                x = _strided(x, kind)
            return x.requires_grad_()

        inputs = {"hidden": leaf(hidden, "every_other"), "weight": leaf(weight, "transposed")}
        return _run(fn, inputs, targets, valid, g_logp, g_entropy, temperature)

    gt = run(_reference, torch.float64)
    ref = run(_reference, dtype)
    out = run(_ours(valid), dtype, layout=True)
    assert out[2].dtype == dtype and out[3].dtype == dtype
    _check_all(out, ref, gt, dtype, ["logp", "entropy", "d_hidden", "d_weight"])
    if valid is not None:
        assert (out[0][~valid] == 0).all() and (out[2][~valid] == 0).all()


LOGIT_SHAPES = [
    _case(1, 0, 1, torch.float32, "one token, one-word vocabulary"),
    _case(63, 0, 97, torch.bfloat16, "odd V, ragged last tile", masked=True),
    _case(63, 0, 1000, torch.float16, "many vocabulary tiles, padded rows", noncontig="padded_rows"),
    _case(40, 0, 1000, torch.float32, "column stride 2, masked", noncontig="every_other", masked=True),
    _case(24, 0, 300, torch.float32, "column-major logits", noncontig="transposed"),
    _case(17, 0, 97, torch.bfloat16, "every token masked", all_masked=True),
]
if CUDA:
    LOGIT_SHAPES += [_case(200, 0, 151936, torch.bfloat16, "production vocabulary", masked=True)]


@pytest.mark.parametrize("N,H,V,dtype,extra", LOGIT_SHAPES)
def test_logits_path_matches_reference(N, H, V, dtype, extra):
    hidden, weight, targets, valid, g_logp, g_entropy = _inputs(N, 16, V, extra)
    logits = hidden[:, :16] @ weight.T
    temperature = 1.3

    def run(fn, dt, layout=False):
        x = logits.to(dtype).to(dt)
        if layout and extra.get("noncontig"):
            x = _strided(x, extra["noncontig"])
        return _run(fn, {"logits": x.requires_grad_()}, targets, valid, g_logp, g_entropy, temperature)

    gt = run(_reference, torch.float64)
    ref = run(_reference, dtype)
    out = run(_ours(valid), dtype, layout=True)
    assert out[2].dtype == dtype
    _check_all(out, ref, gt, dtype, ["logp", "entropy", "d_logits"])


@pytest.mark.skipif(not CUDA, reason="the 65,535 grid-axis limit exists only compiled; too slow interpreted")
@pytest.mark.parametrize("path,N,H,V", [
    pytest.param("logits", 600_000, 0, 64, id="logits-N600000"),  # > 65,535 blocks of 8 rows
    pytest.param("hidden", 2_200_000, 16, 8, id="hidden-N2200000"),  # > 65,535 blocks of 8 rows in each tile's sweep
])
def test_many_rows(path, N, H, V):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    targets = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    if path == "logits":
        x = torch.randn(N, V, generator=g, device=DEVICE, requires_grad=True)
        logp, _ = triton_token_logprobs(targets, logits=x)
        z = x.detach().double()
    else:
        x = torch.randn(N, H, generator=g, device=DEVICE, requires_grad=True)
        weight = torch.randn(V, H, generator=g, device=DEVICE)
        logp, _ = triton_token_logprobs(targets, hidden=x, weight=weight)
        z = x.detach().double() @ weight.double().T
    logp.sum().backward()
    log_p = torch.log_softmax(z, -1)
    assert (logp.double() - log_p.gather(1, targets[:, None])[:, 0]).abs().max() < 1e-4
    d_z = torch.nn.functional.one_hot(targets, V) - log_p.exp()
    expected = d_z if path == "logits" else d_z @ weight.double()
    assert (x.grad.double() - expected).abs().max() < 1e-3


@pytest.mark.skipif(not CUDA, reason="needs 9 GB of GPU memory; too slow interpreted")
def test_one_row_of_131072_tokens():
    # [1, 131072, 16400] bf16 holds more than 2**31 elements: offsets must be 64-bit all the way.
    T, V = 131072, 16400
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(1, T, V, generator=g, device=DEVICE, dtype=torch.bfloat16) * 2).requires_grad_()
    targets = torch.randint(0, V, (1, T), generator=g, device=DEVICE)
    g_logp = torch.randn(1, T, generator=g, device=DEVICE)
    logp = softpo.token_logprobs(targets, logits=logits, temperature=0.8, impl="triton")
    (logp * g_logp).sum().backward()
    for t0 in range(0, T, 8192):  # the float64 reference, a slice of rows at a time
        rows = slice(t0, t0 + 8192)
        log_p = torch.log_softmax(logits.detach()[0, rows].double() / 0.8, -1)
        expected = log_p.gather(1, targets[0, rows, None])[:, 0]
        assert (logp[0, rows].double() - expected).abs().max() < 1e-4, t0
        d_z = (torch.nn.functional.one_hot(targets[0, rows], V) - log_p.exp()) * g_logp[0, rows, None] / 0.8
        # The gradient is stored in bf16: one rounding, at most 2**-9 of the largest element.
        assert (logits.grad[0, rows].double() - d_z).abs().max() < 4e-3 * d_z.abs().max(), t0


def test_masked_tokens_are_skipped_even_when_not_finite():
    # Masked rows are never read: NaN there cannot reach any output or gradient.
    hidden, weight, targets, valid, _, _ = _inputs(40, 24, 97, {"masked": True})
    hidden = hidden.float()
    hidden[~valid] = float("nan")
    h = hidden.requires_grad_()
    w = weight.float().requires_grad_()
    logp, entropy = triton_token_logprobs(targets, hidden=h, weight=w, return_entropy=True, valid=valid)
    (logp + entropy).sum().backward()
    for t in (logp, entropy, h.grad, w.grad):
        assert torch.isfinite(t).all()
    assert (logp[~valid] == 0).all() and (entropy[~valid] == 0).all() and (h.grad[~valid] == 0).all()

    logits = torch.randn(40, 97, device=DEVICE)
    logits[~valid] = float("nan")
    x = logits.requires_grad_()
    logp, entropy = triton_token_logprobs(targets, logits=x, return_entropy=True, valid=valid)
    (logp + entropy).sum().backward()
    assert torch.isfinite(logp).all() and torch.isfinite(x.grad).all()
    assert (x.grad[~valid] == 0).all()


def test_logits_with_minus_inf_columns():
    # Vocabulary masking writes -inf into logits; the first 70 columns span a whole interpreter tile.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 200, generator=g, dtype=torch.float64)
    logits[:, :70] = float("-inf")
    logits[:, 150:160] = float("-inf")
    targets = torch.randint(70, 150, (9,), generator=g)
    x = logits.float().to(DEVICE).requires_grad_()
    logp, entropy = triton_token_logprobs(targets.to(DEVICE), logits=x, return_entropy=True)
    (2 * logp + entropy).sum().backward()
    # The float64 reference sees only the finite columns (torch's own -inf gradient is NaN).
    keep = torch.isfinite(logits[0])
    gt_x = logits[:, keep].to(DEVICE).requires_grad_()
    log_p = torch.log_softmax(gt_x, -1)
    gt_entropy = -(log_p.exp() * log_p).sum(-1)
    gt_logp = log_p.gather(1, (keep.cumsum(0) - 1)[targets].to(DEVICE)[:, None])[:, 0]
    (2 * gt_logp + gt_entropy).sum().backward()
    assert (logp.double() - gt_logp).abs().max() < 1e-5
    assert (entropy.double() - gt_entropy).abs().max() < 1e-5
    keep = keep.to(DEVICE)
    assert (x.grad[:, ~keep] == 0).all()
    assert (x.grad[:, keep].double() - gt_x.grad).abs().max() < 1e-5


def test_gradients_only_for_inputs_that_require_them():
    hidden, weight, targets, _, _, _ = _inputs(20, 24, 97, {})
    h = hidden.float().requires_grad_()
    w = weight.float()
    logp, entropy = triton_token_logprobs(targets, hidden=h, weight=w)
    assert entropy is None
    logp.sum().backward()
    assert h.grad is not None and w.grad is None
    w.requires_grad_()
    h2 = hidden.float()
    logp, _ = triton_token_logprobs(targets, hidden=h2, weight=w)
    logp.sum().backward()
    assert w.grad is not None and h2.grad is None


def test_shift_invariance_of_logits():
    # Values with 10 fractional bits, shifted by 512: the shifted fp32 logits are exact.
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(30, 300, generator=g) * 1024).round() / 1024
    targets = torch.randint(0, 300, (30,), generator=g)
    results = []
    for shift in (0.0, 512.0):
        x = (logits + shift).to(DEVICE).requires_grad_()
        logp, entropy = triton_token_logprobs(targets.to(DEVICE), logits=x, return_entropy=True)
        (logp + entropy).sum().backward()
        results.append((logp, entropy, x.grad))
    for a, b in zip(*results):
        # A shift of 512 costs at most a few ulps of 512 in the lse (ulp = 6e-5).
        assert (a - b).abs().max() < 3e-4


def test_deterministic():
    # No atomics: the same inputs give bitwise the same outputs and gradients.
    hidden, weight, targets, valid, g_logp, g_entropy = _inputs(63, 40, 300, {"masked": True})
    g_logp, g_entropy = g_logp.float(), g_entropy.float()
    for path in ("hidden", "logits"):
        outs = []
        for _ in range(2):
            if path == "hidden":
                inputs = {"hidden": hidden.to(torch.bfloat16), "weight": weight.to(torch.bfloat16)}
            else:
                inputs = {"logits": (hidden @ weight.T).to(torch.bfloat16)}
            inputs = {k: v.requires_grad_() for k, v in inputs.items()}
            logp, entropy = triton_token_logprobs(targets, return_entropy=True, valid=valid, **inputs)
            (logp * g_logp + entropy * g_entropy).sum().backward()
            outs.append([logp, entropy] + [inputs[k].grad for k in sorted(inputs)])
        for a, b in zip(*outs):
            assert torch.equal(a, b), path


def _inplace_logits(N=30, V=97):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, V, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    return base, targets


def test_inplace_backward_matches_out_of_place():
    base, targets = _inplace_logits()
    valid = (torch.arange(30) % 3 != 0).to(DEVICE)
    grads = []
    for inplace in (False, True):
        base.grad = None
        logits = base * 2.0  # a non-leaf, as the lm_head matmul's output is
        logp, entropy = triton_token_logprobs(
            targets, logits=logits, return_entropy=True, valid=valid, inplace_backward=inplace, temperature=0.9
        )
        (logp * 3 - entropy).sum().backward()
        grads.append(base.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_inplace_backward_refuses_when_autograd_still_needs_the_logits():
    base, targets = _inplace_logits()
    # exp saves its output, the logits: after an in-place backward it must refuse to run.
    logits = base.exp()
    logp, _ = triton_token_logprobs(targets, logits=logits, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()
    # A leaf's data belongs to the caller: refused up front.
    with pytest.raises(ValueError, match="leaf"):
        softpo.token_logprobs(targets, logits=base, impl="triton", inplace_backward=True)
    with pytest.raises(ValueError, match="leaf"):
        softpo.token_logprobs(targets[:20], logits=base[:20], impl="triton", inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward needs logits"):
        softpo.token_logprobs(targets, hidden=base, weight=base.new_ones(97, 97), impl="triton", inplace_backward=True)
    # Logits changed between forward and backward: the saved-tensor check catches it.
    logits = base * 1.0
    logp, _ = triton_token_logprobs(targets, logits=logits, inplace_backward=True)
    logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_lower_layers_assert_their_contract():
    """Validation is the public API's (tests/test_validation.py); below it, a broken contract is a bug
    in softpo and stops at an assert rather than launching on bad pointers."""
    h = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(5, 8, device=DEVICE)
    t = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    for call in (
        lambda: triton_token_logprobs(t, hidden=h, weight=torch.randn(5, 7, device=DEVICE)),
        lambda: triton_token_logprobs(t, hidden=h, weight=w.double()),
        lambda: triton_token_logprobs(t.int(), hidden=h, weight=w),
        lambda: logits_sweep.logits_logprob_fwd(h, t, temperature=0.0),
        lambda: logits_sweep.logits_logprob_fwd(h, t, row_idx=t),
    ):
        with pytest.raises(AssertionError):
            call()


# Token-level objectives through the fused epilogue, against token_terms on the reference logp.
FUSED_CONFIGS = {
    "grpo": softpo.GRPO,
    "dapo-k3-biascorr": softpo.DAPO.replace(beta=0.05, use_bias_correction_kl=True),
    "grpo-delta-k1": softpo.GRPO.replace(delta=1.5, beta=0.05, kl_estimator="k1"),
    "sapo-k2": softpo.SAPO.replace(beta=0.04, kl_estimator="k2"),
    "cispo-k3": softpo.CISPO.replace(beta=0.05),
}
FUSED_CASES = [
    pytest.param(config, path, dtype, options, id=f"{name}-{path}-{DTYPE_NAMES[dtype]}-{options}")
    for name, config in FUSED_CONFIGS.items()
    for path, dtype, options in (("hidden", torch.float32, "old-isw"), ("logits", torch.bfloat16, "onpolicy"))
]


@pytest.mark.parametrize("config,path,dtype,options", FUSED_CASES)
def test_fused_terms_match_token_terms(monkeypatch, config, path, dtype, options):
    N, H, V = 45, 24, 97
    # Several logits tiles: each tile's epilogue gets its own slice of the per-token inputs.
    _small_tiles(monkeypatch, 8, V, dtype)
    hidden, weight, targets, valid, g_terms, g_entropy = _inputs(N, H, V, {"masked": True}, seed=3)
    g = torch.Generator().manual_seed(4)
    advantages = torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)
    base_logp = reference_logprobs(targets, hidden=hidden, weight=weight)[0].detach()
    noise = lambda s: s * torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    old_logp = base_logp + noise(0.3) if "old" in options else None
    ref_logp = base_logp + noise(0.3)
    is_weight = torch.rand(N, generator=g, dtype=torch.float64).to(DEVICE) * 2 if "isw" in options else None

    def leaf(x, dt):
        return x.to(dtype).to(dt).requires_grad_()

    def make_inputs(dt):
        if path == "hidden":
            return {"hidden": leaf(hidden, dt), "weight": leaf(weight, dt)}
        return {"logits": leaf(hidden @ weight.T, dt)}

    def cast(t, dt):
        return None if t is None else t.to(dt)

    def reference(dt):
        inputs = make_inputs(dt)
        logp, entropy = reference_logprobs(targets, **inputs)
        terms = objectives.token_terms(
            config, logp, advantages=cast(advantages, logp.dtype), old_logp=cast(old_logp, logp.dtype),
            ref_logp=cast(ref_logp, logp.dtype), is_weight=cast(is_weight, logp.dtype),
        )
        zero = torch.zeros((), dtype=terms.dtype, device=terms.device)
        terms, entropy = torch.where(valid, terms, zero), torch.where(valid, entropy, zero)
        (terms.double() * g_terms + entropy.double() * g_entropy).sum().backward()
        return [terms, entropy] + [inputs[k].grad for k in sorted(inputs)]

    def ours():
        inputs = make_inputs(dtype)
        f32 = lambda t: cast(t, torch.float32)  # noqa: E731
        terms, logp, entropy = triton_fused_token_terms(
            config, targets, valid, return_entropy=True, advantages=f32(advantages), old_logp=f32(old_logp),
            ref_logp=f32(ref_logp) if config.beta > 0 else None, is_weight=f32(is_weight), **inputs,
        )
        assert not logp.requires_grad and (terms[~valid] == 0).all()
        (terms.double() * g_terms + entropy.double() * g_entropy).sum().backward()
        return [terms, entropy] + [inputs[k].grad for k in sorted(inputs)]

    gt = reference(torch.float64)
    ref = reference(dtype)
    out = ours()
    names = ["terms", "entropy"] + [f"d_{k}" for k in sorted(make_inputs(torch.float64))]
    _check_all(out, ref, gt, dtype, names)


@pytest.mark.parametrize("config,uses_rollout", all_configs())
def test_policy_loss_through_triton_matches_reference(config, uses_rollout):
    # Every preset and option end to end through softpo.policy_loss(impl="triton"): the fused
    # epilogue for token-level objectives, the log-prob sweep plus torch math for the others.
    B, T, H, V = 3, 11, 24, 97
    hidden, weight, targets, _, _, _ = _inputs(B * T, H, V, {}, seed=5)
    hidden, targets = hidden.view(B, T, H), targets.view(B, T)
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(6)) < 0.7).to(DEVICE)
    mask[1] = False
    logp0 = reference_logprobs(targets, hidden=hidden, weight=weight)[0]
    kwargs64 = loss_kwargs(config, logp0, uses_rollout)

    def run(fn, dt, **extra):
        h, w = hidden.float().to(dt).requires_grad_(), weight.float().to(dt).requires_grad_()
        kwargs = {k: v.to(dt) for k, v in kwargs64.items()}
        loss = fn(config, targets, mask, hidden=h, weight=w, temperature=0.9, **kwargs, **extra)
        loss = getattr(loss, "loss", loss)
        loss.backward()
        return [loss, h.grad, w.grad]

    gt = run(reference_policy_loss, torch.float64)
    ref = run(reference_policy_loss, torch.float32)
    out = run(softpo.policy_loss, torch.float32, impl="triton")
    _check_all(out[1:], ref[1:], gt[1:], torch.float32, ["d_hidden", "d_weight"])
    assert_close_to_gt(out[0], ref[0], gt[0], torch.float32, "loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hidden_loss_gradient_formed_in_the_forward(dtype):
    # Token-level objectives on the hidden path form d hidden and d weight during the forward sweep
    # (objectives.loss_weights); the loss keeps the objective's value and a gradient that scales.
    B, T, H, V = 3, 11, 24, 97
    hidden, weight, targets, _, _, _ = _inputs(B * T, H, V, {}, seed=7)
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(8)) < 0.7).to(DEVICE)
    config = softpo.DAPO.replace(beta=0.05, entropy_coef=0.01)
    logp0 = reference_logprobs(targets, hidden=hidden, weight=weight)[0].view(B, T)
    kwargs = {k: v.float() for k, v in loss_kwargs(config, logp0, False).items()}
    h = hidden.view(B, T, H).to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    call = lambda: softpo.policy_loss(config, targets.view(B, T), mask, hidden=h, weight=w,  # noqa: E731
                                      normalizer=40.0, impl="triton", **kwargs)
    out = call()
    names = _grad_fn_names(out.loss)
    assert any("HiddenGradientInForward" in name for name in names), names
    assert not any("HiddenLogprob" in name for name in names), names
    with torch.no_grad():
        assert torch.equal(call().loss, out.loss.detach())
    out.loss.backward()
    grads = [h.grad.clone(), w.grad.clone()]
    h.grad = w.grad = None
    (2 * call().loss).backward()
    torch.testing.assert_close(h.grad, 2 * grads[0], rtol=0, atol=0)
    torch.testing.assert_close(w.grad, 2 * grads[1], rtol=0, atol=0)
    h.grad = w.grad = None
    reference_policy_loss(config, targets.view(B, T), mask, hidden=h.double(), weight=w.double(), normalizer=40.0,
                          **{k: v.double() for k, v in kwargs.items()}).backward()
    for ours, expected, name in zip(grads, (h.grad, w.grad), ("d_hidden", "d_weight")):
        error = (ours.double() - expected).norm() / expected.norm()
        assert error < (1e-5 if dtype == torch.float32 else 2e-2), (name, error.item())


def _grad_fn_names(tensor):
    names, nodes = [], [tensor.grad_fn]
    while nodes:
        node = nodes.pop()
        names.append(type(node).__name__)
        nodes += [child for child, _ in node.next_functions if child is not None]
    return names


TOKEN_LEVEL_CONFIGS = [case for case in all_configs() if case.values[0].per_token_terms]


@pytest.mark.parametrize("config,uses_rollout", TOKEN_LEVEL_CONFIGS)
def test_logits_loss_gradient_formed_in_the_forward(config, uses_rollout):
    # Every token-level preset and option through policy_loss on logits: the forward kernel writes d logits
    # (masked rows included, as zeros), against the float64 reference and plain fp32 torch.
    B, T, H, V = 3, 11, 24, 97
    hidden, weight, targets, _, _, _ = _inputs(B * T, H, V, {}, seed=9)
    logits64, targets = (hidden @ weight.T).view(B, T, V), targets.view(B, T)
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(10)) < 0.7).to(DEVICE)
    mask[1] = False
    logp0 = reference_logprobs(targets, logits=logits64)[0]
    kwargs64 = loss_kwargs(config, logp0, uses_rollout)

    def run(fn, dt, **extra):
        x = logits64.to(dt).detach().requires_grad_()
        kwargs = {k: v.to(dt) for k, v in kwargs64.items()}
        loss = fn(config, targets, mask, logits=x, temperature=0.9, **kwargs, **extra)
        loss = getattr(loss, "loss", loss)
        if fn is softpo.policy_loss:
            assert any("LogitsGradientInForward" in name for name in _grad_fn_names(loss))
        loss.backward()
        return [loss, x.grad]

    gt = run(reference_policy_loss, torch.float64)
    ref = run(reference_policy_loss, torch.float32)
    out = run(softpo.policy_loss, torch.float32, impl="triton")
    assert torch.equal(out[1][1], torch.zeros_like(out[1][1])), "a masked row gets exactly zero gradient"
    assert_close_to_gt(out[1], ref[1], gt[1], torch.float32, "d_logits")
    assert_close_to_gt(out[0], ref[0], gt[0], torch.float32, "loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_logits_gradient_in_forward_scales_once(dtype):
    # The stored d logits are scaled in place by the upstream gradient (skipped at 1); the value is the
    # objective's, with or without gradients; a second backward through the same call is refused.
    B, T, H, V = 2, 9, 16, 61
    hidden, weight, targets, _, _, _ = _inputs(B * T, H, V, {}, seed=11)
    logits64, targets = (hidden @ weight.T).view(B, T, V), targets.view(B, T)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[0, 5:] = False
    config = softpo.SAPO.replace(beta=0.05, entropy_coef=0.01)
    kwargs = {k: v.float() for k, v in loss_kwargs(config, reference_logprobs(targets, logits=logits64)[0],
                                                   False).items()}

    def grad_of(scale, retain=False):
        x = logits64.to(dtype).detach().requires_grad_()
        out = softpo.policy_loss(config, targets, mask, logits=x, impl="triton", **kwargs)
        (scale * out.loss).backward(retain_graph=retain)
        return out, x

    out, x = grad_of(1.0)
    with torch.no_grad():
        assert torch.equal(softpo.policy_loss(config, targets, mask, logits=x, impl="triton", **kwargs).loss,
                           out.loss.detach())
    _, x2 = grad_of(2.0)
    torch.testing.assert_close(x2.grad, 2 * x.grad, rtol=0, atol=0)
    _, x3 = grad_of(0.25)
    torch.testing.assert_close(x3.grad, (0.25 * x.grad.float()).to(dtype), rtol=0, atol=0)
    gt = logits64.clone().requires_grad_()
    reference_policy_loss(config, targets, mask, logits=gt, **{k: v.double() for k, v in kwargs.items()}).backward()
    error = (x.grad.double() - gt.grad).norm() / gt.grad.norm()
    assert error < {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype], error.item()
    out, _ = grad_of(1.0, retain=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


def test_logits_flat_memory_keeps_the_gradient_for_the_backward_kernel():
    # memory="flat" on logits: no d logits held from the forward to the backward; the backward kernel forms
    # them, with the same values as the gradient formed in the forward.
    B, T, H, V = 2, 7, 16, 53
    hidden, weight, targets, _, _, _ = _inputs(B * T, H, V, {}, seed=12)
    logits, targets = (hidden @ weight.T).view(B, T, V).float(), targets.view(B, T)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, 3:] = False
    config = softpo.GRPO.replace(beta=0.05, entropy_coef=0.01)
    kwargs = {k: v.float() for k, v in loss_kwargs(config, reference_logprobs(targets, logits=logits)[0],
                                                   False).items()}
    grads, losses = [], []
    for memory, node in (("default", "LogitsGradientInForward"), ("flat", "LogitsLogprob")):
        x = logits.clone().requires_grad_()
        loss = softpo.policy_loss(config, targets, mask, logits=x, impl="triton", memory=memory, **kwargs).loss
        assert any(node in name for name in _grad_fn_names(loss)), (memory, _grad_fn_names(loss))
        loss.backward()
        grads.append(x.grad)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_scale_kernel_reads_the_factor_on_the_device():
    for dtype, factor in ((torch.float32, -3.0), (torch.bfloat16, -0.5)):  # bf16: a factor that rounds nothing
        x = torch.randn(3000, device=DEVICE).to(dtype)
        kept = x.clone()
        logits_sweep.scale_(x, torch.ones(1, device=DEVICE))
        assert torch.equal(x, kept)
        logits_sweep.scale_(x, torch.full((), factor, device=DEVICE))
        torch.testing.assert_close(x, (kept.float() * factor).to(dtype), rtol=0, atol=0)


def test_hidden_path_ignores_an_enclosing_autocast():
    # Under autocast the tile matmuls would run in bf16 and hand bf16 gradient rows to fp32 buffers;
    # the gradient-in-forward path runs them inside the caller's forward.
    B, T, H, V = 3, 10, 24, 97
    hidden, weight, targets, valid, _, _ = _inputs(B * T, H, V, {"masked": True}, seed=9)
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    results = []
    for enabled in (False, True):
        h, w = hidden.float().view(B, T, H).requires_grad_(), weight.float().requires_grad_()
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=enabled):
            out = softpo.policy_loss(softpo.SAPO, targets.view(B, T), valid.view(B, T), advantages,
                                     hidden=h, weight=w, impl="triton")
        out.loss.backward()
        results.append((out.loss, h.grad, w.grad))
    for plain, autocast in zip(*results):
        assert autocast.dtype == plain.dtype and torch.equal(autocast, plain)


def test_fused_asserts_a_token_level_config():
    # policy_loss routes only token-level objectives (with ref_logp when beta > 0) to the epilogue.
    hidden, weight, targets, _, _, _ = _inputs(4, 16, 10, {})
    adv = torch.zeros(4, device=DEVICE)
    with pytest.raises(AssertionError, match="gspo"):
        triton_fused_token_terms(
            softpo.GSPO, targets, None, hidden=hidden.float(), weight=weight.float(), advantages=adv
        )
    with pytest.raises(AssertionError, match="ref_logp"):
        triton_fused_token_terms(
            softpo.GRPO.replace(beta=0.1), targets, None, hidden=hidden.float(), weight=weight.float(), advantages=adv
        )


# Every kernel compiled for sm_90 without a GPU (tests/compile_sm90.py says why).
_COMPILE_BODY = """
from softpo.kernels import logits, terms

all_terms = [
    dict(HAS_TERMS=True, GATE=0, HAS_OLD=True, HAS_DELTA=True, HAS_ISW=True, KL=3, KL_RATIO=True, IS_BOUND=2),
    dict(HAS_TERMS=True, GATE=1, HAS_OLD=False, HAS_DELTA=False, HAS_ISW=True, KL=2, KL_RATIO=False, IS_BOUND=1),
    dict(HAS_TERMS=True, GATE=2, HAS_OLD=True, HAS_DELTA=False, HAS_ISW=False, KL=1, KL_RATIO=True, IS_BOUND=0),
]
fwd_config, bwd_config = logits._FWD_CONFIGS[1][1], logits._BWD_CONFIGS[1][1]
no_grad = dict(GRAD_IN_FWD=False, HAS_ENT_GRAD=False)
compile_kernel(logits._logits_fwd_kernel, fwd_config, "bf16", HAS_ROW_IDX=True, STORE_ENTROPY=True, **NO_TERMS,
               **no_grad)
compile_kernel(logits._logits_bwd_kernel, bwd_config, "bf16", HAS_ROW_IDX=False, HAS_ENT_GRAD=True)
compile_kernel(logits._logits_fwd_kernel, fwd_config, "fp16", HAS_ROW_IDX=False, STORE_ENTROPY=False,
               **all_terms[2], **no_grad)
compile_kernel(logits._logits_fwd_kernel, fwd_config, "fp16", HAS_ROW_IDX=True, STORE_ENTROPY=False,
               **all_terms[1], GRAD_IN_FWD=True, HAS_ENT_GRAD=True)
compile_kernel(logits._scale_kernel, None, "bf16", BLOCK=8192)
compile_kernel(terms._token_terms_kernel, None, "fp32", HAS_VALID=True, BLOCK=1024, **all_terms[1])
# Every row of the config list (what SOFTPO_AUTOTUNE=1 may pick), with the widest flag set.
for dtype in ("bf16", "fp32"):
    for _, config in logits._FWD_CONFIGS:
        compile_kernel(logits._logits_fwd_kernel, config, dtype, HAS_ROW_IDX=True, STORE_ENTROPY=True,
                       **all_terms[0], GRAD_IN_FWD=True, HAS_ENT_GRAD=True)
    for _, config in logits._BWD_CONFIGS:
        compile_kernel(logits._logits_bwd_kernel, config, dtype, HAS_ROW_IDX=True, HAS_ENT_GRAD=True)
"""


@pytest.mark.skipif(CUDA, reason="with a GPU every kernel runs compiled in the tests above")
def test_kernels_compile_for_sm90():
    result = compile_in_a_fresh_process(_COMPILE_BODY)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def test_public_token_logprobs_inplace_backward():
    base, targets = _inplace_logits()
    grads = []
    for inplace in (False, True):
        leaf = base.detach().clone().requires_grad_()
        logits = leaf * 1.0  # not a leaf: its storage may hold the gradient
        logp = softpo.token_logprobs(targets, logits=logits, impl="triton", inplace_backward=inplace)
        logp.sum().backward()
        grads.append(leaf.grad)
    assert grads[0] is not None and bool(grads[0].abs().sum() > 0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="inplace_backward"):
        softpo.token_logprobs(targets, logits=base, impl="torch", inplace_backward=True)


@pytest.mark.skipif(not CUDA, reason="the out_dtype branch exists on CUDA only; on CPU both take the upcast")
def test_d_weight_accumulates_in_fp32_with_or_without_addmm_out_dtype(monkeypatch):
    """Older torch releases have no addmm(out_dtype=): the fallback upcasts and gives the same fp32 sum."""
    from softpo import tiles

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 24, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(24, 16, generator=g).to(DEVICE, torch.bfloat16)
    gt = a.double() @ b.double()
    results = []
    for supported in (True, False):
        monkeypatch.setattr(tiles, "_addmm_takes_out_dtype", lambda device, dtype, s=supported: s)
        acc = torch.zeros(40, 16, dtype=torch.float32, device=DEVICE)
        tiles._accumulate(acc, a, b)
        results.append(acc)
    for acc in results:
        torch.testing.assert_close(acc.double(), gt, rtol=1e-6, atol=1e-6)
