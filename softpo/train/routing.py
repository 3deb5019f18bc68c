"""Routing replay for transformers' top-k MoE routers: Qwen3-MoE, OLMoE and Mixtral.

In an MoE policy the experts a token is routed to can change between the forward that sampled it,
the forward that computed its old log-prob and the training forward, so the token ratio moves for
reasons that are not the policy update. Routing replay pins the experts:
- `old`: the training forwards use the experts chosen in the forward that computed the old
  log-probs;
- `rollout`: the experts chosen while `generate` sampled are used in the old-log-prob forward and
  the training forwards (positions with nothing recorded, such as offline samples, route live in the
  old forward, and the training forwards replay that).

Only the expert indices are forced. The gate weights are recomputed from the live router logits at
the forced experts, softmax over all experts then renormalized over the k when the model does
(`norm_topk_prob`; Mixtral always), so the router still gets a gradient. A forward hook on each
router module swaps its (logits, weights, indices) output while a `route` block is open; nothing is
copied and the hooks are removed when the block ends. Recorded experts are keyed by layer (the
order of the router modules) and laid out like the token batch, [rows, length, layers, k], so
padding and prompt positions keep their own entries and a minibatch is a row slice.
"""

from __future__ import annotations

import contextlib
import functools

import torch

MODES = ("none", "old", "rollout")
# The router classes whose forward returns (router_logits, top-k weights, top-k indices), and whether
# each renormalizes the top-k probabilities.
ROUTERS = {
    "Qwen3MoeTopKRouter": lambda router: router.norm_topk_prob,
    "OlmoeTopKRouter": lambda router: router.norm_topk_prob,
    "MixtralTopKRouter": lambda router: True,
}
SUPPORTED = "qwen3_moe, olmoe, mixtral"


class Recording:
    """Experts used by each router, one [tokens, k] chunk per call, in call order."""

    def __init__(self, layers: int):
        self.chunks: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def forward_layout(self, rows: int, length: int) -> torch.Tensor:
        """One forward over [rows, length] tokens -> [rows, length, layers, k]."""
        return torch.stack([torch.cat(chunks).view(rows, length, -1) for chunks in self.chunks], dim=2)

    def generation_layout(self, rows: int) -> torch.Tensor:
        """A `generate` call (prefill, then one token per call) -> [rows, prompt + new tokens, layers, k].

        The last sampled token is never fed back, so its position holds -1 (nothing recorded)."""
        layers = [torch.cat([chunk.view(rows, -1, chunk.shape[-1]) for chunk in chunks], dim=1)
                  for chunks in self.chunks]
        recorded = torch.stack(layers, dim=2)
        return torch.cat([recorded, recorded.new_full((rows, 1, *recorded.shape[2:]), -1)], dim=1)


class RoutingReplay:
    """Records and forces the experts of a model's routers; `ValueError` for a model without one it knows."""

    def __init__(self, model):
        self.routers = [(name, module) for name, module in model.named_modules() if type(module).__name__ in ROUTERS]
        if not self.routers:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ValueError(f"--routing-replay: model type {model_type!r} has no MoE router softpo can replay "
                             f"(supported: {SUPPORTED})")

    @contextlib.contextmanager
    def route(self, force: torch.Tensor | None = None):
        """Within the block every router call is recorded, and forced when `force` is given.

        force: [rows, length, layers, k] expert indices for the one forward over [rows, length] tokens
        run inside the block; a position whose entries are -1 routes live. Yields a `Recording` of the
        experts actually used."""
        recording = Recording(len(self.routers))
        handles = [module.register_forward_hook(functools.partial(self._hook, layer, force, recording))
                   for layer, (_, module) in enumerate(self.routers)]
        try:
            yield recording
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(layer, force, recording, module, inputs, output):
        logits, weights, experts = output
        if force is not None:
            forced = force[:, :, layer].reshape(-1, experts.shape[-1]).to(experts.device)
            if forced.shape != experts.shape:
                raise RuntimeError(f"routing replay: layer {layer} routes {experts.shape[0]} tokens, "
                                   f"{forced.shape[0]} were recorded")
            forced = torch.where((forced >= 0).all(-1, keepdim=True), forced, experts)
            probs = torch.softmax(logits.float(), dim=-1).gather(-1, forced)
            if ROUTERS[type(module).__name__](module):
                probs = probs / probs.sum(dim=-1, keepdim=True)
            weights, experts = probs.to(weights.dtype), forced
        recording.chunks[layer].append(experts.detach())
        return logits, weights, experts


def routed_experts(router_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """Per-layer router logits [rows, length, experts] -> the top-k experts, [rows, length, layers, k]."""
    return torch.stack([layer.topk(k, dim=-1).indices for layer in router_logits], dim=2)


def top_k_sets(experts: torch.Tensor, start: int) -> torch.Tensor:
    """[rows, length, layers, k] experts (recorded, or `routed_experts` of live router logits) -> [layers, rows,
    completion, k] sorted sets of the positions from `start` on that score completion tokens."""
    return experts[:, start:-1].permute(2, 0, 1, 3).sort(dim=-1).values
