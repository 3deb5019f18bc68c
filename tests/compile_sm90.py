"""Compiling the kernels for sm_90 (H100/H200) without a GPU: the interpreter accepts code that the compiler
rejects (types of loop bounds, dot shapes, constexpr branches), so CI checks both. The compiles run in a
fresh process, without TRITON_INTERPRET."""

import os
import pathlib
import subprocess
import sys
import textwrap

HERE = pathlib.Path(__file__).resolve().parent
SM90_MAX_SHARED = 227 * 1024
POINTERS = {"targets_ptr": "*i64", "row_idx_ptr": "*i64", "n_valid_ptr": "*i64", "valid_ptr": "*i1"}
NO_TERMS = dict(HAS_TERMS=False, GATE=0, HAS_OLD=False, HAS_DELTA=False, HAS_ISW=False, KL=0, KL_RATIO=False,
                IS_BOUND=0)


def compile_kernel(fn, config, dtype, **flags):
    """Compile `fn` for sm_90 with `config` (None: no tuning config) and every flag a compile-time constant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(config.kwargs if config else {}, **flags)
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in ("logits_ptr", "dlogits_ptr", "x_ptr"):
            signature[name] = "*" + dtype
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in ("N", "V", "numel") or name.startswith("stride"):
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages) if config else {}
    compiled = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32), options=options)
    # A config over the per-block shared memory of sm_90 compiles but fails at launch.
    assert compiled.metadata.shared <= SM90_MAX_SHARED, (fn.__name__, config, compiled.metadata.shared)


def compile_in_a_fresh_process(body: str) -> subprocess.CompletedProcess:
    """Run `body`, which calls `compile_kernel` (and may use NO_TERMS), in a process without the interpreter;
    its stdout ends with "compiled" when every compile passed."""
    script = (f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom compile_sm90 import NO_TERMS, compile_kernel\n"
              + textwrap.dedent(body) + "\nprint('compiled')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
