#!/usr/bin/env bash
# Encoder check on a GPU machine (run by the lead through the device tool).
#
# What it does, in about 3-5 minutes:
#   1. shows the GPU and whether onnxruntime-gpu can start its CUDA provider;
#   2. exports the encoder (cached under .cache/encoder-export; carry .cache to
#      skip the export, else it takes ~1 min on the CPU);
#   3. parity of ONNX fp32 on CUDA against torch on the CPU (1,000 texts);
#   4. `coldstart bench encoder --provider cuda`: sentence-transformers on
#      cuda vs ours fp32 on the CUDA provider by batch size, then gRPC with 1
#      and 32 clients, batching on and off (INT8 rows are CPU-only and skipped);
#   5. copies bench/results/encoder.json and the logs to $OUT.
#
# Needs the project's .venv (torch, onnxruntime-gpu and the nvidia-* CUDA 13
# wheels), or PY=python3 on a machine whose Python has them plus the carried
# wheels (docs/ENCODER.md, "GPU", says how the H200 run was done; with
# grpc_tools absent there, carry gen/ made here).
# Usage: bench/gpu_encoder_check.sh  (OUT defaults to ./gpu-out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
  echo "== GPU"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  echo "== protos"
  if "$PY" -c "import grpc_tools" 2>/dev/null; then "$PY" -m services.common.protogen; fi
  export PYTHONPATH="$PWD:$PWD/gen/python${PYTHONPATH:+:$PYTHONPATH}"
  echo "== onnxruntime providers"
  "$PY" - <<'EOF'
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
from services.encoder.runtime import gpu_present
print("gpu device node present:", gpu_present())
EOF
  echo "== export (cached)"
  "$PY" - <<'EOF'
from services.encoder.export import cached_export
print(cached_export(int8=True))
EOF
  echo "== parity: ONNX fp32 on CUDA vs torch"
  "$PY" - <<'EOF'
import time
import numpy as np
from services.encoder.export import cached_export, cosines
from services.encoder.hf_model import TorchTextModel
from services.encoder.runtime import OnnxTextModel
from services.encoder.texts import sample_texts
texts, source = sample_texts(1000)
folder = cached_export(int8=True)
model = OnnxTextModel(folder, provider="cuda")
print("provider:", model.provider, "texts:", source)
got = model.embed(texts, 32)
ref = TorchTextModel().encode(texts)
cos = cosines(got, ref)
print(f"fp32 CUDA vs torch: min {cos.min():.6f} mean {cos.mean():.6f}")
for batch in (1, 32, 128, 256):
    subset = texts[:200] if batch == 1 else texts
    model.embed(subset[:64], batch)
    t = time.perf_counter(); model.embed(subset, batch); dt = time.perf_counter() - t
    print(f"ours fp32 CUDA batch {batch}: {len(subset) / dt:.0f} texts/s")
EOF
  echo "== bench"
  "$PY" -m services.cli bench encoder --provider cuda --threads 4 --rounds 2
} 2>&1 | tee "$OUT/gpu_encoder_check.log"

cp bench/results/encoder.json "$OUT/encoder_gpu.json"
echo "done: $OUT"
