"""The peers: other libraries' ways of computing a case, each set up as a user of that library would.

- liger-triton: Liger-Kernel's Triton GRPO loss from logits (`triton_grpo_loss`; CUDA only).
- liger-fused-linear: Liger-Kernel's `LigerFusedLinearGRPOLoss` from hidden states (forward only:
  its chunked selective log-prob, the path it uses for reference log-probs).
- torch-linear-ce: torch's own `F.linear_cross_entropy` (chunked, torch >= 2.13) as the log-prob, then
  softpo.objectives (hidden path, no entropy).
- cut-cross-entropy: Apple's `cut-cross-entropy` kernels the same way (CUDA only).
- quack: quack-kernels' `linear_cross_entropy_func` the same way (CUDA sm_90+ only).
- trl: TRL's own log-prob (the chunked fused lm_head function GRPOTrainer installs with
  `add_fused_lm_head`, or `selective_log_softmax` on logits) followed by TRL's loss formula.
"""

from __future__ import annotations

import importlib

import torch

from .cases import Case, Provider, forward_only, loss_config, loss_kwargs


def _liger_loss_type(case: Case) -> tuple[str, str]:
    # GSPO is Liger's (and TRL's) "grpo" loss with sequence-level importance sampling.
    return {"sapo": ("sapo", "token"), "grpo": ("grpo", "token"), "gspo": ("grpo", "sequence")}[case.objective]


def _peer_policy_reason(peer: str, case: Case, entropy_ok: bool) -> str | None:
    if case.objective == "spo":
        return f"{peer} has no SPO (cumulative-Q) objective"
    if case.entropy and not entropy_ok:
        return f"{peer}'s GRPO loss computes no entropy, so no entropy bonus"
    return None


class LigerTritonProvider(Provider):
    name = "liger-triton"
    label = "Liger-Kernel triton_grpo_loss (logits, in-place backward)"
    paths = ("logits",)
    modes = ("fwdbwd",)
    extra_position = True
    needs_cuda = True
    module, package = "liger_kernel", "liger-kernel"

    def _skip_reason(self, case, device):
        if case.T > 65535:
            return f"Liger's Triton GRPO kernels launch a (B, T) grid; CUDA allows 65,535 on axis 1 (T={case.T})"
        return _peer_policy_reason("Liger", case, entropy_ok=False)

    def build(self, case, inputs):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        config = loss_config(case)
        loss_type, level = _liger_loss_type(case)
        mask = inputs["mask"].long()

        def run():
            loss, _ = triton_grpo_loss(
                inputs["logits"], inputs["old_logp"], inputs["ref_logp"] if config.beta else None,
                inputs["targets"], inputs["advantages"], mask,
                temperature=1.0, beta=config.beta, eps_low=config.epsilon, eps_high=config.epsilon_upper,
                inplace=True, loss_type=loss_type, importance_sampling_level=level, reduce=True,
                sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
            )
            loss.backward()
        return run


class LigerFusedLinearProvider(Provider):
    name = "liger-fused-linear"
    label = "Liger-Kernel LigerFusedLinearGRPOLoss (hidden states)"
    paths = ("hidden",)
    recomputes_logits = True
    module, package = "liger_kernel", "liger-kernel"

    def _skip_reason(self, case, device):
        if case.mode == "fwd":
            return "Liger has no entropy in its chunked log-prob" if case.entropy else None
        return _peer_policy_reason("Liger", case, entropy_ok=False)

    def build(self, case, inputs):
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

        hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
        if case.mode == "fwd":
            # The chunked selective log-prob Liger's loss runs for the reference model's log-probs.
            return forward_only(LigerFusedLinearPPOBase.chunk_forward, hidden, weight, targets)
        config = loss_config(case)
        loss_type, level = _liger_loss_type(case)
        module = LigerFusedLinearGRPOLoss(
            beta=config.beta, use_ref_model=config.beta > 0, epsilon_low=config.epsilon,
            epsilon_high=config.epsilon_upper, loss_type=loss_type, importance_sampling_level=level,
            sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
            # Liger compiles its O(tokens) loss math; on CPU that compile would dominate every case.
            compiled=hidden.is_cuda,
        )
        mask = inputs["mask"].float()

        def run():
            loss, _ = module(
                hidden, weight, targets, mask, inputs["advantages"],
                ref_per_token_logps=inputs["ref_logp"] if config.beta else None,
                old_per_token_logps=inputs["old_logp"],
            )
            loss.backward()
        return run


class LinearCrossEntropyPeer(Provider):
    """A fused linear cross-entropy as the log-prob (logp = -CE, reduction none), then the objective in
    torch (softpo.objectives): what a user with only a cross-entropy kernel would write. These kernels
    give no entropy, so entropy cases are skipped."""

    paths = ("hidden",)
    recomputes_logits = True

    def _skip_reason(self, case, device):
        return f"{self.name} gives no entropy" if case.entropy else None

    def _neg_ce(self, hidden2d, weight, targets1d):
        raise NotImplementedError

    def build(self, case, inputs):
        from softpo import objectives

        hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
        H = hidden.shape[-1]

        def logp_of():
            return -self._neg_ce(hidden.reshape(-1, H), weight, targets.reshape(-1)).float().view(targets.shape)

        if case.mode == "fwd":
            return forward_only(logp_of)
        config = loss_config(case)
        kwargs = loss_kwargs(inputs)
        mask = inputs["mask"]

        def run():
            advantages = kwargs["advantages"]
            loss, _ = objectives.policy_objective(
                config, logp_of(), mask, advantages, old_logp=kwargs["old_logp"], ref_logp=kwargs["ref_logp"],
                rewards=kwargs["rewards"], q0=kwargs["q0"],
            )
            loss.backward()
        return run


