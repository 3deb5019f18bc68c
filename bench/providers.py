"""Benchmark cases and the providers that run them side by side.

A case is one shape and one objective on one path: hidden states + lm_head weight, or logits, forward
only (old/reference log-probs) or forward+backward (the training step's loss). A provider is one
library's way of computing that case. `Provider.skip_reason` says, in words, why a provider cannot run
a case; the harness records that reason instead of dropping the provider.

Providers:
- softpo-triton: softpo's fused Triton kernels (impl="triton"; CUDA only).
- softpo-triton-flat: the same with memory="flat" (loss cases only): bounded memory on the hidden path
  (d weight formed in the backward, vocabulary-major), and on the logits path d logits formed by the
  backward kernel instead of the forward.
- softpo-compile: torch.compile(fullgraph=True) of a step calling softpo.
- softpo-torch: softpo's chunked torch sweep (impl="torch").
- torch-eager: materialized logits, log_softmax, and the loss math of `softpo.objectives`.
- torch-compile: torch.compile of torch-eager.
- liger-triton: Liger-Kernel's Triton GRPO loss from logits (`triton_grpo_loss`; CUDA only).
- liger-fused-linear: Liger-Kernel's `LigerFusedLinearGRPOLoss` from hidden states (forward only:
  its chunked selective log-prob, the path it uses for reference log-probs).
- torch-linear-ce: torch's own `F.linear_cross_entropy` (chunked, torch >= 2.13) as the log-prob, then
  softpo.objectives (hidden path, no entropy).
- cut-cross-entropy: Apple's `cut-cross-entropy` kernels the same way (CUDA only).
- quack: quack-kernels' `linear_cross_entropy_func` the same way (CUDA sm_90+ only).
- trl: TRL's own log-prob (the chunked fused lm_head function GRPOTrainer installs with
  `add_fused_lm_head`, or `selective_log_softmax` on logits) followed by TRL's loss formula.

All tokens are valid (full mask), so the counted FLOPs and bytes are the work done.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OBJECTIVES = ("sapo", "grpo", "gspo", "spo")
ENTROPY_COEF = 0.01


@dataclass(frozen=True)
class Case:
    path: str  # "hidden" or "logits"
    mode: str  # "fwd" (log-probs without grad) or "fwdbwd" (loss, then backward)
    objective: str  # "logp" for mode "fwd", else one of OBJECTIVES
    entropy: bool
    B: int
    T: int
    V: int
    H: int = 0  # hidden path only
    dtype: str = "bf16"
    tag: str = ""  # "row": one long row, a family of its own
    # (provider name, reason) pairs: providers this case set leaves out on purpose, with the reason.
    skip: tuple[tuple[str, str], ...] = ()

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def id(self) -> str:
        ent = "-ent" if self.entropy else ""
        hid = f"-H{self.H}" if self.path == "hidden" else ""
        tag = f"-{self.tag}" if self.tag else ""
        return f"{self.path}-{self.mode}-{self.objective}{ent}{tag}-N{self.N}-T{self.T}{hid}-V{self.V}-{self.dtype}"

    @property
    def family(self) -> str:
        """The case with N left out: the cases of one family form a line against N in the plots."""
        ent = "-ent" if self.entropy else ""
        hid = f"-H{self.H}" if self.path == "hidden" else ""
        tag = f"-{self.tag}" if self.tag else ""
        return f"{self.path}-{self.mode}-{self.objective}{ent}{tag}{hid}-V{self.V}-{self.dtype}"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def work(self) -> dict:
        """What the ceiling fraction counts: FLOPs on the hidden path, bytes on the logits path."""
        N, H, V = self.N, self.H, self.V
        if self.path == "hidden":
            # logits = hidden @ weight.T is 2NHV; backward adds d hidden and d weight, 2NHV each.
            return {"kind": "flops", "count": (2 if self.mode == "fwd" else 6) * N * H * V}
        # Read N x V once forward; backward reads it again and writes d logits.
        return {"kind": "bytes", "count": (1 if self.mode == "fwd" else 3) * N * V * self.itemsize}

    def input_bytes(self) -> int:
        if self.path == "hidden":
            return (self.N + self.V) * self.H * self.itemsize
        return self.N * self.V * self.itemsize

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip"] = [list(pair) for pair in self.skip]
        d.update(id=self.id, family=self.family, N=self.N, work=self.work())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["skip"] = tuple(tuple(pair) for pair in kwargs.get("skip", ()))
        return cls(**kwargs)


def _rows(N: int, T: int = 2048) -> tuple[int, int]:
    T = min(T, N)
    return N // T, T


@dataclass(frozen=True)
class Family:
    """Cases that differ only in N (a line against N in the plots), or one case when a single N is given."""

    path: str
    mode: str
    pairs: tuple[tuple[str, bool], ...]  # (objective, entropy) of each line
    Ns: tuple[int, ...]
    V: int
    T: int = 2048  # tokens per row (fewer when N is smaller)
    tag: str = ""


SWEEP = (4096, 8192, 16384, 32768, 65536)
LLAMA_NS = (4096, 16384, 65536)
SAPO, LOGP, LOGP_ENTROPY = (("sapo", False),), (("logp", False),), (("logp", True),)
# Every objective with and without entropy, but plain SAPO (the sweeps already have it).
OTHERS = tuple((o, e) for o in OBJECTIVES for e in (False, True) if (o, e) != ("sapo", False))
HEADLINE = 16384  # the GPU set's headline N


def _per_path(*families):
    return tuple(dataclasses.replace(f, path=path) for path in ("hidden", "logits") for f in families)


# Each set: dtype, H, its families in order, and which providers it leaves out of a case (and why).
SETS = {
    "full": dict(dtype="bf16", H=4096, families=(
        *_per_path(Family("", "fwdbwd", SAPO, SWEEP, 151936), Family("", "fwdbwd", SAPO, LLAMA_NS, 128256),
                   Family("", "fwdbwd", OTHERS, (HEADLINE,), 151936)),
        Family("hidden", "fwd", LOGP, SWEEP, 151936),
        Family("hidden", "fwd", LOGP, LLAMA_NS, 128256),
        Family("hidden", "fwd", LOGP_ENTROPY, (HEADLINE,), 151936),
        # One row of 131072 tokens: offsets past 2^31 elements, and no token axis on a 65535-limited grid.
        # On the Llama-3 vocabulary: at V=151936 the logits and their gradient alone (80 GB) overflow an H100.
        Family("logits", "fwdbwd", SAPO, (131072,), 128256, T=131072, tag="row"),
    )),
    "quick": dict(dtype="fp32", H=256, families=(
        *_per_path(Family("", "fwdbwd", SAPO, (256, 1024, 4096), 8192, T=256),
                   Family("", "fwdbwd", OTHERS, (1024,), 8192, T=256)),
        Family("hidden", "fwd", LOGP, (256, 1024, 4096), 8192, T=256),
        Family("hidden", "fwd", LOGP_ENTROPY, (1024,), 8192, T=256),
        Family("logits", "fwdbwd", SAPO, (16384,), 4096, T=16384, tag="row"),
        # The core issue's memory case: N=4096, H=256, V=151936, fp32.
        Family("hidden", "fwd", LOGP, (4096,), 151936, T=1024),
        Family("hidden", "fwdbwd", SAPO, (4096,), 151936, T=1024),
    )),
    # Issue 15's targets, each side by side with its peers, in one GPU call: S1 (hidden SAPO) and S3
    # (GSPO, SPO) at N=16384, S1m (memory="flat") over N, S2 (logits SAPO) at N=16384.
    "round2": dict(dtype="bf16", H=4096, families=(
        Family("hidden", "fwdbwd", SAPO, (4096, HEADLINE, 65536), 151936),
        Family("hidden", "fwdbwd", (("gspo", False), ("spo", False)), (HEADLINE,), 151936),
        Family("logits", "fwdbwd", SAPO, (HEADLINE,), 151936),
    )),
    "tiny": dict(dtype="fp32", H=32, families=(
        Family("hidden", "fwdbwd", SAPO, (64,), 1000, T=32),
        Family("logits", "fwdbwd", (("grpo", False),), (64,), 1000, T=32),
        Family("hidden", "fwd", LOGP, (64,), 1000, T=32),
    )),
}


def _skips(set_name: str, case: Case) -> tuple[tuple[str, str], ...]:
    """The providers a set leaves out of a case, with the reason; softpo-compile follows torch-compile
    (round2 names every provider it runs)."""
    if set_name == "round2":
        return _round2_skips(case)
    skips = _skips_of_set(set_name, case)
    return skips + tuple(("softpo-compile", reason) for name, reason in skips if name == "torch-compile")


def _skips_of_set(set_name: str, case: Case) -> tuple[tuple[str, str], ...]:
    plain = case.objective in ("sapo", "logp") and not case.entropy and not case.tag
    if set_name == "full":
        # The whole set has to fit a GPU session's budget (about 10 minutes of measurement): the two
        # providers that cost minutes per case run where they say the most.
        skips = []
        if not (plain and case.N == HEADLINE and case.V == 151936):
            skips.append(("torch-compile", f"torch.compile runs on the SAPO N={HEADLINE} V=151936 cases only: "
                          "a compile per shape and objective costs a minute"))
        if case.N != 4096:
            skips.append(("softpo-torch", "softpo's chunked torch path (the CPU fallback, fp32 matmuls) runs on "
                          "the N=4096 cases only on GPU"))
        return tuple(skips)
    if set_name == "quick":
        if plain and case.N == 1024 and case.V == 8192:
            return ()
        return (("torch-compile", "left out of --quick: a CPU compile per case takes tens of seconds; "
                 "it runs on the N=1024 SAPO cases"),)
    return (("torch-compile", "left out of --tiny: a CPU compile takes tens of seconds"),)


ROUND2_PEERS = {
    # S1: the fused-linear peers a user would pick instead, and TRL; S2: Liger's logits kernel.
    "hidden": ("softpo-triton", "softpo-triton-flat", "trl", "torch-linear-ce", "cut-cross-entropy", "quack",
               "softpo-compile"),
    "logits": ("softpo-triton", "softpo-triton-flat", "liger-triton", "trl", "softpo-compile"),
}


def _round2_skips(case: Case) -> tuple[tuple[str, str], ...]:
    """round2 runs each target's own comparison only, to fit one GPU call of the session's 15 minutes."""
    wanted = set(ROUND2_PEERS[case.path])
    if case.path == "hidden" and (case.objective != "sapo" or case.N != HEADLINE):
        # S1m over N: softpo's two memory modes and TRL; S3: softpo against itself (SAPO at the same N).
        wanted = {"softpo-triton", "softpo-triton-flat", "trl"} if case.objective == "sapo" else {"softpo-triton"}
    others = [name for name in PROVIDERS if name not in wanted]
    return tuple((name, f"not part of issue 15's {case.path} target measured by this case") for name in others)


def case_set(name: str) -> list[Case]:
    """The cases of a set: "full" (GPU shapes), "quick" (CPU, small shapes plus the core memory case)
    or "tiny" (seconds, for the test that keeps the harness working)."""
    if name not in SETS:
        raise ValueError(f"set must be one of {', '.join(repr(n) for n in SETS)}, got {name!r}")
    spec = SETS[name]
    cases = []
    for family in spec["families"]:
        H = spec["H"] if family.path == "hidden" else 0
        for objective, entropy in family.pairs:
            for N in family.Ns:
                case = Case(family.path, family.mode, objective, entropy, *_rows(N, family.T), family.V, H=H,
                            dtype=spec["dtype"], tag=family.tag)
                cases.append(dataclasses.replace(case, skip=_skips(name, case)))
    return cases


# ---------------------------------------------------------------- inputs

_LOGP_CACHE: dict = {}


def make_inputs(case: Case, device: str, seed: int = 0, extra_position: bool = False) -> dict:
    """Random inputs for one case; the same seed gives every provider the same data.

    extra_position: logits of shape [B, T + 1, V] (Liger's Triton loss drops the last position).
    """
    import softpo

    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    B, T, V, H = case.B, case.T, case.V, case.H
    grad = case.mode == "fwdbwd"
    out: dict = {"targets": torch.randint(0, V, (B, T), generator=gen, device=device)}
    if case.path == "hidden":
        hidden = torch.randn(B, T, H, generator=gen, device=device, dtype=dtype)
        # Scaled so that logits have a standard deviation near 2, as a trained lm_head gives.
        weight = torch.randn(V, H, generator=gen, device=device, dtype=dtype) * (2 / H**0.5)
        out["hidden"], out["weight"] = hidden.requires_grad_(grad), weight.requires_grad_(grad)
        out["leaves"] = [hidden, weight] if grad else []
    else:
        logits = torch.randn(B, T + int(extra_position), V, generator=gen, device=device, dtype=dtype) * 2
        out["logits"] = logits.requires_grad_(grad)
        out["leaves"] = [logits] if grad else []
    out["mask"] = torch.ones(B, T, dtype=torch.bool, device=device)
    if not grad:
        return out
    out["advantages"] = torch.randn(B, generator=gen, device=device)
    key = (case.id, device, seed, extra_position)
    if key not in _LOGP_CACHE:
        sweep = {"logits": out["logits"][:, :T]} if case.path == "logits" else {
            "hidden": out["hidden"], "weight": out["weight"]}
        with torch.no_grad():
            try:
                logp = softpo.token_logprobs(out["targets"], **sweep)
            except Exception:  # the inputs must not depend on the kernels under test working
                logp = softpo.token_logprobs(out["targets"], impl="torch", **sweep)
        _LOGP_CACHE.clear()  # one case at a time: every provider of a case reuses it
        _LOGP_CACHE[key] = logp
    logp = _LOGP_CACHE[key]
    # Old and reference policies a little off the current one, so ratios spread around 1.
    out["old_logp"] = (logp + 0.05 * torch.randn(B, T, generator=gen, device=device)).contiguous()
    out["ref_logp"] = (logp + 0.05 * torch.randn(B, T, generator=gen, device=device)).contiguous()
    out["rewards"] = torch.rand(B, generator=gen, device=device)
    out["q0"] = torch.full((B,), 0.5, device=device)
    return out


def loss_config(case: Case):
    import softpo

    overrides = {"entropy_coef": ENTROPY_COEF} if case.entropy else {}
    return softpo.preset(case.objective, **overrides)


# ---------------------------------------------------------------- providers


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


class Provider:
    name = ""
    label = ""
    paths = ("hidden", "logits")
    modes = ("fwd", "fwdbwd")
    # The backward recomputes the logits: 8NHV executed where 6NHV are counted (True, or a list of
    # the objectives for which it does).
    recomputes_logits: bool | list = False
    extra_position = False

    def skip_reason(self, case: Case, device: str) -> str | None:
        """None when this provider can run `case` on `device`, else the reason it cannot."""
        for name, reason in case.skip:
            if name == self.name:
                return reason
        if case.path not in self.paths:
            return f"no {case.path} path in this provider"
        if case.mode not in self.modes:
            return f"no {case.mode} mode in this provider"
        return self._skip_reason(case, device)

    def _skip_reason(self, case: Case, device: str) -> str | None:
        return None

    def build(self, case: Case, inputs: dict) -> Callable[[], None]:
        """A callable running the case once (forward, or forward and backward)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"label": self.label, "recomputes_logits": self.recomputes_logits}


