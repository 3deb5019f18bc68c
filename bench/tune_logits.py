"""Time the logits kernels under candidate tile configs on a GPU: `python bench/tune_logits.py [--out FILE]`.

Each pass is memory-bound (the forward reads N x V once, the backward reads and writes it once), so
the table reports the achieved bandwidth next to a device-to-device copy of the same bytes. The
winners go into `_FWD_CONFIGS` / `_BWD_CONFIGS` of `softpo.kernels.logits` by hand; NOTES.md records the run.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench

from softpo.kernels import terms as token_epilogue
from softpo.kernels import logits as L

CANDIDATES = [
    # (BLOCK_N, BLOCK_V, num_warps, num_stages)
    (4, 2048, 8, 2), (2, 4096, 8, 2), (8, 1024, 8, 3),
    (1, 2048, 4, 2), (1, 4096, 4, 2), (1, 4096, 8, 2), (1, 8192, 8, 2), (1, 8192, 16, 2),
    (2, 2048, 4, 3), (4, 1024, 4, 2), (2, 1024, 4, 4), (1, 16384, 16, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    N, V = args.tokens, args.vocab
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(N, V, generator=gen, device="cuda", dtype=torch.bfloat16) * 2
    targets = torch.randint(0, V, (N,), generator=gen, device="cuda")
    g_logp = torch.randn(N, generator=gen, device="cuda")
    g_ent = torch.randn(N, generator=gen, device="cuda")
    out = torch.empty_like(logits)
    nbytes = logits.numel() * logits.element_size()
    copy_ms = do_bench(lambda: out.copy_(logits), return_mode="median")
    copy_bw = 2 * nbytes / copy_ms / 1e6
    terms = token_epilogue.TermsArgs(advantages=torch.randn(N, generator=gen, device="cuda"),
                                     gate=token_epilogue.GATE_SOFT)
    rows = []
    originals = L._FWD_CONFIGS, L._BWD_CONFIGS
    try:
        for block_n, block_v, warps, stages in CANDIDATES:
            config = triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v}, num_warps=warps, num_stages=stages)
            L._FWD_CONFIGS = L._BWD_CONFIGS = [(1 << 62, config)]
            _, lse, entropy, _, _ = L.logits_logprob_fwd(logits, targets, return_entropy=True)
            fwd = do_bench(lambda: L.logits_logprob_fwd(logits, targets), return_mode="median")
            fwd_ent = do_bench(lambda: L.logits_logprob_fwd(logits, targets, return_entropy=True, terms=terms),
                               return_mode="median")
            bwd = do_bench(lambda: L.logits_logprob_bwd(logits, targets, lse, g_logp, out=out), return_mode="median")
            bwd_ent = do_bench(lambda: L.logits_logprob_bwd(logits, targets, lse, g_logp, entropy=entropy,
                                                            g_entropy=g_ent, out=out), return_mode="median")
            rows.append({"BLOCK_N": block_n, "BLOCK_V": block_v, "num_warps": warps, "num_stages": stages,
                         "fwd_ms": fwd, "fwd_entropy_terms_ms": fwd_ent, "bwd_ms": bwd, "bwd_entropy_ms": bwd_ent})
    finally:
        L._FWD_CONFIGS, L._BWD_CONFIGS = originals
    print(f"N={N} V={V} bf16; copy {copy_ms:.3f} ms for {2 * nbytes / 1e9:.2f} GB ({copy_bw:.0f} GB/s)")
    print("BLOCK_N BLOCK_V warps stages | fwd ms (GB/s) | fwd+ent+terms | bwd ms (GB/s) | bwd+ent")
    for r in rows:
        print(f"{r['BLOCK_N']:7d} {r['BLOCK_V']:7d} {r['num_warps']:5d} {r['num_stages']:6d} | "
              f"{r['fwd_ms']:.3f} ({nbytes / r['fwd_ms'] / 1e6:.0f}) | {r['fwd_entropy_terms_ms']:.3f} | "
              f"{r['bwd_ms']:.3f} ({2 * nbytes / r['bwd_ms'] / 1e6:.0f}) | {r['bwd_entropy_ms']:.3f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "N": N, "V": V, "dtype": "bf16",
                       "copy_ms": copy_ms, "copy_bytes_per_s": copy_bw * 1e9, "configs": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
