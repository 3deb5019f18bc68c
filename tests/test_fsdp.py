"""FSDP2, each sharded run against its unsharded twin on two spawned CPU processes (gloo on loopback):

- `softpo train --fsdp` against data parallel (DDP) from the same seed, fp32, two minibatches per step:
  parameters equal to 1e-6 relative after 3 steps, tied and untied heads, and a run resumed from its
  sharded checkpoint after step 2 equal to the straight run;
- the head-weight gather for a head FSDP2 has not gathered: the data-parallel average gradient;
- SoftpoGRPOTrainer against TRL's GRPOTrainer, both under accelerate's FSDP2 plugin: parameters after 2 steps;
- bad arguments: one line, exit status 2."""

import json
import os
import shutil
import socket

import pytest
import torch

from softpo import train
from softpo.head import gathered_weight
from softpo.train import checkpoint, flags, fsdp, policy

from test_train import TINY, TIMING_KEYS, read_metrics

# The head and routing are exercised with a KL reference (grpo with beta): the reference model is sharded too.
COMMON = [*TINY, "--loss", "grpo", "--beta", "0.05", "--minibatches", "2", "--save-every", "2"]
# Gloo's collectives and a spawn should take seconds here; anything longer is a hang.
TIMEOUT_S = 300
RTOL = 1e-6


def _join_group(rank, world, port):
    """Environment of a torchrun rank, and a timeout on the process group whoever creates it."""
    import datetime

    import torch.distributed as dist

    # Gloo on the loopback interface: the hostname may resolve to another one.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    init = dist.init_process_group

    def init_with_timeout(*args, **kwargs):
        kwargs.setdefault("timeout", datetime.timedelta(seconds=TIMEOUT_S))
        return init(*args, **kwargs)

    dist.init_process_group = init_with_timeout


def _train_worker(rank, world, port, argv, dump_dir):
    _join_group(rank, world, port)
    original = checkpoint.save_checkpoint

    def save_and_dump(run_dir, step, model, *rest, **options):
        # A collective under FSDP2: every rank gathers, each writes its own copy.
        full = {k: v.detach().clone() for k, v in fsdp.full_state_dict(model).items()}
        torch.save(full, os.path.join(dump_dir, f"rank{rank}-step{step}.pt"))
        return original(run_dir, step, model, *rest, **options)

    checkpoint.save_checkpoint = save_and_dump
    if train.main(argv) != 0:
        raise SystemExit(1)


def _spawn(worker, *args, clean=None, timeout_s=900):
    """Two ranks of `worker(rank, 2, port, *args)`, killed past `timeout_s`; a gloo SIGABRT is retried after
    removing `clean` (tests/distributed.py)."""
    from distributed import free_port, spawn_with_deadline

    spawn_with_deadline(worker, 2, lambda: (2, free_port(), *args), timeout_s,
                        before_retry=None if clean is None else lambda: shutil.rmtree(clean, ignore_errors=True))


def _run(argv, dump_dir):
    # A fresh run is removed before a retry; a resumed one keeps its directory.
    _spawn(_train_worker, argv, str(dump_dir), clean=None if "--resume" in argv else argv[argv.index("--out") + 1])


