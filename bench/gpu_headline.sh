#!/usr/bin/env bash
# The headline comparisons on one GPU in under 10 minutes (bench/NOTES.md, "Built on CPU, not yet measured on a
# GPU"): the Triton kernels' tests compiled for the GPU, the gpu-headline bench set (hidden SAPO at N=16384 with
# its peers, memory="flat" over N, GSPO and SPO, the logits path, and the ceilings, in one run), the
# profiles of the hidden and the logits SAPO step, and the sampler's costs (bench/bench_sampling.py). Every
# record lands in $OUT (default bench/results/gpu-headline); copy the ones to keep into bench/results/ and
# commit them.
#
# Run from the repository root: `bash bench/gpu_headline.sh`. The peers come from softpo's bench extra
# (pip install -e ".[bench]"). On a machine without a package index, put their wheels in .whl/ first
# (for the machine's Python, e.g. 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl liger-kernel==0.8.5 trl==1.16.0 datasets cut-cross-entropy==25.1.1 multiprocess dill
# quack-kernels is not among them (its CUDA 13 runtime wheel alone is 88 MiB); without it the bench records
# the quack provider as skipped, with that reason.
set -uo pipefail
OUT=${OUT:-$PWD/bench/results/gpu-headline}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "the wheels in .whl/ did not install: their providers will be recorded as skipped"
fi
# softpo from this checkout as setup.py lays it out (kernels/ is softpo.kernels), the installed torch untouched.
[ -e softpo/kernels ] || ln -s ../kernels softpo/kernels
export PYTHONPATH=$PWD:$SITE
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"

# 1. The Triton kernels' loss, scale and flat-memory tests, compiled for the GPU (on CPU they run under the
#    interpreter): about a minute.
timeout 120 python3 -m pytest tests/test_kernels.py tests/test_kernels_sampling.py -q -x -p no:cacheprovider -k \
    "logits_loss or scales_once or flat_memory or scale_kernel or hidden_loss_gradient or fused_terms or warpers \
    or thresholds or large_logit_offsets or no_nan" \
    2>&1 | tail -15 | tee "$OUT/pytest.txt"

# 2. The headline comparisons side by side, ceilings measured at the start and the end: about 5 minutes.
timeout 270 python3 -m softpo.bench --device cuda --set gpu-headline --out "$OUT" --no-isolate --time-limit 240 \
    --max-samples 10 2>&1 | tail -40

# 3. Where a step's time goes: hidden and logits SAPO, N=16384, bf16.
timeout 45 python3 -m softpo.bench.profile_step --out "$OUT" --path hidden 2>&1 | tail -3
timeout 45 python3 -m softpo.bench.profile_step --out "$OUT" --path logits 2>&1 | tail -3

# 4. The sampler's options against the plain call (log-probs, and SAPO's loss with its route under top-k), the
#    bf16 matmul ceiling, and batch_invariant's bits: about a minute and a half.
timeout 100 python3 bench/bench_sampling.py --device cuda --impl triton --dtype bfloat16 --N 8192 --H 4096 \
    --V 151936 --rounds 3 --options plain temperature-per-sequence scale-softcap top-k-50 min-p-0.05 top-p-0.9 \
    batch-invariant loss-plain loss-top-k-50 --out "$OUT/sampling.json" 2>&1 | tail -14
ls -la "$OUT"
