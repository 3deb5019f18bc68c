"""Bad input raises ValueError naming the argument, before any sweep runs."""

import math

import pytest
import torch

import softpo

B, T, H, V = 2, 3, 4, 7


def _inputs():
    return {
        "targets": torch.randint(0, V, (B, T)),
        "mask": torch.ones(B, T, dtype=torch.bool),
        "advantages": torch.randn(B),
        "hidden": torch.randn(B, T, H),
        "weight": torch.randn(V, H),
    }


def _call(config=softpo.GRPO, **changes):
    kw = _inputs()
    kw.update(changes)
    kw = {k: v for k, v in kw.items() if v is not None or k in ("hidden", "weight")}
    targets, mask, advantages = kw.pop("targets"), kw.pop("mask"), kw.pop("advantages", None)
    return softpo.policy_loss(config, targets, mask, advantages, **kw)


BAD = [
    pytest.param({"targets": torch.full((B, T), V)}, "targets", id="target-too-large"),
    pytest.param({"targets": torch.full((B, T), -1)}, "targets", id="target-negative"),
    pytest.param({"targets": torch.zeros(B, T)}, "targets", id="float-targets"),
    pytest.param({"mask": torch.ones(B, T + 1)}, "mask", id="mask-shape"),
    pytest.param({"mask": torch.full((B, T), 2)}, "mask", id="mask-values"),
    pytest.param({"hidden": torch.randn(B, T, H + 1)}, "hidden", id="hidden-width"),
    pytest.param({"weight": torch.randn(V, H, dtype=torch.float64)}, "weight", id="dtype-mismatch"),
    pytest.param({"hidden": None, "weight": None}, "neither", id="neither-input"),
    pytest.param({"logits": torch.randn(B, T, V)}, "not both", id="both-inputs"),
    pytest.param({"weight": None}, "weight", id="hidden-without-weight"),
    pytest.param({"hidden": None}, "hidden", id="weight-without-hidden"),
    pytest.param({"temperature": 0.0}, "temperature", id="zero-temperature"),
    pytest.param({"temperature": math.nan}, "temperature", id="nan-temperature"),
    pytest.param({"advantages": torch.tensor([1.0, math.inf])}, "advantages", id="inf-advantage"),
    pytest.param({"advantages": torch.randn(B + 1)}, "advantages", id="advantages-shape"),
    pytest.param({"advantages": None}, "advantages", id="missing-advantages"),
    pytest.param({"old_logp": torch.full((B, T), math.nan)}, "old_logp", id="nan-old-logp"),
    pytest.param({"old_logp": torch.randn(B, T + 1)}, "old_logp", id="old-logp-shape"),
    pytest.param({"ref_logp": torch.full((B, T), -math.inf)}, "ref_logp", id="inf-ref-logp"),
    pytest.param({"normalizer": 0}, "normalizer", id="zero-normalizer"),
    pytest.param({"impl": "cuda"}, "impl", id="unknown-impl"),
    # No kernel path for fp8: refused up front, not by an assert below the API.
    pytest.param({"hidden": torch.randn(B, T, H).to(torch.float8_e4m3fn),
                  "weight": torch.randn(V, H).to(torch.float8_e4m3fn)}, "hidden", id="fp8-hidden"),
    pytest.param({"hidden": None, "weight": None, "logits": torch.randn(B, T, V).to(torch.float8_e4m3fn)},
                 "logits", id="fp8-logits"),
    pytest.param({"hidden": torch.randn(B, T, 0), "weight": torch.randn(V, 0)}, "weight", id="zero-width"),
    pytest.param({"memory": "small"}, "memory", id="unknown-memory"),
]


@pytest.mark.parametrize("changes,name", BAD)
def test_bad_input_names_the_argument(changes, name):
    with pytest.raises(ValueError, match=name):
        _call(**changes)


def test_nonfinite_values_at_masked_positions_are_ignored():
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    old = torch.zeros(B, T)
    old[0, 2] = math.nan
    targets = torch.randint(0, V, (B, T))
    targets[0, 2] = -100
    out = _call(targets=targets, mask=mask, old_logp=old)
    assert bool(torch.isfinite(out.loss))


@pytest.mark.parametrize(
    "config,changes,name",
    [
        pytest.param(softpo.GRPO.replace(beta=0.1), {}, "ref_logp", id="kl-without-ref"),
        pytest.param(softpo.SPO, {"rewards": torch.rand(B), "q0": torch.zeros(B)}, "ref_logp", id="spo-without-ref"),
        pytest.param(softpo.SPO, {"ref_logp": torch.zeros(B, T), "q0": torch.zeros(B)}, "rewards", id="spo-without-rewards"),
        pytest.param(softpo.SPO, {"ref_logp": torch.zeros(B, T), "rewards": torch.rand(B)}, "q0", id="spo-without-q0"),
        pytest.param(softpo.SPO, {"ref_logp": torch.zeros(B, T), "rewards": torch.tensor([0.0, math.nan]), "q0": torch.zeros(B)}, "rewards", id="spo-nan-reward"),
        pytest.param(softpo.SPO.replace(spo_loss="bce"), {"ref_logp": torch.zeros(B, T), "rewards": torch.tensor([0.0, 2.0]), "q0": torch.zeros(B)}, "rewards", id="bce-reward-range"),
    ],
)
def test_missing_or_bad_objective_inputs(config, changes, name):
    with pytest.raises(ValueError, match=name):
        _call(config, **changes)


