"""Routing replay (softpo/routing.py, `softpo train --routing-replay`): forced experts, live gate weights, R2
after updates, R3 against a teacher-forced forward, the loop's metrics, and models it refuses."""

import json

import pytest
import torch

import softpo
from softpo import train
from softpo.train import flags, policy, routing, tasks

from test_train import TINY as ONE_LAYER, _restore_threads  # noqa: E402, F401

# Two MoE layers: replay is keyed by layer.
TINY = [*ONE_LAYER[:2], "--layers", "2", *ONE_LAYER[4:]]


def tiny_moe(kind, norm_topk_prob=True):
    from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    common = dict(vocab_size=23, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2)
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=16, num_experts=4, moe_intermediate_size=16,
                                                  norm_topk_prob=norm_topk_prob))
    if kind == "olmoe":
        return OlmoeForCausalLM(OlmoeConfig(**common, num_experts=4, norm_topk_prob=norm_topk_prob))
    return MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4))


MODELS = [("qwen3_moe", True), ("qwen3_moe", False), ("olmoe", True), ("olmoe", False), ("mixtral", True)]
IDS = ["qwen3moe-norm", "qwen3moe-nonorm", "olmoe-norm", "olmoe-nonorm", "mixtral"]


@pytest.mark.parametrize("kind, norm", MODELS, ids=IDS)
def test_forcing_the_models_own_experts_changes_nothing(kind, norm):
    """Replaying the experts a forward chose gives that forward's output: the recomputed gate weights are
    the model's own (softmax over all experts, renormalized over the k exactly when the model does)."""
    model = tiny_moe(kind, norm).eval()
    replay = routing.RoutingReplay(model)
    assert len(replay.routers) == 2
    ids = torch.randint(0, 23, (3, 7))
    with torch.no_grad(), replay.route() as recording:
        expected = model(input_ids=ids).logits
    recorded = recording.forward_layout(3, 7)
    assert recorded.shape == (3, 7, 2, 2)
    with torch.no_grad(), replay.route(recorded) as used:
        out = model(input_ids=ids).logits
    assert torch.equal(used.forward_layout(3, 7), recorded)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # The hooks are gone after the block.
    assert all(not module._forward_hooks for _, module in replay.routers)


@pytest.mark.parametrize("kind, norm", MODELS, ids=IDS)
def test_forced_gate_weights_are_live_softmax_at_forced_experts(kind, norm):
    model = tiny_moe(kind, norm)
    replay = routing.RoutingReplay(model)
    router = replay.routers[0][1]
    hidden = torch.randn(10, 32)
    # Force the two experts the router likes least: far from its own choice.
    with torch.no_grad():
        worst = (hidden @ router.weight.T).topk(2, dim=-1, largest=False).indices
    force = torch.full((10, 1, 2, 2), -1, dtype=torch.long)
    force[:, 0, 0] = worst
    force[9] = -1  # a position with nothing recorded routes live
    with replay.route(force) as used:
        logits, weights, experts = router(hidden)
    live = (hidden.double() @ router.weight.double().T).topk(2, dim=-1).indices
    expected_experts = torch.cat([worst[:9], live[9:]])
    assert torch.equal(experts, expected_experts) and torch.equal(used.chunks[0][0], expected_experts)
    gt = torch.softmax(hidden.double() @ router.weight.double().T, -1).gather(-1, expected_experts)
    if norm:
        gt = gt / gt.sum(-1, keepdim=True)
    torch.testing.assert_close(weights.double(), gt, rtol=1e-5, atol=1e-6)
    weights.pow(2).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_unsupported_model_type_is_named():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=23, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match=r"--routing-replay: model type 'qwen3' has no MoE router .*qwen3_moe"):
        routing.RoutingReplay(dense)


def built_in(argv=()):
    torch.set_num_threads(1)
    args = flags.parse_args([*TINY, *argv])
    args.max_new_tokens = 6
    tokenizer = policy.build_tokenizer(args)
    return args, tokenizer, policy.build_model(args, tokenizer, torch.device("cpu"))


