"""softpo inside verl: the registered losses against verl's own, the fused log-prob backend against verl's
reference, SPO through verl's advantage estimator, the plugin loading, and bad configs.

verl pins transformers below softpo's main test environment, so these tests run in the separate environment
that .ci/run builds (`pytest tests/test_verl.py`); elsewhere they skip.
"""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (its tests run in .ci/run's verl environment)")

from verl.trainer.config import AlgoConfig, KLControlConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import softpo  # noqa: E402
from softpo import objectives  # noqa: E402
from softpo.integrations import verl as plugin  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
# softpo's name -> verl's built-in it must equal.
TWINS = {"softpo_vanilla": "vanilla", "softpo_gspo": "gspo", "softpo_sapo": "sapo", "softpo_cispo": "cispo"}
# Global batch info as verl's ppo_loss fills it: none (single process), or a rank of 2 with the global counts.
GLOBAL_INFO = {
    "local": {},
    "dp2": {"dp_size": 2, "batch_num_tokens": 53, "global_batch_size": 11, "loss_scale_factor": 9},
}


def actor_config(loss_agg_mode="token-mean", global_info=None, **overrides):
    fields = dict(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                  clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                  tau_pos=1.0, tau_neg=1.05, loss_agg_mode=loss_agg_mode)
    fields.update(overrides)
    config = ActorConfig(**fields)
    config.global_batch_info.update(global_info or {})
    return config


def random_batch(B=6, T=9, seed=0):
    """Float64 old/new log-probs spanning every clip region, token advantages of both signs, ragged masks
    with one fully masked row (verl excludes it from the sequence counts)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    step = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    step[0, :3] = torch.tensor([1.3, -1.0, 0.25], dtype=torch.float64)  # beyond dual clip (r > 3), below 1 - eps
    logp = (old + step).clamp(max=-1e-3)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages[1] = -advantages[1].abs()
    lengths = torch.tensor([9, 7, 1, 0, 5, 9])[:B]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.25
    return old, logp, advantages, mask, weights


def loss_and_grad(fn, old, logp, advantages, mask, agg, config, weights):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=advantages, response_mask=mask,
                       loss_agg_mode=agg, config=config, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def assert_same(ours, theirs):
    loss, grad, _ = ours
    ref_loss, ref_grad, _ = theirs
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("info", list(GLOBAL_INFO), ids=list(GLOBAL_INFO))
@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout-is"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", list(TWINS))
def test_twin_equals_verl_builtin(name, agg, weighted, info):
    # Equal loss and gradient for every aggregation, with and without rollout IS weights, local or global counts.
    old, logp, advantages, mask, weights = random_batch()
    weights = weights if weighted else None
    config = actor_config(agg, GLOBAL_INFO[info])
    ours = loss_and_grad(core_algos.get_policy_loss_fn(name), old, logp, advantages, mask, agg, config, weights)
    theirs = loss_and_grad(core_algos.get_policy_loss_fn(TWINS[name]), old, logp, advantages, mask, agg, config,
                           weights)
    assert ours[1].abs().sum() > 0, "a batch whose gradient is zero tests nothing"
    assert_same(ours, theirs)
    assert ours[2]["actor/ppo_kl"] == pytest.approx(theirs[2]["actor/ppo_kl"], rel=1e-9)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_sapo_agg_is_verl_sapo_under_any_aggregation(agg, monkeypatch):
    # The reference is verl's own SAPO with its hard-coded aggregation swapped for `agg`.
    old, logp, advantages, mask, weights = random_batch(seed=1)
    config = actor_config(agg)
    ours = loss_and_grad(core_algos.get_policy_loss_fn("softpo_sapo_agg"), old, logp, advantages, mask, agg, config,
                         weights)
    verl_agg_loss = core_algos.agg_loss
    monkeypatch.setattr(core_algos, "agg_loss", lambda **kw: verl_agg_loss(**{**kw, "loss_agg_mode": agg}))
    theirs = loss_and_grad(core_algos.compute_policy_loss_sapo, old, logp, advantages, mask, agg, config, weights)
    assert_same(ours, theirs)


def test_sapo_agg_differs_from_verl_sapo_off_its_fixed_mode():
    # Guards the test above: token-mean really is a different loss than verl's fixed seq-mean-token-mean.
    old, logp, advantages, mask, weights = random_batch(seed=1)
    config = actor_config("token-mean")
    ours = loss_and_grad(core_algos.get_policy_loss_fn("softpo_sapo_agg"), old, logp, advantages, mask, "token-mean",
                         config, None)
    theirs = loss_and_grad(core_algos.get_policy_loss_fn("sapo"), old, logp, advantages, mask, "token-mean", config,
                           None)
    assert not torch.allclose(ours[0], theirs[0])


def test_gspo_sequence_gradient():
    # Same value as verl's gspo (GSPO-token). The gradients agree where the estimators coincide, sequence
    # advantages, and differ with token advantages (the sequence ratio spreads them over the sequence).
    old, logp, token_adv, mask, _ = random_batch(seed=2)
    seq_adv = token_adv[:, :1].expand_as(old).contiguous()
    for agg in ("token-mean", "seq-mean-token-mean"):
        config = actor_config(agg, clip_ratio_low=0.5, clip_ratio_high=0.5)
        for advantages, same_gradient in ((seq_adv, True), (token_adv, False)):
            seq = loss_and_grad(core_algos.get_policy_loss_fn("softpo_gspo_sequence"), old, logp, advantages, mask,
                                agg, config, None)
            tok = loss_and_grad(core_algos.get_policy_loss_fn("gspo"), old, logp, advantages, mask, agg, config, None)
            torch.testing.assert_close(seq[0], tok[0], rtol=1e-10, atol=1e-12)
            assert torch.allclose(seq[1], tok[1], rtol=1e-10, atol=1e-12) == same_gradient, (agg, same_gradient)


def spo_batch(same_old_and_ref):
    g = torch.Generator().manual_seed(3)
    B, T = 6, 8
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    old = ref if same_old_and_ref else ref + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    lengths = torch.tensor([8, 3, 5, 8, 1, 6])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    scores = torch.rand(B, generator=g, dtype=torch.float64)
    token_scores = torch.zeros(B, T, dtype=torch.float64)
    token_scores[torch.arange(B), lengths - 1] = scores  # verl puts the outcome reward on the last token
    uid = np.array(["a", "b", "a", "c", "b", "a"], dtype=object)
    return ref, old, logp, mask, scores, token_scores, uid


@pytest.mark.parametrize("same_old_and_ref", [True, False], ids=["old-is-ref", "old-after-ref"])
def test_spo_through_verl_equals_softpo_spo(same_old_and_ref):
    beta = 0.3
    ref, old, logp, mask, scores, token_scores, uid = spo_batch(same_old_and_ref)
    # verl's KL-in-reward, as its trainer applies it (kl_penalty "kl", fixed coefficient beta).
    kld = core_algos.kl_penalty(old, ref, kl_penalty="kl") * mask
    token_rewards = token_scores - beta * kld
    algo = AlgoConfig(use_kl_in_reward=True, kl_penalty="kl", kl_ctrl=KLControlConfig(type="fixed", kl_coef=beta))
    advantages, _ = core_algos.get_adv_estimator_fn("softpo_spo")(
        token_level_rewards=token_rewards, response_mask=mask.double(), index=uid, config=algo)
    config = actor_config(kl_loss_coef=beta, use_kl_loss=False)
    ours = loss_and_grad(core_algos.get_policy_loss_fn("softpo_spo"), old, logp, advantages, mask, "token-mean",
                         config, None)
    # softpo's SPO with the reference log-probs, the scores and q0 of each group (of the KL-corrected returns,
    # which are the scores themselves when old == ref).
    returns = token_rewards.sum(-1)
    q0 = torch.empty(len(uid), dtype=torch.float64)
    for group in set(uid):
        rows = torch.tensor([i for i, u in enumerate(uid) if u == group])
        q0[rows] = softpo.spo_q0(returns[rows].unsqueeze(0), beta)[0]
    if same_old_and_ref:
        torch.testing.assert_close(returns, scores)
    theirs = loss_and_grad(
        lambda old_log_prob, log_prob, advantages, response_mask, **_: (objectives.spo_loss(
            softpo.preset("spo", beta=beta), log_prob, response_mask, ref, scores, q0)[0], {}),
        old, logp, advantages, mask, "token-mean", config, None)
    assert_same(ours, theirs)


def test_spo_bad_configs_name_the_key():
    beta = 0.3
    ref, old, logp, mask, scores, token_scores, uid = spo_batch(True)
    estimator = core_algos.get_adv_estimator_fn("softpo_spo")
    kl = KLControlConfig(type="fixed", kl_coef=beta)
    with pytest.raises(ValueError, match="algorithm.use_kl_in_reward"):
        estimator(token_level_rewards=token_scores, response_mask=mask, index=uid,
                  config=AlgoConfig(use_kl_in_reward=False, kl_ctrl=kl))
    with pytest.raises(ValueError, match="algorithm.kl_penalty"):
        estimator(token_level_rewards=token_scores, response_mask=mask, index=uid,
                  config=AlgoConfig(use_kl_in_reward=True, kl_penalty="low_var_kl", kl_ctrl=kl))
    with pytest.raises(ValueError, match="uid"):
        estimator(token_level_rewards=token_scores, response_mask=mask, config=AlgoConfig(use_kl_in_reward=True,
                                                                                          kl_ctrl=kl))
    loss = core_algos.get_policy_loss_fn("softpo_spo")
    args = dict(old_log_prob=old, log_prob=logp, advantages=token_scores, response_mask=mask,
                loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match="actor.kl_loss_coef"):
        loss(**args, config=actor_config(kl_loss_coef=0.0))
    with pytest.raises(ValueError, match="actor.use_kl_loss"):
        loss(**args, config=actor_config(kl_loss_coef=beta, use_kl_loss=True))
    with pytest.raises(ValueError, match="rollout_correction"):
        loss(**args, config=actor_config(kl_loss_coef=beta), rollout_is_weights=torch.ones_like(old))


def test_bad_configs_name_the_key():
    old, logp, advantages, mask, _ = random_batch()
    with pytest.raises(ValueError, match="softpo_nonexistent") as info:
        core_algos.get_policy_loss_fn("softpo_nonexistent")
    assert "softpo_vanilla" in str(info.value)  # verl's error lists the registered names, ours among them
    with pytest.raises(ValueError, match="actor.policy_loss.loss_mode"):
        plugin.loss_config("softpo_nonexistent", actor_config(), "token-mean")
    args = dict(old_log_prob=old, log_prob=logp, advantages=advantages, response_mask=mask)
    with pytest.raises(ValueError, match="actor.loss_agg_mode"):
        core_algos.get_policy_loss_fn("softpo_vanilla")(**args, loss_agg_mode="token-avg", config=actor_config())
    with pytest.raises(ValueError, match="actor.clip_ratio_c"):
        core_algos.get_policy_loss_fn("softpo_vanilla")(**args, loss_agg_mode="token-mean",
                                                          config=actor_config(clip_ratio_c=1.2))
    with pytest.raises(ValueError, match="global_batch_size"):
        core_algos.get_policy_loss_fn("softpo_sapo")(**args, loss_agg_mode="token-mean",
                                                       config=actor_config(global_info={"dp_size": 2}))


def _verl_registry(env):
    code = ("import verl, json; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; "
            "print(json.dumps(sorted(k for k in R if k.startswith('softpo'))))")
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_plugin_loads_through_verl_mechanisms():
    # Entry-point discovery on (verl's default) registers softpo's losses at `import verl`; with discovery off
    # they are absent, and VERL_USE_EXTERNAL_MODULES brings them back.
    names = sorted(list(plugin.LOSSES) + ["softpo_spo"])
    assert _verl_registry({"VERL_USE_EXTERNAL_PLUGINS": "auto"}) == str(names).replace("'", '"')
    assert _verl_registry({"VERL_USE_EXTERNAL_PLUGINS": "none"}) == "[]"
    assert _verl_registry({"VERL_USE_EXTERNAL_PLUGINS": "none",
                           "VERL_USE_EXTERNAL_MODULES": "softpo.integrations.verl"}) == str(names).replace("'", '"')


# Backend. V = 97 and 1000: no multiple of any block size (verl's kernel splits the vocabulary by 1024).
@pytest.mark.parametrize("V", [1, 97, 1000], ids=["V1", "V97", "V1000"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_backend_equals_verl_reference(V, temperature):
    g = torch.Generator().manual_seed(V)
    B, T, H = 2, 7, 24
    hidden = torch.randn(B, T, H, generator=g) * 2
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    d_logp = torch.randn(B, T, generator=g) * mask  # masked tokens send no gradient
    d_entropy = torch.randn(B, T, generator=g) * mask

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logp, entropy = fn(h, w)
        torch.autograd.backward([logp, entropy], [d_logp.to(logp.dtype), d_entropy.to(entropy.dtype)])
        return logp.detach(), entropy.detach(), h.grad, w.grad

    ours = run(lambda h, w: plugin.linear_cross_entropy(h, w, labels, temperature, "none"), hidden, weight)
    verl_ref = run(lambda h, w: FusedLinearForPPO(chunk_size=5)(h, w, labels, temperature), hidden, weight)
    gt = run(lambda h, w: FusedLinearForPPO()(h, w, labels, temperature), hidden.double(), weight.double())
    assert ours[0].dtype == ours[1].dtype == torch.float32
    assert ours[0].shape == ours[1].shape == labels.shape
    for what, out, ref, exact in zip(("logp", "entropy", "d_hidden", "d_weight"), ours, verl_ref, gt):
        # Two fp32 sweeps agree to rounding, which scales with the values (d weight reaches about 5 here).
        scale = 1 + exact.abs().max().item()
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")
        # Never worse than verl's own fp32 reference against float64.
        err, ref_err = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
        assert err <= ref_err + 1e-5 * (1 + exact.abs().max()), (what, err, ref_err)
    assert (ours[2][~mask] == 0).all(), "a masked token's hidden state must get exactly zero gradient"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_backend_reductions(reduction):
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(37, 16, generator=g)
    labels = torch.randint(0, 37, (9,), generator=g)
    per_token, entropy = plugin.linear_cross_entropy(hidden, weight, labels, 0.9, "none")
    reduced, entropy_r = plugin.linear_cross_entropy(hidden, weight, labels, 0.9, reduction)
    expected = per_token.sum() if reduction == "sum" else per_token.mean()
    assert reduced.dim() == 0
    torch.testing.assert_close(reduced, expected)
    torch.testing.assert_close(entropy_r, entropy)


def test_backend_bad_arguments_and_process_group():
    hidden, weight, labels = torch.randn(3, 8), torch.randn(11, 8), torch.randint(0, 11, (3,))
    with pytest.raises(ValueError, match="reduction"):
        plugin.linear_cross_entropy(hidden, weight, labels, 1.0, "avg")
    with pytest.raises(ValueError, match="targets"):
        plugin.linear_cross_entropy(hidden, weight, labels + 11, 1.0, "none")


def _vocab_parallel_backend_worker(rank, world, out_dir):
    """verl's tensor-parallel contract: each rank holds a contiguous shard of the head's rows, labels are global."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(97, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 97, (2, 6), generator=g)
    rows = torch.tensor_split(torch.arange(97), world)[rank]
    h = hidden.clone().requires_grad_()
    w = weight[rows].clone().requires_grad_()
    logp, entropy = plugin.linear_cross_entropy(h, w, labels, 0.8, "none", dist_process_group=dist.group.WORLD)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    torch.save({"logp": logp.detach(), "entropy": entropy.detach(), "d_hidden": h.grad, "d_weight": w.grad,
                "rows": (int(rows[0]), int(rows[-1]) + 1)}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_backend_with_dist_process_group_equals_one_process(tmp_path):
    from distributed import run_group

    run_group(_vocab_parallel_backend_worker, 2, str(tmp_path))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(97, 8, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 97, (2, 6), generator=g)
    logp, entropy = plugin.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
    (logp.sum() + 0.5 * entropy.sum()).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        start, stop = got["rows"]
        torch.testing.assert_close(got["logp"], logp.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["entropy"], entropy.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["d_hidden"], hidden.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["d_weight"], weight.grad[start:stop], rtol=1e-10, atol=1e-12)


def test_backend_refuses_a_sharded_head_weight():
    # What verl's fused forward passes under FSDP2 with an untied lm_head: a DTensor shard (a real one, on a
    # one-process gloo group in a child process so this process's torch.distributed stays untouched).
    code = """
import datetime, os, socket, torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
torch.distributed.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
from softpo.integrations.verl import linear_cross_entropy
weight = distribute_tensor(torch.randn(11, 8), init_device_mesh("cpu", (1,)), [Shard(0)])
try:
    linear_cross_entropy(torch.randn(3, 8), weight, torch.randint(0, 11, (3,)), 1.0, "none")
    print("no error")
except ValueError as error:
    print("ValueError:", error)
torch.distributed.barrier(); torch.distributed.destroy_process_group()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ValueError: weight is a DTensor" in out.stdout, out.stdout


def test_use_softpo_linear_cross_entropy_reroutes_verl(monkeypatch):
    from verl.utils.kernel import linear_cross_entropy as verl_lce

    monkeypatch.setattr(verl_lce, "linear_cross_entropy", verl_lce.linear_cross_entropy)
    plugin.use_softpo_linear_cross_entropy()
    assert verl_lce.linear_cross_entropy is plugin.linear_cross_entropy


# The sampler's settings through the backend. verl passes only the temperature; use_softpo_linear_cross_entropy
# adds the rollout's truncation. Each case bites: the "none" case checks the temperature layouts alone.
SAMPLERS = {
    "none": {},
    "top-k": dict(top_k=5),
    "top-k-off": dict(top_k=-1, top_p=0.7),  # verl's and vLLM's "no top-k"
    "top-p": dict(top_p=0.6),
    "min-p": dict(min_p=0.1),
    "all": dict(top_k=8, top_p=0.85, min_p=0.02, logit_scale=0.8, softcap=4.0),
}
# How verl's forwards can hand the temperature over (labels' layout, temperature's layout).
TEMPERATURES = ["float", "padded-per-sequence", "packed-per-token", "packed-per-token-squeezed"]


@pytest.fixture
def softpo_backend(monkeypatch):
    """use_softpo_linear_cross_entropy with verl's attribute and the plugin's settings restored afterwards."""
    from verl.utils.kernel import linear_cross_entropy as verl_lce

    monkeypatch.setattr(verl_lce, "linear_cross_entropy", verl_lce.linear_cross_entropy)
    monkeypatch.setattr(plugin, "_sampler", dict(plugin._sampler))
    return verl_lce


def sampler_case(layout, seed=3, H=16, V=97):
    """hidden, weight, labels, temperature as verl's forward passes them, and the per-token temperature [N]."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 5
    lengths = [5, 2, 4]  # packed: the three sequences back to back, total 11
    shape = (B, T) if layout in ("float", "padded-per-sequence") else (1, sum(lengths))
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.5 / H ** 0.5)
    labels = torch.randint(0, V, shape, generator=g)
    logits = hidden @ weight.T
    labels.view(-1)[1] = logits.view(-1, V)[1].argmin()  # outside any truncated kept set
    labels.view(-1)[4] = logits.view(-1, V)[4].argmax()  # inside every one
    per_sequence = 0.5 + torch.rand(B, generator=g, dtype=torch.float64)
    if layout == "float":
        return hidden, weight, labels, 0.8, torch.full((B * T,), 0.8, dtype=torch.float64)
    if layout == "padded-per-sequence":
        return hidden, weight, labels, per_sequence.float(), per_sequence.repeat_interleave(T)
    per_token = per_sequence.repeat_interleave(torch.tensor(lengths))  # verl's expand_as_nested(...).values()
    given = per_token.float().unsqueeze(0) if layout == "packed-per-token" else per_token.float()
    return hidden, weight, labels, given, per_token


@pytest.mark.parametrize("layout", TEMPERATURES)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_backend_scores_under_the_rollout_sampler(softpo_backend, sampler, layout):
    # Through verl's looked-up name, as its fused forward calls it; against transformers' warpers in float64.
    from test_sampler_faithful import warped

    settings = dict(SAMPLERS[sampler])
    plugin.use_softpo_linear_cross_entropy(**settings)
    if settings.get("top_k") == -1:
        settings.pop("top_k")
    hidden, weight, labels, temperature, per_token = sampler_case(layout)
    g = torch.Generator().manual_seed(11)
    d_logp, d_entropy = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)

    def reference(h, w):
        z = (h @ w.T).reshape(-1, w.shape[0])
        logp, entropy, excluded = warped(z, labels.reshape(-1), settings, per_token.to(z.dtype))
        return logp.view(labels.shape), entropy.view(labels.shape), excluded.view(labels.shape)

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logp, entropy, *_ = fn(h, w)
        upstream = torch.where(torch.isfinite(logp), d_logp.to(logp.dtype), 0)  # an excluded label sends none
        torch.autograd.backward([torch.where(torch.isfinite(logp), logp, 0), entropy],
                                [upstream, d_entropy.to(entropy.dtype)])
        return logp.detach(), entropy.detach(), h.grad, w.grad

    ours = run(lambda h, w: softpo_backend.linear_cross_entropy(h, w, labels, temperature, "none"),
               hidden.float(), weight.float())
    ref = run(reference, hidden.float(), weight.float())
    gt = run(reference, hidden, weight)
    excluded = reference(hidden, weight)[2]
    assert ours[0].shape == ours[1].shape == labels.shape and ours[0].dtype == torch.float32
    assert torch.equal(torch.isneginf(ours[0]), excluded), "exactly the labels outside the kept set get -inf"
    if sampler == "none":
        assert not excluded.any()
    else:
        assert excluded.any(), "a case whose kept sets hold every label does not test the truncation"
    for what, out, r, exact in zip(("logp", "entropy", "d_hidden", "d_weight"), ours, ref, gt):
        if what == "logp":
            out, r, exact = out[~excluded], r[~excluded], exact[~excluded]
        err, ref_err = (out.double() - exact).abs().max(), (r.double() - exact).abs().max()
        assert err <= ref_err + 2e-5 * (1 + exact.abs().max()), (what, err, ref_err)


