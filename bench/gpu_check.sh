#!/usr/bin/env bash
# GPU checks (issue 7): the tests marked gpu, then the `base` preset trained on CUDA (bf16 autocast)
# for a few minutes. Run from the repository root on a CUDA machine with the package importable:
#   bash bench/gpu_check.sh [OUT_DIR] [MINUTES]
# Writes OUT_DIR/{env.txt, gpu_tests.log, base.log} and the run folder OUT_DIR/base (metrics.jsonl,
# loss.png, ckpt/).
set -u
OUT=${1:-runs/gpu}
MINUTES=${2:-4}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch, onnxruntime as ort; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| onnxruntime', ort.__version__, ort.get_available_providers())"
} 2>&1 | tee "$OUT/env.txt"

timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 120 $PY -m pytest -m ort_gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15 \
  | tee -a "$OUT/gpu_tests.log"

# base: d 768, K=4, 1024-byte segments; 8 sequences of 2 segments per step (16,384 tokens)
$PY -m ressformer.cli train --preset base --steps 3000 --max-minutes "$MINUTES" --batch-size 8 --lr 1e-3 \
  --warmup 100 --eval-every 100 --eval-batches 4 --ckpt-every 0 --log-every 10 --device cuda \
  --out "$OUT/base" 2>&1 | tee "$OUT/base.log"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | tee -a "$OUT/env.txt"