def test_r2_replayed_forward_reproduces_recorded_experts_after_updates():
    """R2: record in the old-log-prob forward, then take several minibatch updates at a large learning rate.
    The live router's choice moves, the replayed forward still uses exactly the recorded experts, and the
    router weights keep getting a gradient from the policy loss alone."""
    args, tokenizer, model = built_in()
    replay = routing.RoutingReplay(model)
    torch.manual_seed(0)
    batch = policy.rollout(model, tokenizer, ["7", "456", "1234", "89"], args, torch.device("cpu"))
    rows = slice(None)
    with torch.no_grad():
        _, _, recorded = policy.routed_forward(model, batch, rows, True, replay, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    advantages = torch.randn(batch["targets"].shape[0])
    config = softpo.preset("grpo")
    start = batch["prompt_length"] - 1
    moved = []
    for update in range(6):
        for half in (slice(0, 8), slice(8, 16)):
            hidden, router, used = policy.routed_forward(model, batch, half, True, replay, recorded[half])
            assert torch.equal(used, recorded[half])
            live = routing.top_k_sets(routing.routed_experts(router, 2), start)
            moved.append((live != routing.top_k_sets(recorded[half], start)).any(-1)[:, batch["mask"][half]])
            out = softpo.policy_loss(config, batch["targets"][half], batch["mask"][half], advantages[half],
                                     hidden=hidden, weight=model.lm_head.weight, impl="torch")
            optimizer.zero_grad()
            out.loss.backward()
            for _, module in replay.routers:
                assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
            optimizer.step()
    # The updates changed the routing the live router would choose at some completion positions.
    assert torch.cat([m.flatten() for m in moved[-2:]]).any()
    # After all updates, a fresh replayed forward reproduces the recorded top-k sets exactly.
    with torch.no_grad():
        _, _, used = policy.routed_forward(model, batch, rows, True, replay, recorded)
    assert torch.equal(routing.top_k_sets(used, start), routing.top_k_sets(recorded, start))


def test_r3_rollout_experts_equal_teacher_forced_forward():
    """R3 with unchanged weights: the experts recorded while `generate` sampled (prefill, then one token per
    call with the KV cache) are those a teacher-forced forward over the finished sequences chooses, at every
    valid prompt and completion position."""
    args, tokenizer, model = built_in()
    replay = routing.RoutingReplay(model)
    torch.manual_seed(1)
    batch = policy.rollout(model, tokenizer, ["7", "456", "1234", "89"], args, torch.device("cpu"), replay)
    sampled = batch["rollout_experts"]
    assert sampled.shape == (*batch["input_ids"].shape, 2, 2)
    assert (sampled[:, -1] == -1).all() and (sampled[:, :-1] >= 0).all()
    with torch.no_grad():
        _, router, forced = policy.routed_forward(model, batch, slice(None), True, replay, None)
    valid = batch["valid"].clone()
    valid[:, -1] = False  # the last token is never fed to generate
    assert valid[:, batch["prompt_length"]:].sum() > 10
    recorded = sampled.sort(-1).values[valid]
    teacher = forced.sort(-1).values[valid]
    # A position whose k-th and (k+1)-th router probabilities tie to float rounding may pick either.
    probs = torch.stack([torch.softmax(layer, -1) for layer in router], dim=2)[valid].topk(3, dim=-1).values
    clear = (probs[..., 1] - probs[..., 2]) > 1e-5
    assert clear.float().mean() > 0.95
    assert torch.equal(recorded[clear], teacher[clear])


def read_metrics(run):
    with open(run / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("mode", ["old", "rollout"])
def test_loop_with_replay_has_no_routing_drift(tmp_path, mode):
    drifting = [*TINY, "--minibatches", "2", "--epochs", "2", "--lr", "2e-2", "--steps", "3"]
    free, pinned = tmp_path / "free", tmp_path / mode
    assert train.main([*drifting, "--out", str(free)]) == 0
    assert train.main([*drifting, "--routing-replay", mode, "--out", str(pinned)]) == 0
    free_rows, pinned_rows = read_metrics(free), read_metrics(pinned)
    # Without replay this setting drifts; with it the training forwards use the old forward's experts.
    assert sum(r["routing_drift"] for r in free_rows) > 0
    assert all(r["replay_logp_gap"] is None for r in free_rows)
    assert all(r["routing_drift"] == 0 for r in pinned_rows)
    assert all(0 <= r["replay_logp_gap"] <= 1e-5 for r in pinned_rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in pinned_rows)


def test_loop_refuses_replay_on_a_dense_model(tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tasks.make_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model_dir = tmp_path / "dense"
    Qwen3ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    capsys.readouterr()
    run = tmp_path / "run"
    argv = ["--model", str(model_dir), *TINY, "--steps", "1", "--routing-replay", "old", "--out", str(run)]
    assert train.main(argv) == 2
    # The last line: transformers draws a progress bar while it loads the weights.
    err = capsys.readouterr().err.rsplit("\r", 1)[-1].splitlines()[-1]
    assert err.startswith("softpo train: error: --routing-replay: model type 'qwen3'") and "Traceback" not in err
    assert not run.exists()