def test_backend_truncation_changes_the_log_probs(softpo_backend):
    # Guards the test above: the same call with verl's default (no truncation) gives other log-probs.
    hidden, weight, labels, temperature, _ = sampler_case("packed-per-token")
    plugin.use_softpo_linear_cross_entropy()
    full, _ = softpo_backend.linear_cross_entropy(hidden.float(), weight.float(), labels, temperature, "none")
    plugin.use_softpo_linear_cross_entropy(top_p=0.6)
    truncated, _ = softpo_backend.linear_cross_entropy(hidden.float(), weight.float(), labels, temperature, "none")
    kept = torch.isfinite(truncated)
    assert (truncated[kept] > full[kept] + 1e-4).all(), "renormalized over fewer tokens, each kept label gains"
    plugin.use_softpo_linear_cross_entropy()
    again, _ = softpo_backend.linear_cross_entropy(hidden.float(), weight.float(), labels, temperature, "none")
    assert torch.equal(again, full), "a call with the defaults goes back to verl's full softmax"


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=2.0), "min_p"),
    (dict(logit_scale=0.0), "logit_scale"), (dict(softcap=0.0), "softcap"), (dict(softcap=float("inf")), "softcap"),
])
def test_backend_bad_sampler_settings_raise_naming_the_argument(softpo_backend, kwargs, name):
    plugin.use_softpo_linear_cross_entropy(top_k=4)
    with pytest.raises(ValueError, match=name):
        plugin.use_softpo_linear_cross_entropy(**kwargs)
    assert plugin._sampler["top_k"] == 4, "a refused call leaves the settings as they were"


