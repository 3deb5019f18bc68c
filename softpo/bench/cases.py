"""What `softpo bench` measures: the cases, the sets they form, their inputs, and the interface of a provider.

A case is one shape and one objective on one path: hidden states + lm_head weight, or logits, forward
only (old/reference log-probs) or forward+backward (the training step's loss). A set is a list of cases
chosen for one purpose (the sets are described in SETS). A provider (providers.py, peers.py) is one
library's way of computing a case; `Provider.skip_reason` says, in words, why it cannot run one, and the
harness records that reason instead of dropping the provider.

All tokens are valid (full mask), so the counted FLOPs and bytes are the work done.
"""

from __future__ import annotations

import dataclasses
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

    def _name(self, rows: bool) -> str:
        ent = "-ent" if self.entropy else ""
        tag = f"-{self.tag}" if self.tag else ""
        shape = f"-N{self.N}-T{self.T}" if rows else ""
        hid = f"-H{self.H}" if self.path == "hidden" else ""
        return f"{self.path}-{self.mode}-{self.objective}{ent}{tag}{shape}{hid}-V{self.V}-{self.dtype}"

    @property
    def id(self) -> str:
        return self._name(rows=True)

    @property
    def family(self) -> str:
        """The case with N left out: the cases of one family form a line against N in the plots."""
        return self._name(rows=False)

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


def rows_of(N: int, T: int = 2048) -> tuple[int, int]:
    """(B, T): N tokens in rows of T (one row when N is smaller)."""
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
    only: tuple[str, ...] = ()  # the providers that run these cases (empty: every provider)
    leave_out: tuple[str, ...] = ()  # providers that do not
    why: str = ""  # why the others (or those left out) do not run them


SWEEP = (4096, 8192, 16384, 32768, 65536)
LLAMA_NS = (4096, 16384, 65536)
SAPO, LOGP, LOGP_ENTROPY = (("sapo", False),), (("logp", False),), (("logp", True),)
# Every objective with and without entropy, but plain SAPO (the sweeps already have it).
OTHERS = tuple((o, e) for o in OBJECTIVES for e in (False, True) if (o, e) != ("sapo", False))
HEADLINE = 16384  # the GPU sets' headline N
COMPILED = ("torch-compile", "softpo-compile")
# What a user picks instead of softpo on each path: the fused-linear and linear-cross-entropy peers and TRL on
# hidden states; Liger's Triton loss and TRL on logits.
HIDDEN_PEERS = ("softpo-triton", "softpo-triton-flat", "softpo-compile", "trl", "torch-linear-ce",
                "cut-cross-entropy", "quack")
LOGITS_PEERS = ("softpo-triton", "softpo-triton-flat", "softpo-compile", "liger-triton", "trl")
# The quick set on a CPU: softpo against torch (eager and compiled) and the peers that run there.
QUICK_PEERS = ("softpo-triton", "softpo-torch", "torch-eager", "liger-fused-linear", "trl", "torch-linear-ce",
               "cut-cross-entropy", "quack")
QUICK_WHY = "the quick set compiles (a CPU compile costs tens of seconds) on the hidden-path SAPO loss only"
SWEEP_WHY = "a CPU compile per case costs tens of seconds: the cpu-sweep set compiles the plain N=1024, V=8192 cases"


def _per_path(*families):
    return tuple(dataclasses.replace(f, path=path) for path in ("hidden", "logits") for f in families)