class SoftpoProvider(Provider):
    def __init__(self, impl: str, compiled: bool = False, memory: str = "default"):
        # The Triton hidden path forms the gradient in the forward sweep: token-level objectives in every
        # tile, sequence-level ones (GSPO, SPO) in tiles of whole sequences (every case's 2048-token rows
        # fit one). The chunked torch path, a compiled step (the plain route) and memory="flat" recompute
        # the logits.
        self.recomputes_logits = not (impl == "triton" and not compiled and memory == "default")
        self.impl = impl
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

    def _skip_reason(self, case, device):
        if self.impl == "triton":
            if device != "cuda":
                return "softpo's Triton kernels need CUDA (on CPU they run only under the interpreter)"
            try:
                importlib.import_module("softpo.triton_ops")
            except Exception as error:  # the kernels are optional until they land
                return f"softpo.triton_ops unavailable: {type(error).__name__}: {error}"
        return None

    def build(self, case, inputs):
        targets = inputs["targets"]
        sweep = {"logits": inputs["logits"]} if case.path == "logits" else {
            "hidden": inputs["hidden"], "weight": inputs["weight"]}
        if case.mode == "fwd":
            forward = _compiled(_softpo_logprobs) if self.compiled else _softpo_logprobs

            def run():
                with torch.no_grad():
                    forward(targets, case.entropy, self.impl, **sweep)
            return run
        config = loss_config(case)
        kwargs = _loss_kwargs(inputs)
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