def test_backend_bad_temperature_raises():
    hidden, weight, labels, _, _ = sampler_case("packed-per-token")
    for temperature in (0.0, torch.full((1, 7), 0.8), torch.tensor([0.8, -1.0, 0.9])):
        with pytest.raises(ValueError, match="temperature"):
            plugin.linear_cross_entropy(hidden, weight, labels, temperature, "none")


def test_sampler_settings_from_the_environment():
    # A Ray worker gets them at import (SOFTPO_VERL_FUSED_KERNEL=1 with SOFTPO_VERL_TOP_K, ...).
    env = {"SOFTPO_VERL_TOP_K": "50", "SOFTPO_VERL_TOP_P": "0.9", "SOFTPO_VERL_MIN_P": " ", "SOFTPO_VERL_SOFTCAP": "30"}
    assert plugin._sampler_from_env(env) == dict(top_k=50, top_p=0.9, softcap=30.0)
    with pytest.raises(ValueError, match="SOFTPO_VERL_TOP_K"):
        plugin._sampler_from_env({"SOFTPO_VERL_TOP_K": "0.5"})
    code = ("import verl; from verl.utils.kernel import linear_cross_entropy as m; "
            "from softpo.integrations import verl as p; "
            "print(m.linear_cross_entropy is p.linear_cross_entropy, p._sampler['top_k'], p._sampler['top_p'])")
    base = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": "softpo.integrations.verl"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                         env={**base, "SOFTPO_VERL_FUSED_KERNEL": "1", "SOFTPO_VERL_TOP_K": "-1",
                              "SOFTPO_VERL_TOP_P": "0.95"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["True", "None", "0.95"], out.stdout
    out = subprocess.run([sys.executable, "-c", "import softpo.integrations.verl"], check=False, capture_output=True,
                         text=True, timeout=300, env={**base, "SOFTPO_VERL_TOP_P": "0.95"})
    assert out.returncode != 0 and "SOFTPO_VERL_FUSED_KERNEL" in out.stderr, "a setting left unused must not pass"


