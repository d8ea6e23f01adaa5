#!/usr/bin/env bash
# The GPU measurement of issue 13 in one run (prepared on a CPU-only machine, not yet run on a GPU):
# (a) plain PyTorch, (b) cxr-batch score per precision mode, (c) the bare forward, (d) the score
# command per engine in a fresh process (start-up included and broken down), the nvJPEG decode
# check, and the peak-memory check at N and 10N images. One JSON with every number lands in $OUT.
#
#   bash scripts/gpu_bench.sh [WORKDIR] [OUT]     (about 8 minutes on one H200 with 16 CPUs)
#
# Sized to fit a 10-minute slot: 2,000 images of 1000-2000 px (the archive is generated with every
# CPU, then kept in WORKDIR for a rerun), the baseline on 300 of them (it runs at ~20 images/s).
set -euo pipefail
WORK=${1:-/tmp/cxr-gpu-bench}
OUT=${2:-${OUT:-.}}
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: runs on the CPU"
python - <<'PY'
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}")
PY
uptime
# IMAGES, BASELINE, SIDE_MIN/SIDE_MAX, BATCH override the sizes (a CPU smoke run: IMAGES=8 BASELINE=4 ...).
python jobs/benchmark.py "$WORK" --images "${IMAGES:-2000}" --batch-size "${BATCH:-64}" \
  --min-side "${SIDE_MIN:-1000}" --max-side "${SIDE_MAX:-2000}" --modes fp32,bf16,bf16+nocams \
  --engines local,ray --baseline-images "${BASELINE:-300}" --decode-check --memory-check --memory-images "${MEMORY:-200}" \
  --out-json "$OUT/gpu-bench.json" 2> "$OUT/gpu-bench.log" | tee "$OUT/gpu-bench.txt"
uptime
