#!/usr/bin/env bash
# Issue 15's GPU round in one device call (bench/NOTES.md, "Round 2"): the new kernels' tests compiled on the
# GPU, the round2 bench set (S1, S1m, S2, S3 with their peers and the ceilings, in one run), and the S1 and S2
# profiles. Every record lands in $OUT (the device tool brings it back); copy it to bench/results/ and commit.
#
# Prepare on a CPU machine, in the repository root (the device reaches no registry; its image has torch,
# triton, transformers and accelerate, for Python 3.12):
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl liger-kernel==0.8.5 trl==1.16.0 datasets cut-cross-entropy==25.1.1 multiprocess dill
# quack-kernels is not carried: its CUDA 13 runtime wheel (nvidia-cutlass-dsl-libs-cu13) is 88 MiB, over the
# 64 MiB a call may carry; the bench records it as skipped with that reason.
# Then: run(command="bash bench/gpu_round2.sh", carry=[".whl"], timeout_s=560) and give the machine back.
set -uo pipefail
OUT=${OUT:-$PWD/bench/results/gpu-round2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "carried wheels did not install: their providers will be recorded as skipped"
# softpo from this checkout as setup.py lays it out (kernels/ is softpo.kernels), the image's torch untouched.
[ -e softpo/kernels ] || ln -s ../kernels softpo/kernels
export PYTHONPATH=$PWD:$SITE
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"

# 1. The kernels this round added, compiled for the GPU (the CPU suite ran them under the interpreter): ~1 min.
timeout 150 python3 -m pytest tests/test_kernels.py -q -x -p no:cacheprovider -k \
    "logits_loss or scales_once or flat_memory or scale_kernel or hidden_loss_gradient or fused_terms" \
    2>&1 | tail -15 | tee "$OUT/pytest.txt"

# 2. Issue 15's targets side by side, ceilings measured at the start and the end: about 5 minutes.
timeout 330 python3 -m softpo.cli bench --device cuda --round2 --out "$OUT" --no-isolate --time-limit 300 \
    --max-samples 10 2>&1 | tail -40

# 3. Where a step's time goes: S1 (hidden SAPO) and S2 (logits SAPO), N=16384, bf16.
timeout 60 python3 bench/profile_step.py --out "$OUT" --path hidden 2>&1 | tail -3
timeout 60 python3 bench/profile_step.py --out "$OUT" --path logits 2>&1 | tail -3
ls -la "$OUT"