def test_use_softpo_linear_cross_entropy_rebinds_megatron_forwards(softpo_backend, monkeypatch):
    # Megatron's fused forwards bind the name at import; an already imported one is rerouted too.
    import types

    for name in plugin._BOUND_BY_NAME:
        module = types.ModuleType(name)
        module.linear_cross_entropy = softpo_backend.linear_cross_entropy
        monkeypatch.setitem(sys.modules, name, module)
    plugin.use_softpo_linear_cross_entropy(top_k=3)
    for name in plugin._BOUND_BY_NAME:
        assert sys.modules[name].linear_cross_entropy is plugin.linear_cross_entropy, name


@pytest.mark.parametrize("info", list(GLOBAL_INFO), ids=list(GLOBAL_INFO))
@pytest.mark.parametrize("name", list(TWINS))
def test_losses_leave_out_tokens_outside_the_kept_set(name, info):
    # Under a truncating backend a response token can get log-prob -inf, now (after an update) or in the old
    # log-probs. The loss is verl's own on the batch with those tokens masked, divided by the same counts.
    old, logp, advantages, mask, weights = random_batch(seed=4)
    config = actor_config("token-mean", GLOBAL_INFO[info])
    logp_inf, old_inf = logp.clone(), old.clone()
    logp_inf[0, 2] = logp_inf[4, 1] = float("-inf")
    old_inf[5, 6] = float("-inf")
    outside = torch.isneginf(logp_inf) | torch.isneginf(old_inf)
    assert (mask[outside]).all()
    ours = loss_and_grad(core_algos.get_policy_loss_fn(name), old_inf, logp_inf, advantages, mask, "token-mean",
                         config, weights)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    assert (ours[1][outside] == 0).all()
    assert ours[2]["actor/softpo/outside_support"] == pytest.approx(3 / mask.sum().item())
    if info == "local":
        # verl's local token count is that of the response mask, outside tokens included.
        config = actor_config("token-mean", {"batch_num_tokens": int(mask.sum())})
    theirs = loss_and_grad(core_algos.get_policy_loss_fn(TWINS[name]), old, logp, advantages, mask & ~outside,
                           "token-mean", config, weights)
    assert_same(ours, theirs)


