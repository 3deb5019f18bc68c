"""One PPO mini-batch update through verl's TrainingWorker on CPU, run as a script by tests/test_verl.py.

    python tests/verl_actor_step.py LOSS_MODE BACKEND OUT.pt      (BACKEND: softpo | unfused)

TrainingWorker is the class verl's ActorRolloutRefWorker builds for the actor: FSDP2 engine, the
ppo_loss that calls the registered policy loss, two micro-batches accumulated into one optimizer
step. The script writes the metrics and the parameters after the step to OUT.pt.

verl 0.9.1 has no CPU platform (it falls back to CUDA), so this script registers a minimal one and
selects the FSDP engine that verl registers for CUDA with VERL_ENGINE_DEVICE=cuda; the process group
is gloo. Attention is sdpa without padding removal (verl's padding removal needs flash-attn).
"""

import contextlib
import datetime
import os
import socket
import sys
import tempfile
from functools import partial

import torch

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
                  VERL_ENGINE_DEVICE="cuda")
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    os.environ["MASTER_PORT"] = str(_s.getsockname()[1])

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import set_platform  # noqa: E402


class _CPUDeviceModule:
    """torch.cpu plus the memory statistics verl logs, which a CPU does not keep (zero)."""

    def __getattr__(self, name):
        if name == "get_device_name":
            return lambda *args, **kwargs: "cpu"
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name.startswith(("max_memory", "memory_", "reset_peak")):
            return lambda *args, **kwargs: 0
        return getattr(torch.cpu, name)


class CPUPlatform(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _CPUDeviceModule()

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"  # verl moves modules to this with .to(device=...)

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return (None, None)

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CPU_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


set_platform(CPUPlatform())

from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.kernel import linear_cross_entropy as verl_lce  # noqa: E402
from verl.workers.config import (  # noqa: E402
    ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, PolicyLossConfig,
)
from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from softpo.integrations import verl as plugin  # noqa: E402


def build_worker(path, loss_mode, fused):
    model_config = HFModelConfig(
        path=path, load_tokenizer=False, use_remove_padding=False, use_fused_kernels=fused,
        fused_kernel_options={"impl_backend": "triton"} if fused else {},
        override_config={"attn_implementation": "sdpa"}, enable_gradient_checkpointing=False,
    )
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    engine = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, model_dtype="fp32", mixed_precision=fp32)
    engine.use_dynamic_bsz = False
    engine.micro_batch_size_per_gpu = 2
    actor = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                        loss_agg_mode="token-mean", policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    worker = TrainingWorker(TrainingWorkerConfig(model_type="language_model", model_config=model_config,
                                                 engine_config=engine, optimizer_config=FSDPOptimizerConfig(lr=1e-2)))
    worker.reset()
    worker.set_loss_fn(partial(ppo_loss, config=actor))
    return worker


def mini_batch():
    """Four sequences as verl's trainer hands them to update_actor: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(1)
    B, P, R = 4, 3, 5
    prompt_len, response_len = [3, 2, 3, 1], [5, 3, 1, 4]
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    for b in range(B):
        attention_mask[b, P - prompt_len[b]: P + response_len[b]] = 1
    input_ids = torch.randint(1, 97, (B, P + R), generator=g) * attention_mask
    response_mask = attention_mask[:, P:]
    data = DataProto.from_single_dict({
        "input_ids": input_ids, "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "prompts": input_ids[:, :P], "responses": input_ids[:, P:], "response_mask": response_mask,
        "old_log_probs": (-torch.rand(B, R, generator=g) * 3 - 3) * response_mask,
        "advantages": (torch.randn(B, 1, generator=g) * response_mask).contiguous(),
    }, meta_info={"temperature": 0.9})
    td = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
                         global_batch_size=B, mini_batch_size=B, epochs=1, seed=0,
                         dataloader_kwargs={"shuffle": False}, compute_loss=True)
    return td


def main(loss_mode, backend, out_path):
    calls = []
    if backend == "softpo":

        def counted(*args, **kwargs):
            calls.append(1)
            return plugin.linear_cross_entropy(*args, **kwargs)

        verl_lce.linear_cross_entropy = counted
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        with tempfile.TemporaryDirectory() as path:
            torch.manual_seed(0)
            config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=True)
            model = Qwen2ForCausalLM(config)
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            model.save_pretrained(path)
            worker = build_worker(path, loss_mode, fused=backend == "softpo")
            metrics = tu.get(worker.train_mini_batch(mini_batch()), "metrics")
            params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                      for name, p in worker.engine.module.named_parameters()}
        torch.save({"metrics": dict(metrics), "before": before, "params": params, "backend_calls": len(calls)},
                   out_path)
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
