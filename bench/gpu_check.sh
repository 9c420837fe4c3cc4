#!/usr/bin/env bash
# Every CUDA path of fastflow in one short run, for the day a GPU is lent (aim: under 8 minutes on one GPU).
#
#   1. the kernel tests natively on CUDA (no Triton interpreter) and every test marked `cuda`, among them the
#      compiled + bf16 + CUDA-graph train step and the CUDA-graph sampler checked against eager fp32 on the same
#      inputs (tests/fastflow/test_compile.py);
#   2. the benchmark grid: train and sample, eager / compiled / bf16 / CUDA graphs / seed-baseline, with
#      torch.cuda.max_memory_allocated (reset per row, so --in-process is honest on CUDA) and NVML's used memory;
#   3. the plots of those rows.
#
# Everything goes to one folder: $OUT if set (the device runner collects it), else bench/results/gpu-check-<time>.
# The stage time-outs add up to 8 minutes; a stage cut short keeps the rows it wrote (written after every row).
# Usage: bash bench/gpu_check.sh            (BATCHES=32,64,128,256,512 for the full grid if time allows)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check-$(date +%Y%m%d-%H%M%S)}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
BATCHES=${BATCHES:-32,128}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
stage() { echo; echo "== $1 ($(($(date +%s) - start)) s since start)"; }
status=0

stage "machine"
nvidia-smi | tee "$OUT/nvidia-smi.txt" || { echo "no nvidia-smi: is there a GPU?"; exit 2; }
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 2

stage "1a. kernel tests, native Triton on CUDA (TRITON_INTERPRET=0)"
TRITON_INTERPRET=0 timeout 60 $PY -m pytest tests/kernels -q -p no:cacheprovider --junitxml="$OUT/pytest-kernels.xml" || status=1

stage "1b. every test marked cuda (compiled/bf16/CUDA-graph train step and sampler vs eager fp32 among them)"
TRITON_INTERPRET=0 timeout 100 $PY -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml" || status=1

stage "2a. benchmark: train step, batches $BATCHES"
timeout 200 $PY -m bench train --device cuda --batch-sizes "$BATCHES" --iters 20 --warmup 5 --out "$OUT" --in-process \
  --modes eager-fp32,eager-bf16,compile-bf16,compile-bf16-cudagraphs,seed-baseline || status=1

stage "2b. benchmark: sampler at 10, 20, 50 NFE, batches $BATCHES"
timeout 120 $PY -m bench sample --device cuda --batch-sizes "$BATCHES" --iters 10 --warmup 2 --out "$OUT" --in-process \
  --modes eager-fp32,eager-bf16,compile-bf16,compile-bf16-cudagraphs || status=1

stage "3. plots"
$PY plot/bench.py --out "$OUT" "$OUT"/*.json || status=1

stage "done: status $status; everything is in $OUT"
ls -l "$OUT"
exit $status