def _params(dump_dir, step):
    rank0, rank1 = (torch.load(os.path.join(dump_dir, f"rank{r}-step{step}.pt")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks disagree on the gathered parameters"
    return rank0


def _assert_close(out, expected, what):
    assert out.keys() == expected.keys()
    for name, value in expected.items():
        error = (out[name].double() - value.double()).abs().max().item()
        assert error <= RTOL * value.double().abs().max().item(), f"{what}: {name} differs by {error:.3g}"


def _same_metrics(a_rows, b_rows):
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        for key in a.keys() - TIMING_KEYS:
            if key == "expert_load":
                torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(a[key]), rtol=1e-5, atol=1e-6)
            elif isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("tie", [False, True], ids=["untied-head", "tied-head"])
def test_fsdp_matches_ddp_and_resumes(tmp_path, tie):
    common = [*COMMON, *(["--tie-embeddings"] if tie else [])]
    ddp, fsdp, split = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "split"
    for name in ("ddp", "fsdp", "split"):
        (tmp_path / f"dump-{name}").mkdir()
    _run([*common, "--steps", "3", "--out", str(ddp)], tmp_path / "dump-ddp")
    _run([*common, "--fsdp", "--steps", "3", "--out", str(fsdp)], tmp_path / "dump-fsdp")
    _run([*common, "--fsdp", "--steps", "2", "--out", str(split)], tmp_path / "dump-split")
    _run(["--resume", str(split), "--steps", "3"], tmp_path / "dump-split")

    expected = _params(tmp_path / "dump-ddp", 3)
    args = flags.parse_args(common)
    initial = policy.build_model(args, policy.build_tokenizer(args), torch.device("cpu")).state_dict()
    assert any(not torch.equal(initial[k], expected[k]) for k in expected), "three steps changed nothing"
    if tie:
        assert torch.equal(expected["lm_head.weight"], expected["model.embed_tokens.weight"])
    else:
        assert not torch.equal(expected["lm_head.weight"], expected["model.embed_tokens.weight"])
    _assert_close(_params(tmp_path / "dump-fsdp", 2), _params(tmp_path / "dump-ddp", 2), "FSDP2 step 2")
    _assert_close(_params(tmp_path / "dump-fsdp", 3), expected, "FSDP2 step 3")

    # Resumed from the sharded checkpoint of step 2: exactly the straight FSDP2 run, metrics included.
    straight, resumed = _params(tmp_path / "dump-fsdp", 3), _params(tmp_path / "dump-split", 3)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "resume differs from the straight run"
    assert len(read_metrics(split)) == len(read_metrics(fsdp)) == 3
    assert read_metrics(split) == [{**r, **{k: s[k] for k in TIMING_KEYS}}
                                   for r, s in zip(read_metrics(fsdp), read_metrics(split))]
    _same_metrics(read_metrics(ddp), read_metrics(fsdp))

    checkpoint = torch.load(fsdp / "checkpoint.pt", weights_only=False)
    assert checkpoint["sharded"] and checkpoint["step"] == 3 and "model" not in checkpoint
    assert os.path.isdir(fsdp / "checkpoint.dcp") and not os.path.exists(fsdp / "checkpoint.dcp.partial")
    assert json.loads((fsdp / "config.json").read_text())["args"]["fsdp"] is True


def _gather_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    _join_group(rank, world, port)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # V = 7 rows over 2 ranks: uneven shards (4 and 3).
    head = torch.nn.Linear(5, 7, bias=False)
    whole = head.weight.detach().clone()
    fully_shard(head)
    torch.manual_seed(1 + rank)
    hidden, upstream = torch.randn(3, 5), torch.randn(3, 7)
    grads = {}
    for name, gather in (("gathered", gathered_weight), ("full_tensor", lambda w: w.full_tensor())):
        head.weight.grad = None
        # The head's own forward never runs, so FSDP2 never gathers it: the loss gathers it.
        weight = gather(head.weight)
        assert torch.equal(weight, whole)
        (hidden @ weight.T * upstream).sum().backward()
        grads[name] = head.weight.grad.full_tensor()
    # What data parallel would apply: the average over ranks of each rank's gradient of the whole weight.
    expected = upstream.T @ hidden
    dist.all_reduce(expected)
    grads["expected"] = expected / world
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_gathered_head_weight_gradient_is_averaged(tmp_path):
    _spawn(_gather_worker, str(tmp_path))
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(grads["gathered"], grads["expected"], rtol=1e-6, atol=1e-7)
        # Why the drop-in does not call full_tensor(): each rank keeps its own slice, unreduced.
        assert not torch.allclose(grads["full_tensor"], grads["expected"], rtol=1e-3, atol=1e-5)


def _accelerate_fsdp2_on_cpu(trainer_class):
    """`trainer_class` whose accelerator runs FSDP2 on CPU processes.

    accelerate (1.15, state.py, `AcceleratorState.__init__`) switches the distributed type to FSDP only for
    GPU-like multi-device types; on CPU processes (MULTI_CPU) it drops the FSDP plugin without a word and the
    trainer runs DDP. Here the state is switched after the Accelerator is built, with the plugin the trainer
    built from its own arguments; from there it is accelerate's FSDP2 path: `fsdp2_prepare_model`
    (fully_shard per decoder layer, the final norm and lm_head as one group, the root), the optimizer built
    on the sharded parameters, FSDP2's gradient reduction and clipping.
    """

    class OnCPU(trainer_class):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.state import AcceleratorState, PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = AcceleratorState()
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

    return OnCPU


def _trl_worker(rank, world, port, model_dir, out_dir):
    _join_group(rank, world, port)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    torch.set_num_threads(1)
    import datasets
    import test_trl
    from transformers import Qwen2ForCausalLM

    import softpo.integrations.trl as softpo_trl

    heads = []
    original_loss = softpo_trl.policy_loss

    def recording_loss(*args, weight, **kwargs):
        from torch.distributed.tensor import DTensor

        heads.append((isinstance(weight, DTensor), tuple(weight.shape)))
        return original_loss(*args, weight=weight, **kwargs)

    softpo_trl.policy_loss = recording_loss
    results = {}
    runs = (("gt", test_trl.GRPOTrainer, torch.float64), ("ref", test_trl.GRPOTrainer, torch.float32),
            ("out", softpo_trl.SoftpoGRPOTrainer, torch.float32))
    for name, trainer_class, dtype in runs:
        args = test_trl._args(
            os.path.join(out_dir, name), fsdp="full_shard",
            fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]},
            # Rounding in a near-zero gradient is otherwise scaled by Adam to a step of the learning rate.
            adam_epsilon=1e-3, gradient_checkpointing=False, ddp_timeout=TIMEOUT_S,
        )
        trainer = _accelerate_fsdp2_on_cpu(trainer_class)(
            model=Qwen2ForCausalLM.from_pretrained(model_dir, dtype=dtype), reward_funcs=test_trl._reward, args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": test_trl.PROMPTS}),
            processing_class=test_trl._tokenizer(),
        )
        trainer.train()
        results[name] = {k: v.detach().clone() for k, v in fsdp.full_state_dict(trainer.model).items()}
        results[name + "_sharded"] = fsdp.is_sharded(trainer.model)
        results[name + "_losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    results["heads"] = heads
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("tie", [False, True], ids=["untied-head", "tied-head"])
def test_trl_drop_in_under_fsdp2_matches_trl(tmp_path, tie):
    """SoftpoGRPOTrainer and TRL's GRPOTrainer, both under accelerate's FSDP2 on two CPU processes: the
    parameters after two steps. gt = TRL in float64, ref = TRL in float32, out = softpo in float32:
    |out - gt| <= |ref - gt| + 1e-5 of the largest change two steps made to that tensor."""
    test_trl = pytest.importorskip("test_trl")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(test_trl.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
        eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    model_dir = tmp_path / "model"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    initial = Qwen2ForCausalLM.from_pretrained(model_dir).state_dict()
    _spawn(_trl_worker, str(model_dir), str(tmp_path))

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("gt", "ref", "out"):
        assert rank0[name + "_sharded"], f"{name}: the trainer's model is not an FSDP2 module"
        assert all(torch.equal(rank0[name][k], rank1[name][k]) for k in rank0[name]), f"{name}: ranks disagree"
        assert len(rank0[name + "_losses"]) == 2
    # softpo's loss saw the whole head, gathered by FSDP2 inside the forward.
    vocab_by_hidden = (len(test_trl.VOCAB), 32)
    assert rank0["heads"] and all(head == (False, vocab_by_hidden) for head in rank0["heads"]), rank0["heads"]
    assert rank0["out_losses"] == pytest.approx(rank0["ref_losses"], rel=1e-5, abs=1e-6)
    gt, ref, out = rank0["gt"], rank0["ref"], rank0["out"]
    if tie:
        assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    for name, value in gt.items():
        change = (value - initial[name].double()).abs().max().item()
        assert change > 0, f"{name}: two steps left it unchanged"
        bound = (ref[name].double() - value).abs() + 1e-5 * change
        worst = ((out[name].double() - value).abs() - bound).max().item()
        assert worst <= 0, f"{name}: |out - gt| exceeds |ref - gt| + tol by {worst:.3g}"


def test_fsdp_without_torchrun_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert train.main([*TINY, "--fsdp", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fsdp: launch with torchrun" in err
    assert not (tmp_path / "run").exists()


def test_tie_embeddings_is_for_the_built_in_model(tmp_path, capsys):
    assert train.main(["--model", str(tmp_path), "--tie-embeddings", "--out", str(tmp_path / "run")]) == 2
    assert "--tie-embeddings applies to the built-in model only" in capsys.readouterr().err


def test_resume_refuses_a_change_of_sharding(tmp_path):
    """A run saved without --fsdp has a whole-model checkpoint.pt; resuming it sharded is refused, by a
    one-rank torchrun-like process (a process group of one, so nothing of it leaks into this test process)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    assert train.main([*TINY, "--steps", "1", "--out", str(run)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               GLOO_SOCKET_IFNAME="lo")
    argv = ["--resume", str(run), "--fsdp", "--steps", "2"]
    code = f"from softpo import train; raise SystemExit(train.main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 2, done.stderr
    assert "--resume: the run was saved without --fsdp" in done.stderr
    assert [r["step"] for r in read_metrics(run)] == [1]


def test_resume_after_a_save_interrupted_before_checkpoint_pt(tmp_path):
    """The shards of step 2 moved into place, checkpoint.pt still naming step 1 (a crash in between): the
    resume finds step 1's shards in checkpoint.dcp.previous and redoes step 2 exactly."""
    run, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    _run([*COMMON, "--fsdp", "--steps", "1", "--save-every", "1", "--out", str(run)], dump)
    after_step_1 = (run / "checkpoint.pt").read_bytes()
    _run(["--resume", str(run), "--steps", "2"], dump)
    first = read_metrics(run)
    assert (run / "checkpoint.dcp.previous").is_dir() and len(first) == 2
    (run / "checkpoint.pt").write_bytes(after_step_1)
    _run(["--resume", str(run), "--steps", "2"], dump)
    again = read_metrics(run)
    assert len(again) == 2
    assert {k: v for k, v in again[1].items() if k not in TIMING_KEYS} == \
        {k: v for k, v in first[1].items() if k not in TIMING_KEYS}
