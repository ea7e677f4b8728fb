#!/usr/bin/env bash
# GPU checks (issues 7 and 13): the tests marked gpu, the Triton kernel tests compiled for the GPU,
# training speed of `base` in bf16 (ReSSFormer and the dense baseline, tokens/s, peak memory, MFU),
# then optionally `base` trained for MINUTES (0 skips it). Run from the repository root on a CUDA
# machine with the package importable (and triton installed: it comes with CUDA builds of torch):
#   bash bench/gpu_check.sh [OUT_DIR] [MINUTES]
# Writes OUT_DIR/{env.txt, gpu_tests.log, triton_tests.log, kernels.log, speed.log, speed*.json} and, with
# MINUTES > 0, base.log and the run folder OUT_DIR/base. With MINUTES=0 its timeouts add up to 500 s
# (each step usually ends well before its own).
set -u
OUT=${1:-runs/gpu}
MINUTES=${2:-0}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
} 2>&1 | tee "$OUT/env.txt"

timeout 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 45 $PY -m pytest -m triton -q -p no:cacheprovider tests/test_triton.py 2>&1 | tee "$OUT/triton_tests.log"

# base: d 768, K=4, 1024-byte segments; 8 sequences of 2 segments per step (16,384 tokens); the Triton
# kernel (the default on CUDA)
SPEED="--device cuda --dtype bf16 --preset base --batch-size 8 --seq-len 2048 --steps 6 --warmup 2 --lengths ''"
# shellcheck disable=SC2086
eval timeout 100 $PY -m ressformer.bench.train_speed $SPEED --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log"
# issue 22, item 3: the two Triton backwards of one base-sized call (gather: atomics; tiles: tl.dot per key
# block), then training with the tiles backward (the default stays gather until this says otherwise)
timeout 45 $PY -m ressformer.bench.attention_kernels 2>&1 | tee "$OUT/kernels.log"
# shellcheck disable=SC2086
RESSFORMER_TRITON_BACKWARD=tiles eval timeout 70 $PY -m ressformer.bench.train_speed $SPEED --speed-only \
  --json "$OUT/speed_tiles_backward.json" 2>&1 | tee -a "$OUT/speed.log"
# issue 22, item 1: torch.compile of both models on CUDA bf16 (the Triton kernels stay opaque custom ops)
# shellcheck disable=SC2086
eval timeout 120 $PY -m ressformer.bench.train_speed $SPEED --speed-only --compile \
  --json "$OUT/speed_compiled.json" 2>&1 | tee -a "$OUT/speed.log"

if [ "$MINUTES" != 0 ]; then
  $PY -m ressformer.cli train --preset base --steps 3000 --max-minutes "$MINUTES" --batch-size 8 --lr 1e-3 \
    --warmup 100 --eval-every 100 --eval-batches 4 --ckpt-every 0 --log-every 10 --device cuda \
    --out "$OUT/base" 2>&1 | tee "$OUT/base.log"
fi
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | tee -a "$OUT/env.txt"