# Each set: what it is for, dtype, H, and its families in order.
SETS = {
    "full": dict(
        about="the GPU set: H=4096, bf16, N up to 65536 at V=151936 and V=128256, every objective",
        dtype="bf16", H=4096, families=(
            *_per_path(Family("", "fwdbwd", SAPO, SWEEP, 151936), Family("", "fwdbwd", SAPO, LLAMA_NS, 128256),
                       Family("", "fwdbwd", OTHERS, (HEADLINE,), 151936)),
            Family("hidden", "fwd", LOGP, SWEEP, 151936),
            Family("hidden", "fwd", LOGP, LLAMA_NS, 128256),
            Family("hidden", "fwd", LOGP_ENTROPY, (HEADLINE,), 151936),
            # One row of 131072 tokens: offsets past 2^31 elements, and no token axis on a 65535-limited grid.
            # On the Llama-3 vocabulary: at V=151936 the logits and their gradient alone (80 GB) overflow an H100.
            Family("logits", "fwdbwd", SAPO, (131072,), 128256, T=131072, tag="row"),
        )),
    "gpu-headline": dict(
        about="the headline comparisons in one GPU run of about 5 minutes: hidden SAPO forward+backward at "
              "N=16384, H=4096, V=151936, bf16 against its peers; memory=\"flat\" against the default over N; "
              "GSPO and SPO on the same case; the logits path against Liger and TRL",
        dtype="bf16", H=4096, families=(
            Family("hidden", "fwdbwd", SAPO, (HEADLINE,), 151936, only=HIDDEN_PEERS,
                   why="the gpu-headline set compares the hidden path with the fused-linear peers and TRL"),
            Family("hidden", "fwdbwd", SAPO, (4096, 65536), 151936, only=("softpo-triton", "softpo-triton-flat", "trl"),
                   why="the gpu-headline set follows memory over N for softpo's two memory modes and TRL"),
            Family("hidden", "fwdbwd", (("gspo", False), ("spo", False)), (HEADLINE,), 151936, only=("softpo-triton",),
                   why="the gpu-headline set compares GSPO and SPO with softpo's own SAPO at the same N"),
            Family("logits", "fwdbwd", SAPO, (HEADLINE,), 151936, only=LOGITS_PEERS,
                   why="the gpu-headline set compares the logits path with Liger's Triton loss and TRL"),
        )),
    "quick": dict(
        about="a few minutes on a CPU: softpo against torch eager, torch.compile and the installed peers at "
              "N=1024, H=256, V=8192, fp32, and the memory of a large vocabulary (N=256, V=151936)",
        dtype="fp32", H=256, families=(
            Family("hidden", "fwdbwd", SAPO, (1024,), 8192, T=256),
            Family("hidden", "fwd", LOGP, (1024,), 8192, T=256, only=QUICK_PEERS, why=QUICK_WHY),
            Family("logits", "fwdbwd", SAPO, (1024,), 8192, T=256, only=QUICK_PEERS, why=QUICK_WHY),
            Family("hidden", "fwdbwd", SAPO, (256,), 151936, T=256,
                   only=("softpo-triton", "softpo-torch", "torch-eager"),
                   why="the quick set's large-vocabulary case compares softpo's memory with materialized logits"),
        )),
    "cpu-sweep": dict(
        about="about 30 minutes on a CPU: fp32, H=256, V=8192, N from 256 to 4096, every objective with and "
              "without entropy, a 16384-token row, and N=4096, H=256, V=151936 forward and forward+backward",
        dtype="fp32", H=256, families=(
            *_per_path(Family("", "fwdbwd", SAPO, (256, 4096), 8192, T=256, leave_out=COMPILED, why=SWEEP_WHY),
                       Family("", "fwdbwd", SAPO, (1024,), 8192, T=256),
                       Family("", "fwdbwd", OTHERS, (1024,), 8192, T=256, leave_out=COMPILED, why=SWEEP_WHY)),
            Family("hidden", "fwd", LOGP, (256, 4096), 8192, T=256, leave_out=COMPILED, why=SWEEP_WHY),
            Family("hidden", "fwd", LOGP, (1024,), 8192, T=256),
            Family("hidden", "fwd", LOGP_ENTROPY, (1024,), 8192, T=256, leave_out=COMPILED, why=SWEEP_WHY),
            Family("logits", "fwdbwd", SAPO, (16384,), 4096, T=16384, tag="row", leave_out=COMPILED, why=SWEEP_WHY),
            Family("hidden", "fwd", LOGP, (4096,), 151936, T=1024, leave_out=COMPILED, why=SWEEP_WHY),
            Family("hidden", "fwdbwd", SAPO, (4096,), 151936, T=1024, leave_out=COMPILED, why=SWEEP_WHY),
        )),
    "tiny": dict(
        about="seconds: three tiny cases that exercise the harness, softpo against torch eager",
        dtype="fp32", H=32, families=tuple(
            dataclasses.replace(f, only=("softpo-triton", "softpo-torch", "torch-eager"),
                                why="the tiny set checks the harness, with softpo and torch eager only (importing "
                                    "the peers takes longer than the set): --quick runs them") for f in (
                Family("hidden", "fwdbwd", SAPO, (64,), 1000, T=32),
                Family("logits", "fwdbwd", (("grpo", False),), (64,), 1000, T=32),
                Family("hidden", "fwd", LOGP, (64,), 1000, T=32),
            ))),
}


