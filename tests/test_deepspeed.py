"""softpo's TRL drop-in under DeepSpeed ZeRO-3: the same parameters after two optimizer steps as TRL's GRPOTrainer.

Under ZeRO-3 the loss runs inside lm_head's forward (softpo/integrations/zero3.py). The first test checks that
route without DeepSpeed: the same loss and gradients as the direct route. Each parity case then spawns real
ranks (tests/deepspeed_worker.py): DeepSpeed's CPU accelerator over gloo here, NCCL where CUDA is present. Every
rank trains TRL's GRPOTrainer and then SoftpoGRPOTrainer for two steps of one generation batch under the same
ZeRO-3 config, in which every parameter, lm_head included, is partitioned; rank 0 saves both trainers' gathered
parameters for the comparison here. The optimizer is SGD, so that a parameter differs between the runs by the
learning rate times the difference of the gradients: Adam's normalization would turn the rounding noise of
gradients near zero (the key biases') into full-size steps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("trl")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import softpo  # noqa: E402
from softpo.integrations.trl import _softpo_forward  # noqa: E402
from test_trl import VOCAB  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed_worker.py")
# A stuck collective fails the test instead of hanging CI; the first run on a machine also compiles
# DeepSpeed's shared-memory communication op (about a minute on two cores).
TIMEOUT_S = 600
# fp32 parameters after two SGD steps: a few units in the last place of the parameter. On CUDA the Triton sweep
# multiplies in tf32 (about 5e-4 relative) where TRL's head does not: a parameter may then differ by a small
# fraction of how far it moved. A gradient that misses ZeRO's partition differs by about the whole move.
RTOL, ATOL = 1e-6, 1e-8
MOVE_RTOL = 1e-2 if torch.cuda.is_available() else 0.0


def _model_dir(path, tied):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("tiny-qwen2"), tied=False)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("tiny-qwen2-tied"), tied=True)


def _route_inputs(config, B, T):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    kwargs = {name: -3.0 + 0.3 * torch.randn(B, T, generator=g) for name in ("old_logp", "ref_logp")}
    if config.objective == "spo":
        kwargs.update(rewards=torch.rand(B, generator=g), q0=torch.rand(B, generator=g))
    else:
        kwargs.update(advantages=torch.randn(B, generator=g))
    return mask, kwargs


@pytest.mark.parametrize("config", [softpo.DAPO, softpo.GSPO_TOKEN, softpo.SPO], ids=lambda c: c.name)
def test_head_route_matches_direct_route(untied_dir, config):
    """The ZeRO-3 route without DeepSpeed: lm_head's forward runs the loss, with the direct route's loss and
    gradients; without the keyword the head computes logits as before (generation)."""
    ids = torch.randint(2, len(VOCAB), (3, 12), generator=torch.Generator().manual_seed(2))
    T = 5
    mask, kwargs = _route_inputs(config, ids.shape[0], T)

    def loss_fn(outputs, weight):
        hidden = outputs.last_hidden_state[:, -T - 1 : -1]
        out = softpo.policy_loss(config, ids[:, -T:], mask, hidden=hidden, weight=weight, **kwargs)
        # A stand-in for the router loss: it reads the backbone, not the head.
        return out, outputs.last_hidden_state.square().mean()

    results = []
    for zero3 in (False, True):
        model = Qwen2ForCausalLM.from_pretrained(untied_dir, dtype=torch.float32)
        logits = model(ids).logits
        head_calls = []
        model.lm_head.register_forward_hook(lambda module, args, output: head_calls.append(type(output)))
        out, aux = _softpo_forward(model, loss_fn, zero3, input_ids=ids)
        assert head_calls == ([tuple] if zero3 else [])
        loss = out.loss + 0.1 * aux
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        results.append((loss.detach(), out.logp, dict(zip(params, grads))))
        # The head's forward has been patched by now (on the ZeRO-3 route); without the keyword it is the same.
        assert torch.equal(model(ids).logits, logits), "the forward outside softpo's call changed"
    (direct_loss, direct_logp, direct_grads), (head_loss, head_logp, head_grads) = results
    assert torch.equal(head_loss, direct_loss) and torch.equal(head_logp, direct_logp)
    for name, grad in direct_grads.items():
        assert grad is not None and torch.equal(head_grads[name], grad), name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, model_dir, out_dir, overrides):
    """Run the worker on `world` ranks; return rank 0's results. Fails, never hangs, if a rank does."""
    # Gloo's TCP transport occasionally aborts a rank (SIGABRT from a background thread; see the DDP test in
    # test_train.py): that run is started again, any other failure fails the test.
    for attempt in range(3):
        port = _free_port()
        procs, logs = [], []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
            log = open(os.path.join(out_dir, f"rank{rank}-try{attempt}.log"), "w+")
            procs.append(subprocess.Popen([sys.executable, WORKER, model_dir, out_dir, json.dumps(overrides)],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
            logs.append(log)
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            # A rank that failed leaves the others waiting in a collective: stop them at once.
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        codes = [p.returncode for p in procs]
        if all(code == 0 for code in codes):
            return torch.load(os.path.join(out_dir, "results.pt"))
        aborted = -signal.SIGABRT in codes
        if not aborted or attempt == 2:
            tails = []
            for rank, log in enumerate(logs):
                log.seek(0)
                tails.append(f"--- rank {rank} (exit {codes[rank]}) ---\n" + log.read()[-4000:])
            pytest.fail(f"DeepSpeed ranks failed (exit codes {codes}):\n" + "\n".join(tails))


def _assert_same_training(results, model_dir):
    (trl_params, trl_logs), (softpo_params, softpo_logs) = results["trl"], results["softpo"]
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial = dict(model.named_parameters())
    # A tied head is listed once, under the embedding's name.
    head = next(name for name, p in initial.items() if p is model.get_output_embeddings().weight)
    assert trl_params.keys() == softpo_params.keys() == initial.keys()
    for name, ref in trl_params.items():
        tolerance = RTOL * ref.abs() + ATOL + MOVE_RTOL * (ref - initial[name]).abs()
        worst = ((softpo_params[name] - ref).abs() - tolerance).max().item()
        assert worst <= 0, f"{name}: softpo's parameter differs from TRL's by {worst:.3g} beyond the tolerance"
    # The comparison means something only if training moved the head well beyond the tolerance.
    moved = (trl_params[head] - initial[head]).abs().max().item()
    assert moved > 1e3 * ATOL, f"two steps moved {head} by only {moved:.3g}"
    losses = [[entry["loss"] for entry in logs if "loss" in entry] for logs in (trl_logs, softpo_logs)]
    assert len(losses[0]) == len(losses[1]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)


CASES = [
    # Token-level clip on the chunked torch sweep: its backward re-reads the gathered head.
    pytest.param(2, "untied", dict(loss_type="dapo"), id="P2-untied-dapo-token"),
    # GSPO (sequence-level ratio) with a head tied to the embeddings, which ZeRO-3 gathers for two modules, and
    # ZeRO's partitioned gradients accumulated over two micro-batches per step.
    pytest.param(
        2, "tied", dict(loss_type="grpo", importance_sampling_level="sequence", gradient_accumulation_steps=2,
                        steps_per_generation=4),
        id="P2-tied-gspo-accum2",
    ),
    # The fused Triton path (interpreted on CPU), whose sweep forms d weight in the forward; one rank partitions too.
    pytest.param(1, "untied", dict(loss_type="sapo", softpo_impl="triton"), id="P1-untied-sapo-triton"),
]


@pytest.mark.parametrize("world, head, overrides", CASES)
def test_zero3_matches_trl(world, head, overrides, untied_dir, tied_dir, tmp_path):
    pytest.importorskip(
        "deepspeed", reason="DeepSpeed is not installed: pip install -e '.[deepspeed]' (DS_BUILD_OPS=0 builds no ops)"
    )
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        pytest.skip(f"{world} ranks need {world} GPUs: with CUDA present DeepSpeed runs one rank per GPU")
    model_dir = tied_dir if head == "tied" else untied_dir
    _assert_same_training(_launch(world, model_dir, str(tmp_path), overrides), model_dir)