def _loss_kwargs(inputs):
    return {k: inputs[k] for k in ("advantages", "old_logp", "ref_logp", "rewards", "q0")}


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

            def run():
                with torch.no_grad():
                    fn(targets, case.entropy, **sweep)
            return run
        fn = torch.compile(_eager_loss) if self.compiled else _eager_loss
        config = loss_config(case)
        kwargs = _loss_kwargs(inputs)

        def run():
            fn(config, targets, inputs["mask"], **kwargs, **sweep).backward()
        return run


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

    def _skip_reason(self, case, device):
        missing = _missing("liger_kernel")
        if missing:
            return missing
        if device != "cuda":
            return "Liger's Triton GRPO kernels need CUDA"
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

    def _skip_reason(self, case, device):
        missing = _missing("liger_kernel")
        if missing:
            return missing
        if case.mode == "fwd":
            return "Liger has no entropy in its chunked log-prob" if case.entropy else None
        return _peer_policy_reason("Liger", case, entropy_ok=False)

    def build(self, case, inputs):
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

        hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
        if case.mode == "fwd":
            # The chunked selective log-prob Liger's loss runs for the reference model's log-probs.
            def run():
                with torch.no_grad():
                    LigerFusedLinearPPOBase.chunk_forward(hidden, weight, targets)
            return run
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
        if case.entropy:
            return f"{self.name} gives no entropy"
        return self._unavailable(device)

    def _unavailable(self, device) -> str | None:
        return None

    def _neg_ce(self, hidden2d, weight, targets1d):
        raise NotImplementedError

    def build(self, case, inputs):
        from softpo import objectives

        hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
        H = hidden.shape[-1]

        def logp_of():
            return -self._neg_ce(hidden.reshape(-1, H), weight, targets.reshape(-1)).float().view(targets.shape)

        if case.mode == "fwd":
            def run():
                with torch.no_grad():
                    logp_of()
            return run
        config = loss_config(case)
        kwargs = _loss_kwargs(inputs)
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

    def _unavailable(self, device):
        missing = _missing("cut_cross_entropy")
        if missing:
            return missing
        if device != "cuda":
            return ("cut-cross-entropy's CCE kernels need CUDA (its CPU fallback is torch.compile of the "
                    "materialized logits, which torch-compile already measures)")
        return None

    def _neg_ce(self, hidden2d, weight, targets1d):
        from cut_cross_entropy import linear_cross_entropy

        # filter_eps=None: exact gradients, as an RL loss needs (its default skips small softmax entries).
        return linear_cross_entropy(hidden2d, weight, targets1d, reduction="none", filter_eps=None, impl="cce")


class QuackProvider(LinearCrossEntropyPeer):
    name = "quack"
    label = ("quack-kernels linear_cross_entropy_func (CuTe DSL GEMM + cross-entropy, reduction none) + "
             "softpo.objectives")

    def _unavailable(self, device):
        missing = _missing("quack")
        if missing:
            return missing
        if device != "cuda":
            return "quack-kernels' CuTe DSL kernels need CUDA"
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

    def _skip_reason(self, case, device):
        missing = _missing("trl")
        if missing:
            return missing
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
            def run():
                with torch.no_grad():
                    logprobs()
            return run
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
