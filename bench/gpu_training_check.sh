#!/usr/bin/env bash
# Training check on a GPU machine (run by the lead through the device tool).
#
# What it does, in about 2-4 minutes:
#   1. shows the GPU and whether torch sees CUDA;
#   2. `coldstart bench training --device cuda --workers 1`: one torchrun worker
#      in an NCCL process group (a group is formed even for one worker), the
#      towers trained for 2 epochs on ML-100K (synthetic when the shared data is
#      absent), samples/s, s/epoch, peak GPU memory;
#   3. copies bench/results/training.json and the log to $OUT.
#
# Needs the project's .venv with a CUDA build of torch. Item text vectors come
# from .cache/vectors (carry .cache to skip encoding ML-100K, ~1 min on CPU).
# Usage: bench/gpu_training_check.sh   (OUT defaults to ./gpu-out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DATA=ml-100k
[ -f ../shared/data/ml-100k/u.data ] || DATA=synthetic
{
  echo "== GPU"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
  echo "== training benchmark, NCCL, 1 GPU worker ($DATA)"
  timeout 480 "$PY" -m bench.training --device cuda --workers 1 --epochs 2 --data "$DATA"
} 2>&1 | tee "$OUT/gpu_training_check.log"
cp bench/results/training.json "$OUT/training.json"
