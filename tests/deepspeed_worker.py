"""One rank of tests/test_deepspeed.py: TRL's GRPOTrainer, then SoftpoGRPOTrainer, each for two optimizer steps
under the same DeepSpeed ZeRO-3 config; rank 0 saves both trainers' gathered parameters.

    python tests/deepspeed_worker.py MODEL_DIR OUT_DIR '{"loss_type": "dapo", ...}'

with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set by the test.
"""

import json
import os
import sys
from datetime import timedelta

import torch

os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import deepspeed  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import softpo.integrations.trl as softpo_trl  # noqa: E402
from test_trl import PROMPTS, _reward, _tokenizer  # noqa: E402

# Every parameter partitioned, however small: DeepSpeed keeps parameters under this many elements whole on
# every rank, which would leave the tiny model's lm_head unpartitioned and the test without its subject.
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def _run(trainer_class, model_dir, out_dir, overrides, impl):
    # One generation batch feeds both optimizer steps (steps_per_generation=2), so both trainers train on the
    # same completions: a second generation would sample from parameters that differ by rounding.
    settings = dict(
        output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        steps_per_generation=2, max_steps=2, report_to="none", bf16=False, logging_steps=1, save_strategy="no",
        learning_rate=0.1, temperature=0.9, seed=0, deepspeed=ZERO3, optim="sgd",
    )
    settings.update(overrides)
    args = GRPOConfig(**settings)
    # After the config: transformers then loads the model straight into ZeRO-3 partitions (deepspeed.zero.Init).
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Partitioned: no data outside a gather, and on several ranks only a slice of it here.
    head = model.lm_head.weight
    assert head.numel() == 0, "lm_head.weight is not partitioned"
    assert int(os.environ["WORLD_SIZE"]) == 1 or head.ds_tensor.numel() < head.ds_numel
    trainer = trainer_class(
        model=model, reward_funcs=_reward, args=args, processing_class=_tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
    )
    if impl is not None:
        trainer.softpo_impl = impl
    trainer.train()
    assert trainer.model.lm_head.weight.numel() == 0, "lm_head.weight was left gathered after training"
    params = dict(trainer.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}, trainer.state.log_history


def _count_cpu_deepspeed_processes():
    """accelerate (1.15) picks a process group backend from the devices it knows; on a machine with none it
    counts one process, even when DeepSpeed runs several on its CPU accelerator. Give it gloo over all of them,
    the backend DeepSpeed's CPU runs use, as accelerate itself does for `cpu=True` runs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_CPU

    PartialState._prepare_backend = prepare_backend


def main(model_dir, out_dir, overrides):
    overrides = json.loads(overrides)
    impl = overrides.pop("softpo_impl", None)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        _count_cpu_deepspeed_processes()
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=120))
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)

    calls = []
    gathered_loss = softpo_trl.head_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return gathered_loss(*args, **kwargs)

    # The forward looks head_loss up in softpo.integrations.trl's namespace at each call.
    softpo_trl.head_loss = counting
    results = {}
    for name, trainer_class in (("trl", GRPOTrainer), ("softpo", softpo_trl.SoftpoGRPOTrainer)):
        results[name] = _run(trainer_class, model_dir, os.path.join(out_dir, name), overrides, impl)
    # One softpo loss per micro-batch: two optimizer steps of `gradient_accumulation_steps` each.
    expected = 2 * overrides.get("gradient_accumulation_steps", 1)
    assert len(calls) == expected, f"the ZeRO-3 loss ran {len(calls)} times, expected {expected}"
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