def _full_set_skips(case: Case) -> tuple[tuple[str, str], ...]:
    """The whole full set has to fit a GPU session's budget (about 10 minutes of measurement): the
    providers that cost minutes per case run where they say the most."""
    plain = case.objective in ("sapo", "logp") and not case.entropy and not case.tag
    skips = []
    if not (plain and case.N == HEADLINE and case.V == 151936):
        reason = (f"torch.compile runs on the SAPO N={HEADLINE} V=151936 cases only: a compile per shape and "
                  "objective costs a minute")
        skips += [(name, reason) for name in COMPILED]
    if case.N != 4096:
        skips.append(("softpo-torch", "softpo's chunked torch path (the CPU fallback, fp32 matmuls) runs on "
                      "the N=4096 cases only on GPU"))
    return tuple(skips)


def _family_skips(family: Family, providers: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = [name for name in providers if (family.only and name not in family.only) or name in family.leave_out]
    return tuple((name, family.why) for name in out)


def case_set(name: str, providers: tuple[str, ...] = ()) -> list[Case]:
    """The cases of a set (SETS), each with the providers of `providers` it leaves out and why."""
    if name not in SETS:
        raise ValueError(f"set must be one of {', '.join(repr(n) for n in SETS)}, got {name!r}")
    spec = SETS[name]
    cases = []
    for family in spec["families"]:
        H = spec["H"] if family.path == "hidden" else 0
        for objective, entropy in family.pairs:
            for N in family.Ns:
                case = Case(family.path, family.mode, objective, entropy, *rows_of(N, family.T), family.V, H=H,
                            dtype=spec["dtype"], tag=family.tag)
                skips = _full_set_skips(case) if name == "full" else _family_skips(family, providers)
                cases.append(dataclasses.replace(case, skip=skips))
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


def forward_only(fn, *args, **kwargs) -> Callable[[], None]:
    """A case's run for mode "fwd": the call without autograd, as for old and reference log-probs."""
    def run():
        with torch.no_grad():
            fn(*args, **kwargs)
    return run


def loss_kwargs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("advantages", "old_logp", "ref_logp", "rewards", "q0")}



# ---------------------------------------------------------------- the interface of a provider


def missing_module(module: str) -> bool:
    return importlib.util.find_spec(module) is None


class Provider:
    """One library's way of running a case. `unavailable` says why it cannot run at all here (a package
    that is not installed, a device it does not support): the harness reports that once per run."""

    name = ""
    label = ""
    paths = ("hidden", "logits")
    modes = ("fwd", "fwdbwd")
    # The backward recomputes the logits: 8NHV executed where 6NHV are counted (True, or a list of
    # the objectives for which it does).
    recomputes_logits: bool | list = False
    extra_position = False
    needs_cuda = False
    module = ""  # the module it imports, when that comes from another package
    package = ""  # that package's name on PyPI
    extra = "bench"  # the extra of softpo that installs it; "" when none does

    def unavailable(self, device: str) -> str | None:
        """None when this provider can run on `device` at all, else the reason it cannot."""
        if self.needs_cuda and device != "cuda":
            return f"{self.name} needs CUDA"
        if self.module and missing_module(self.module):
            return f"{self.package} is not installed"
        return self._unavailable(device)

    def _unavailable(self, device: str) -> str | None:
        return None

    def skip_reason(self, case: Case, device: str) -> str | None:
        """None when this provider can run `case` on `device`, else the reason it cannot."""
        reason = self.unavailable(device)
        if reason is not None:
            return reason
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