@pytest.mark.parametrize(
    "field,value",
    [("epsilon", -0.1), ("epsilon", math.nan), ("epsilon_high", math.inf), ("sapo_temperature_pos", 0.0),
     ("sapo_temperature_neg", -1.0), ("beta", -0.1), ("beta", math.nan), ("delta", math.inf), ("gate", "hard"),
     ("loss_aggregation", "mean"), ("vllm_importance_sampling_cap", 0.0), ("importance_sampling_level", "seq"),
     ("entropy_coef", math.inf), ("max_completion_length", 0), ("kl_estimator", "k4"),
     ("top_entropy_quantile", -0.1), ("top_entropy_quantile", 1.5), ("top_entropy_quantile", math.nan),
     ("vespo_k_pos", 0.0), ("vespo_lambda_pos", -1.0), ("vespo_k_neg", -2.0), ("vespo_lambda_neg", 0.0),
     ("vespo_k_pos", math.inf), ("off_policy_mask_threshold", math.nan), ("vllm_importance_sampling_clip_min", -0.5),
     ("entropy_coef_delta", -0.1), ("entropy_target", math.nan)],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        softpo.GRPO.replace(**{field: value})


def test_config_rejects_crossed_sampler_bounds():
    for low, high in ((2.0, 1.5), (1.5, 1.5)):
        with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min"):
            softpo.GRPO.replace(vllm_importance_sampling_clip_min=low, vllm_importance_sampling_cap=high)
    with pytest.raises(ValueError, match="vllm_importance_sampling_cap"):
        softpo.GRPO.replace(vllm_importance_sampling_cap=None)  # truncate mode with no bound at all
    with pytest.raises(ValueError, match="entropy_coef_min"):
        softpo.GRPO.replace(entropy_coef_min=0.5, entropy_coef_max=0.1)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        softpo.VESPO.replace(vllm_importance_sampling_mode="sequence_mask")
    for field, value in (("top_entropy_quantile", 0.5), ("off_policy_mask_threshold", 0.1)):
        with pytest.raises(ValueError, match=field):
            softpo.SPO.replace(**{field: value})
    # The mask modes take either side alone; clip_min alone bounds a truncate mode.
    softpo.GRPO.replace(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_cap=None,
                        vllm_importance_sampling_clip_min=0.5)
    softpo.GRPO.replace(vllm_importance_sampling_cap=None, vllm_importance_sampling_clip_min=0.5)


def test_small_delta_warns_as_trl_accepts_it():
    # TRL only recommends delta > 1 + epsilon_high; softpo takes the same values, with a warning.
    with pytest.warns(UserWarning, match="delta"):
        config = softpo.GRPO.replace(delta=1.1)
    assert config.delta == 1.1


def test_spo_needs_positive_beta_and_cispo_positive_cap():
    with pytest.raises(ValueError, match="beta"):
        softpo.SPO.replace(beta=0.0)
    with pytest.raises(ValueError, match="epsilon_high"):
        softpo.CISPO.replace(epsilon_high=0.0)


def test_token_logprobs_rejects_out_of_range_targets_and_bad_logits():
    logits = torch.randn(B, T, V)
    with pytest.raises(ValueError, match="targets"):
        softpo.token_logprobs(torch.full((B, T), V), logits=logits)
    with pytest.raises(ValueError, match="logits"):
        softpo.token_logprobs(torch.zeros(B, T + 1, dtype=torch.long), logits=logits)
    with pytest.raises(ValueError, match="rewards"):
        softpo.spo_q0(torch.tensor([1.0, 2.0]), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        softpo.spo_q0(torch.rand(2, 3), beta=0.0)


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, "triton"), (torch.float32, "triton"),
                                            (torch.float64, "torch")])
def test_auto_impl_picks_the_kernels_for_cuda_tensors_below_float64(dtype, expected):
    from softpo import checks

    assert checks.resolve_impl("auto", torch.device("cuda", 0), dtype) == expected
    assert checks.resolve_impl("auto", torch.device("cpu"), dtype) == "torch"
    assert checks.resolve_impl("torch", torch.device("cuda", 0), dtype) == "torch"


def test_a_transposed_weight_is_named_as_transposed():
    hidden, weight = torch.randn(B, T, 8), torch.randn(8, 11)  # [H, V]: lm_head.weight transposed
    targets, mask = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="transposed"):
        softpo.policy_loss(softpo.GRPO, targets, mask, torch.randn(B), hidden=hidden, weight=weight)
    with pytest.raises(ValueError, match="transposed"):
        softpo.token_logprobs(targets, hidden=hidden, weight=weight)


def test_a_preset_name_as_config_points_to_softpo_preset():
    targets, mask = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"softpo\.preset\('sapo'\)"):
        softpo.policy_loss("sapo", targets, mask, torch.randn(B), logits=torch.randn(B, T, 5))
    with pytest.raises(ValueError, match=r"softpo\.preset\('sapo'\)"):
        softpo.PolicyLoss("sapo")


@pytest.mark.parametrize("config,why", [(softpo.GRPO.replace(beta=0.1), "beta"), (softpo.SPO, "cumulative Q")],
                         ids=["kl", "spo"])
def test_a_missing_ref_logp_says_why_it_is_required(config, why):
    targets, mask = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool)
    extra = {"rewards": torch.rand(B), "q0": torch.zeros(B)} if config.objective == "spo" else {}
    with pytest.raises(ValueError, match=f"ref_logp is required: .*{why}"):
        softpo.policy_loss(config, targets, mask, torch.randn(B), logits=torch.randn(B, T, 5), **extra)


def test_the_advantages_shape_error_lists_both_accepted_shapes():
    targets, mask = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"advantages must have shape \[B\] = \({B},\) or \[B, T\] = \({B}, {T}\)"):
        softpo.policy_loss(softpo.GRPO, targets, mask, torch.randn(B, T + 1), logits=torch.randn(B, T, 5))