class TorchLinearCrossEntropyProvider(LinearCrossEntropyPeer):
    name = "torch-linear-ce"
    label = "torch F.linear_cross_entropy (chunked, LinearCrossEntropyOptions) + softpo.objectives"

    def _unavailable(self, device):
        import torch.nn.functional as F

        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no F.linear_cross_entropy with options (torch >= 2.13)"
        return None

    def _neg_ce(self, hidden2d, weight, targets1d):
        import torch.nn.functional as F

        return F.linear_cross_entropy(hidden2d, weight, targets1d, reduction="none",
                                      options=torch.nn.LinearCrossEntropyOptions())


class CutCrossEntropyProvider(LinearCrossEntropyPeer):
    name = "cut-cross-entropy"
    label = "Apple cut-cross-entropy linear_cross_entropy (CCE kernels, no gradient filtering) + softpo.objectives"
    # Its CPU fallback is torch.compile of the materialized logits, which torch-compile already measures.
    needs_cuda = True
    module, package = "cut_cross_entropy", "cut-cross-entropy"

    def _neg_ce(self, hidden2d, weight, targets1d):
        from cut_cross_entropy import linear_cross_entropy

        # filter_eps=None: exact gradients, as an RL loss needs (its default skips small softmax entries).
        return linear_cross_entropy(hidden2d, weight, targets1d, reduction="none", filter_eps=None, impl="cce")


class QuackProvider(LinearCrossEntropyPeer):
    name = "quack"
    label = ("quack-kernels linear_cross_entropy_func (CuTe DSL GEMM + cross-entropy, reduction none) + "
             "softpo.objectives")
    needs_cuda = True
    # Not in softpo's bench extra: it runs on sm_90+ GPUs only.
    module, package, extra = "quack", "quack-kernels", ""

    def _unavailable(self, device):
        major, minor = torch.cuda.get_device_capability()
        if major < 9:
            return f"quack-kernels targets sm_90 and newer, this GPU is sm_{major}{minor}"
        try:
            importlib.import_module("quack.linear_cross_entropy")
        except Exception as error:  # a CUTLASS DSL that does not match this driver or torch
            return f"quack.linear_cross_entropy does not import: {type(error).__name__}: {error}"
        return None

    def _neg_ce(self, hidden2d, weight, targets1d):
        from quack.linear_cross_entropy import linear_cross_entropy_func

        # Its chunked variant reduces to a mean or sum only; per-token log-probs need reduction="none",
        # which projects the whole [N, V] logits first.
        return linear_cross_entropy_func(hidden2d, weight, None, targets1d, reduction="none")


def trl_loss(loss_type, level, logp, old_logp, ref_logp, advantages, mask, entropies, *, epsilon_low,
             epsilon_high, beta, sapo_temperature_pos, sapo_temperature_neg, entropy_coef):
    """Mirrors the formula of TRL 1.16 GRPOTrainer._compute_loss for loss_type "grpo" and "sapo"
    (token or sequence importance sampling), k3 KL with `beta`, and the entropy bonus."""
    mask = mask.float()
    adv = advantages.unsqueeze(1)
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    if loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta:
        per_token = per_token + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if entropy_coef:
        loss = loss - entropy_coef * (entropies * mask).sum() / mask.sum().clamp(min=1.0)
    return loss


class TrlProvider(Provider):
    name = "trl"
    label = "TRL: chunked fused lm_head log-prob (hidden) / selective_log_softmax (logits) + TRL's loss"
    recomputes_logits = True
    module, package = "trl", "trl"

    def _skip_reason(self, case, device):
        if case.mode == "fwdbwd":
            return _peer_policy_reason("TRL", case, entropy_ok=True)
        return None

    def build(self, case, inputs):
        targets, mask = inputs["targets"], inputs["mask"]
        entropy = case.entropy
        if case.path == "hidden":
            from trl.kernels import ChunkedLogProbFunction
            from trl.kernels.chunked_logprob import _use_triton
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

            hidden, weight = inputs["hidden"], inputs["weight"]
            outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
            # As add_fused_lm_head does: on Triton devices only the valid positions are projected.
            compact = _use_triton(hidden.device)

            def logprobs():
                h = hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])
                t = targets[mask] if compact else targets.reshape(-1)
                out = ChunkedLogProbFunction.apply(
                    h, weight, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
                if compact:
                    return [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in out[:2]]
                return [None if x is None else x.view(mask.shape) for x in out[:2]]
        else:
            from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

            logits = inputs["logits"]

            def logprobs():
                if entropy:
                    return selective_log_softmax_and_entropy(logits, targets)
                return selective_log_softmax(logits, targets), None

        if case.mode == "fwd":
            return forward_only(logprobs)
        config = loss_config(case)
        loss_type, level = _liger_loss_type(case)

        def run():
            logp, ent = logprobs()
            trl_loss(
                loss_type, level, logp, inputs["old_logp"], inputs["ref_logp"], inputs["advantages"], mask, ent,
                epsilon_low=config.epsilon, epsilon_high=config.epsilon_upper, beta=config.beta,
                sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
                entropy_coef=config.entropy_coef,
            ).backward()
        return run
