#!/usr/bin/env bash
# The whole benchmark on one GPU machine in one run: (a) plain PyTorch, (b) cxr-batch score per
# precision mode (bf16 with JPEGs decoded on the GPU, the default there, and +cpudecode with them
# decoded by the CPUs), (c) the bare forward, (d) the score command per engine in a fresh process
# (start-up included and broken down), the nvJPEG decode check, and the peak-memory check at N and
# 10N images. One JSON with every number lands in $OUT; docs/performance.md says how to read it.
#
#   bash scripts/gpu_bench.sh [WORKDIR] [OUT]
#
# The default sizes (2,000 images of 1000-2000 px, the baseline on 300 of them: it is the slow one)
# keep a run to minutes on one GPU; the archive is generated with every CPU, then kept in WORKDIR
# for a rerun. IMAGES, BASELINE, SIDE_MIN/SIDE_MAX, BATCH and MEMORY override the sizes.
#
# Without Ray installed, the benchmark measures (a), (c), (b) and the memory check on the local
# engine and (d) local, and says so. On a machine without network access, put the wheels the
# project needs beyond torch (pydicom, for example) in .whl/ at the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pydicom==3.0.2
# and they are installed into /tmp/site before the run.
set -euo pipefail
WORK=$(realpath -m "${1:-/tmp/cxr-gpu-bench}")
OUT=$(realpath -m "${2:-${OUT:-.}}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$WORK" "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # cxr_batch from this checkout, installed or not
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: runs on the CPU"
"$PY" - <<'PY'
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}")
PY
if "$PY" -c "import ray" 2> /dev/null; then ENGINES=${ENGINES:-local,ray}; else ENGINES=${ENGINES:-local}; fi
uptime
# A CPU smoke run: IMAGES=8 BASELINE=4 SIDE_MIN=64 SIDE_MAX=96 MEMORY=4 bash scripts/gpu_bench.sh
"$PY" jobs/benchmark.py "$WORK" --images "${IMAGES:-2000}" --batch-size "${BATCH:-64}" \
  --min-side "${SIDE_MIN:-1000}" --max-side "${SIDE_MAX:-2000}" --modes fp32,bf16,bf16+cpudecode,bf16+nocams \
  --engines "$ENGINES" --baseline-images "${BASELINE:-300}" --decode-check --memory-check --memory-images "${MEMORY:-200}" \
  --out-json "$OUT/gpu-bench.json" 2> "$OUT/gpu-bench.log" | tee "$OUT/gpu-bench.txt"
uptime