def test_registered_losses_keep_verl_signature():
    # verl calls the loss with these keywords (verl/workers/utils/losses.py: ppo_loss).
    expected = list(inspect.signature(core_algos.compute_policy_loss_vanilla).parameters)
    for name in list(plugin.LOSSES) + ["softpo_spo"]:
        assert list(inspect.signature(core_algos.get_policy_loss_fn(name)).parameters) == expected, name



def _actor_step(tmp_path, loss_mode, backend):
    out = tmp_path / f"{loss_mode}-{backend}.pt"
    script = os.path.join(os.path.dirname(__file__), "verl_actor_step.py")
    run = subprocess.run([sys.executable, script, loss_mode, backend, str(out)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_actor_update_through_verl_training_worker(tmp_path):
    # One mini-batch (two micro-batches) through verl's own actor worker on CPU: softpo_sapo with softpo's fused
    # backend in verl's use_fused_kernels forward, against verl's sapo on the plain logits path. Same loss,
    # same gradient norm, same parameters after the optimizer step.
    ours = _actor_step(tmp_path, "softpo_sapo", "softpo")
    theirs = _actor_step(tmp_path, "sapo", "unfused")
    assert ours["backend_calls"] == 2 and theirs["backend_calls"] == 0  # one per micro-batch
    for key in ("actor/pg_loss", "grad_norm"):
        assert np.allclose(ours["metrics"][key], theirs["metrics"][key], rtol=1e-5), key
    assert ours["params"].keys() == theirs["params"].keys()
    moved = 0.0
    for name, param in ours["params"].items():
        torch.testing.assert_close(param, theirs["params"][name], rtol=1e-4, atol=5e-5, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (param - ours["before"][name]).abs().max().item())
    assert moved > 1e-3, "the update step changed nothing"
