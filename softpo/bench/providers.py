"""The providers of `softpo bench`, side by side in one run: softpo's own paths, torch, and the peers.

- softpo-triton: softpo's fused Triton kernels (impl="triton"; CUDA only).
- softpo-triton-flat: the same with memory="flat" (loss cases only): bounded memory on the hidden path
  (d weight formed in the backward, vocabulary-major), and on the logits path d logits formed by the
  backward kernel instead of the forward.
- softpo-compile: torch.compile(fullgraph=True) of a step calling softpo.
- softpo-torch: softpo's chunked torch sweep (impl="torch").
- torch-eager: materialized logits, log_softmax, and the loss math of `softpo.objectives`.
- torch-compile: torch.compile of torch-eager.
- the other libraries' providers: peers.py.

`missing_peers` groups the providers that cannot run here by the package or device they lack, so that a
run reports them once, with the command that installs them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cases import Provider, forward_only, loss_config, loss_kwargs
from .peers import (CutCrossEntropyProvider, LigerFusedLinearProvider, LigerTritonProvider, QuackProvider,
                    TorchLinearCrossEntropyProvider, TrlProvider)


class SoftpoProvider(Provider):
    def __init__(self, impl: str, compiled: bool = False, memory: str = "default"):
        # The Triton hidden path forms the gradient in the forward sweep: token-level objectives in every
        # tile, sequence-level ones (GSPO, SPO) in tiles of whole sequences (every case's 2048-token rows
        # fit one). The chunked torch path, a compiled step (the plain route) and memory="flat" recompute
        # the logits.
        self.recomputes_logits = not (impl == "triton" and not compiled and memory == "default")
        self.impl = impl
        # On CPU softpo's Triton kernels run only under the interpreter, too slow to time.
        self.needs_cuda = impl == "triton"
        self.compiled = compiled
        self.memory = memory
        if memory == "flat":
            # The forward is the default's; only a loss's backward differs.
            self.modes = ("fwdbwd",)
            self.name = f"softpo-{impl}-flat"
            self.label = ('softpo (Triton kernels), memory="flat": no V x H fp32 accumulator on the hidden path '
                          "(d weight in the backward, 8NHV), no d logits held from the forward on the logits path")
            return
        self.name = "softpo-compile" if compiled else f"softpo-{impl}"
        self.label = {"triton": "softpo (Triton kernels)", "torch": "softpo (chunked torch)",
                      "auto": "torch.compile(fullgraph=True) of a step calling softpo (Triton on CUDA, chunked "
                              "torch on CPU; first_call_s holds the compile)"}[impl]

    def build(self, case, inputs):
        targets = inputs["targets"]
        sweep = {"logits": inputs["logits"]} if case.path == "logits" else {
            "hidden": inputs["hidden"], "weight": inputs["weight"]}
        if case.mode == "fwd":
            forward = _compiled(_softpo_logprobs) if self.compiled else _softpo_logprobs
            return forward_only(forward, targets, case.entropy, self.impl, **sweep)
        config = loss_config(case)
        kwargs = loss_kwargs(inputs)
        step = _compiled(_softpo_loss) if self.compiled else _softpo_loss

        def run():
            step(config, targets, inputs["mask"], self.impl, memory=self.memory, **sweep, **kwargs).backward()
        return run


# Module-level steps, compiled once each: the rotating input sets of a case then share one compiled
# graph (guards on shapes and settings) instead of recompiling for every closure.
def _softpo_logprobs(targets, entropy, impl, **sweep):
    import softpo

    return softpo.token_logprobs(targets, return_entropy=entropy, impl=impl, **sweep)


def _softpo_loss(config, targets, mask, impl, memory="default", **kwargs):
    import softpo

    return softpo.policy_loss(config, targets, mask, impl=impl, memory=memory, **kwargs).loss


_COMPILED: dict = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


def _materialized(targets, entropy, hidden=None, weight=None, logits=None):
    """What a user writes without a fused op: the whole [N, V] logits, then log_softmax in fp32."""
    if logits is None:
        logits = hidden @ weight.T
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if entropy else None
    return logp, ent


def _eager_loss(config, targets, mask, advantages, old_logp, ref_logp, rewards, q0, hidden=None, weight=None,
                logits=None):
    from softpo import objectives

    logp, ent = _materialized(targets, config.needs_entropy, hidden, weight, logits)
    loss, _ = objectives.policy_objective(
        config, logp, mask, advantages, old_logp=old_logp, ref_logp=ref_logp, rewards=rewards, q0=q0, entropy=ent
    )
    return loss


def _eager_logp(targets, entropy, hidden=None, weight=None, logits=None):
    return _materialized(targets, entropy, hidden, weight, logits)


class EagerProvider(Provider):
    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.name = "torch-compile" if compiled else "torch-eager"
        self.label = ("torch.compile of " if compiled else "torch eager: ") + \
            "materialized logits + log_softmax + softpo.objectives"

    def build(self, case, inputs):
        targets = inputs["targets"]
        sweep = {"logits": inputs["logits"]} if case.path == "logits" else {
            "hidden": inputs["hidden"], "weight": inputs["weight"]}
        if case.mode == "fwd":
            fn = torch.compile(_eager_logp) if self.compiled else _eager_logp
            return forward_only(fn, targets, case.entropy, **sweep)
        fn = torch.compile(_eager_loss) if self.compiled else _eager_loss
        config = loss_config(case)
        kwargs = loss_kwargs(inputs)

        def run():
            fn(config, targets, inputs["mask"], **kwargs, **sweep).backward()
        return run


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        SoftpoProvider("triton"),
        SoftpoProvider("torch"),
        SoftpoProvider("auto", compiled=True),
        EagerProvider(compiled=False),
        EagerProvider(compiled=True),
        LigerTritonProvider(),
        LigerFusedLinearProvider(),
        TrlProvider(),
        TorchLinearCrossEntropyProvider(),
        CutCrossEntropyProvider(),
        QuackProvider(),
        SoftpoProvider("triton", memory="flat"),
    )
}


def install_command() -> str:
    """The one command that installs every peer of softpo's bench extra: from the source checkout this
    softpo was imported from, or from PyPI."""
    import softpo

    root = Path(softpo.__file__).resolve().parents[1]
    if (root / "setup.py").is_file():
        where = "." if root == Path.cwd().resolve() else str(root)
        return f'pip install -e "{where}[bench]"'
    return 'pip install "softpo[bench]"'


def missing_peers(names, device: str) -> list[str]:
    """One line per reason that some of `names` cannot run on `device` at all, naming them; empty when all can."""
    by_reason: dict[str, list[str]] = {}
    extra_packages: set[str] = set()
    for name in names:
        provider = PROVIDERS[name]
        reason = provider.unavailable(device)
        if reason is None:
            continue
        if provider.needs_cuda and device != "cuda":
            reason = "need CUDA"
        elif reason == f"{provider.package} is not installed" and provider.extra:
            extra_packages.add(provider.package)
            reason = "not installed"
        elif reason == f"{provider.package} is not installed":
            reason = f"not installed (pip install {provider.package})"
        by_reason.setdefault(reason, []).append(name)
    lines = []
    for reason, providers in by_reason.items():
        line = f"{', '.join(providers)}: {reason}"
        if reason == "not installed":
            line += f" ({', '.join(sorted(extra_packages))}); install with: {install_command()}"
        lines.append(line)
    return lines
