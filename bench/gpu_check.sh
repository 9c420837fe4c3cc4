#!/usr/bin/env bash
# Every CUDA path of fastflow in one run of about 11 minutes on one GPU (planned for one H200), the most valuable
# answers first:
#
#   1. native Triton kernels vs the reference: tests/kernels with TRITON_INTERPRET=0 (and its `cuda` tests);
#   2. the compiled + CUDA-graph train step and sampler vs eager fp32: the `cuda`-marked tests of tests/fastflow;
#   3. train rows: seed-baseline (seconds) and compile-bf16-cudagraphs first, then eager-fp32, eager-bf16,
#      compile-bf16; batches $BATCHES (32,128);
#   4. sampling rows at 10, 20, 50 NFE, the same modes (no seed-baseline) and batches;
#   5. kernel bandwidth: each op's GB/s, Triton vs the eager reference, then vs the compiled reference;
#   6. the AOT compile check against the driver: every kernel variant's registers and spills as compiled without
#      a GPU (bench/results/kernels-aot.json) against what the driver reports when it loads the same binary;
#   7. the roofline of the rows measured in stages 3 and 4: measured ÷ bound, and the time per launch and per
#      kernel the measurement implies;
#   8. if time is left: train rows at $MORE_BATCHES (256,512).
#
# Time: each stage has a budget and a scheduled end (the sum of the budgets so far), so a quick stage hands its
# unused seconds to the next and a slow one never eats a later stage's share. At its end a stage gets SIGINT:
# pytest still writes its junit XML (it does for SIGINT, not for SIGTERM) and the bench writes its rows and
# tables (written after every row anyway); SIGKILL follows 20 s later. The last stage ends by BUDGET - 30 s (20 s
# for a SIGKILL's grace, 10 s for the tables and plots), so the whole script ends within BUDGET.
#
# Software: the machine's stock python (PY, default python3; an H200 here has torch 2.11, triton 3.6, Python 3.12
# and no package registry), from a copy of the repository (not installed: PYTHONPATH is the repository root). No
# MNIST: the train rows use synthetic uint8 data of MNIST's shape (bench --data auto). A missing optional package
# costs what needs it, with a line saying so (hypothesis: the property tests; torchvision/PIL: the seed-baseline
# rows; matplotlib: the plots).
#
# Output: the README's tables, printed at the end in the form the README shows (paste them as they are), also in
# tables.md. Everything goes to bench/results/gpu-check-<time>/ (kept), or, with $OUT set (the device runner brings
# back at most 8 files from it), the files are made in a scratch folder and $OUT gets gpu_check.log (live),
# tables.md and gpu-check.tar.gz (everything, refreshed after every stage).
#
# Usage: bash bench/gpu_check.sh [--dry-run]
#   --dry-run   print the stages, their order, budgets and commands; check with $PY that every module they need
#               imports and that pytest collects the tests they run; exit 0, or 1 with a one-line reason (no GPU
#               needed).
# Environment: PY, BUDGET (seconds for the whole script, default 670), BATCHES (default 32,128), MORE_BATCHES (default 256,512), OUT;
#   DEVICE=cpu PRESET=tiny BUDGET=150 rehearse the script itself on a CPU (its figures mean nothing there).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
case "${1:-}" in
--dry-run) DRY=1 ;;
"") ;;
*)
  echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2
  exit 2
  ;;
esac
PY=${PY:-python3}
BUDGET=${BUDGET:-670}
BATCHES=${BATCHES:-32,128}
MORE_BATCHES=${MORE_BATCHES:-256,512}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-auto} # auto: the original U-Net on CUDA
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTFLOW_OFFLINE=1 TRITON_INTERPRET=0
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8} # the kernel tests turn on deterministic mode
command -v "$PY" >/dev/null || {
  echo "gpu_check: no python at PY=$PY" >&2
  exit 1
}

# -- what the machine's python has ----------------------------------------------------------------------------------
# Required: without it no stage can run. Optional: the line says what is lost.
check_imports() {
  "$PY" - <<'EOF'
import importlib, os, sys
os.environ["TRITON_INTERPRET"] = "0"
required = {
    "torch": "everything", "triton": "the Triton kernels", "numpy": "fastflow.data", "pytest": "stages 1 and 2",
    "kernels": "the ops", "fastflow": "the library", "fastflow.solvers": "sampling", "fastflow.compile": "compile",
    "bench.grid": "stages 3, 4, 8", "bench.kernels": "stage 5", "bench.aot": "stage 6", "bench.roofline": "stage 7",
}
optional = {
    "hypothesis": "tests/kernels/test_kernel_properties.py is left out",
    "torchvision": "the seed-baseline rows fail (their reason is in the row)",
    "PIL": "the seed-baseline rows fail (their reason is in the row)",
    "matplotlib": "no plots",
    "pynvml": "no NVML memory figure in the rows",
}
def version(m):
    v = getattr(m, "__version__", None)
    return f" {v}" if isinstance(v, str) else ""
bad = []
for name, what in required.items():
    try:
        print(f"  ok       {name}{version(importlib.import_module(name))}")
    except Exception as e:
        bad.append(f"{name} ({type(e).__name__}: {' '.join(str(e).split())[:120]}; needed for {what})")
try:  # the train side, through the one place bench imports it from
    from bench.train_rows import training_api
    trainer, resolve = training_api()
    print(f"  ok       train side: {trainer.__module__}.{trainer.__name__}, {resolve.__module__}.{resolve.__name__}")
except Exception as e:
    bad.append(f"the train side ({type(e).__name__}: {' '.join(str(e).split())[:120]}; needed for stages 3 and 6)")
for name, what in optional.items():
    try:
        print(f"  ok       {name}{version(importlib.import_module(name))}")
    except Exception as e:
        print(f"  missing  {name} ({type(e).__name__}): {what}")
import torch
print(f"  python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
if bad:
    print("cannot import: " + "; ".join(bad))
    sys.exit(1)
EOF
}

# -- the stages ---------------------------------------------------------------------------------------------------
# pytest: -o addopts= drops the project's --benchmark-disable (an error where pytest-benchmark is missing).
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfEs)
KERNEL_TESTS=(tests/kernels)
"$PY" -c "import hypothesis" 2>/dev/null || KERNEL_TESTS+=(--ignore=tests/kernels/test_kernel_properties.py)
CUDA_TESTS=(tests/fastflow -m cuda)
TRAIN_MODES=seed-baseline,compile-bf16-cudagraphs,eager-fp32,eager-bf16,compile-bf16 # the baseline takes seconds
SAMPLE_MODES=compile-bf16-cudagraphs,eager-fp32,eager-bf16,compile-bf16
BENCH=("$PY" -m bench)
ROWS=(--device "$DEVICE" --preset "$PRESET" --in-process)
W=.                                      # set below; the dry run only prints the commands
NAMES=() BUDGETS=() CMDS=()
stage() { # stage NAME BUDGET_S COMMAND (one shell word list, run with eval)
  NAMES+=("$1")
  BUDGETS+=("$2")
  CMDS+=("$3")
}
plan() {
  stage "1. native Triton kernels vs the reference (tests/kernels, TRITON_INTERPRET=0)" 110 \
    "TRITON_INTERPRET=0 ${PYTEST[*]} ${KERNEL_TESTS[*]} --junitxml=\$W/pytest-kernels.xml"
  stage "2. compiled + CUDA-graph train step and sampler vs eager (tests/fastflow -m cuda)" 120 \
    "TRITON_INTERPRET=0 ${PYTEST[*]} ${CUDA_TESTS[*]} --junitxml=\$W/pytest-cuda.xml"
  stage "3. train rows, the seed baseline and CUDA graphs first; batches $BATCHES" 170 \
    "${BENCH[*]} train ${ROWS[*]} --data auto --batch-sizes $BATCHES --modes $TRAIN_MODES --warmup 3 --iters 10 --repeats 5 --out \$W"
  stage "4. sampling rows at 10, 20, 50 NFE; batches $BATCHES" 70 \
    "${BENCH[*]} sample ${ROWS[*]} --batch-sizes $BATCHES --modes $SAMPLE_MODES --warmup 1 --iters 3 --repeats 3 --out \$W"
  stage "5a. kernel GB/s: Triton vs the eager reference, N = 2^24 and 128 x 784" 30 \
    "${BENCH[*]} kernels --device $DEVICE --min-log2 24 --max-log2 24 --batch 128 --providers triton,reference-eager --out \$W"
  stage "5b. kernel GB/s: the compiled reference" 20 \
    "${BENCH[*]} kernels --device $DEVICE --min-log2 24 --max-log2 24 --batch 128 --providers reference-compiled --tag compiled --out \$W"
  stage "6. AOT registers and spills against the driver's (bench aot --check-gpu)" 60 \
    "${BENCH[*]} aot --check-gpu --out \$W/kernels-aot-gpu.json"
  stage "7. the roofline of the measured rows: measured / bound" 40 \
    "${BENCH[*]} roofline --device cuda --no-inductor-count --measured \$W/train-*.json \$W/sample-*.json --out \$W/roofline-measured.json"
  local rest=$((BUDGET - 30 - 110 - 120 - 170 - 70 - 30 - 20 - 60 - 40))
  stage "8. if time is left: train rows at batches $MORE_BATCHES" $((rest > 0 ? rest : 0)) \
    "${BENCH[*]} train ${ROWS[*]} --data auto --batch-sizes $MORE_BATCHES --modes compile-bf16-cudagraphs,eager-bf16,compile-bf16,eager-fp32 --warmup 3 --iters 10 --repeats 5 --append --out \$W"
}
plan

if [ "$DRY" = 1 ]; then
  echo "gpu_check --dry-run: PY=$PY, BUDGET=$BUDGET s, DEVICE=$DEVICE, PRESET=$PRESET, BATCHES=$BATCHES, MORE_BATCHES=$MORE_BATCHES"
  echo "stages, in order (budget in s; a stage ends by the sum of the budgets so far, then SIGINT, SIGKILL 20 s on):"
  cum=0
  for i in "${!NAMES[@]}"; do
    cum=$((cum + BUDGETS[i]))
    printf '  %-95s %4s s  (ends by %4s s)\n' "${NAMES[i]}" "${BUDGETS[i]}" "$cum"
    printf '      $ %s\n' "${CMDS[i]}"
  done
  echo "  then: 20 s of grace for a stage cut short, the README's tables (python -m bench tables) and the plots; 30 s"
  echo "imports with $PY:"
  check_imports || {
    echo "gpu_check --dry-run: FAILED: an import the stages need fails with $PY (line above)"
    exit 1
  }
  for spec in "1:${KERNEL_TESTS[*]}" "2:${CUDA_TESTS[*]}"; do
    n=${spec%%:*}
    # shellcheck disable=SC2086 # the test selection is a word list
    if ! out=$(TRITON_INTERPRET=0 "${PYTEST[@]}" --collect-only ${spec#*:} 2>&1); then
      echo "gpu_check --dry-run: FAILED: pytest cannot collect stage $n's tests: $(echo "$out" | grep -m1 -E 'Error|error' || echo "$out" | tail -1)"
      exit 1
    fi
    echo "stage $n collects: $(echo "$out" | tail -1)"
  done
  echo "gpu_check --dry-run: ok"
  exit 0
fi

# -- the run ------------------------------------------------------------------------------------------------------
stamp=$(date +%Y%m%d-%H%M%S)
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  W=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-$stamp.XXXX")
  LOGS=("$W/gpu_check.log" "$OUT/gpu_check.log")
else
  W=bench/results/gpu-check-$stamp
  mkdir -p "$W"
  LOGS=("$W/gpu_check.log")
fi
W=$(cd "$W" && pwd)
exec > >(tee "${LOGS[@]}") 2>&1
start=$(date +%s)
deadline=$((start + BUDGET - 30)) # the last stage's end: then 20 s of SIGKILL grace, 10 s of tables and plots
status=0
SUMMARY=()

tables() { # the README's tables from the rows written so far
  local files=()
  for f in "$W"/train-*.json "$W"/sample-*.json; do
    [ -e "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] && "${BENCH[@]}" tables "${files[@]}" >"$W/tables.md" 2>&1
}
snapshot() { # with $OUT: the tables and one archive of everything, after every stage
  tables
  [ -n "${OUT:-}" ] || return 0
  [ -e "$W/tables.md" ] && cp "$W/tables.md" "$OUT/tables.md"
  tar -czf "$OUT/gpu-check.tar.gz.tmp" -C "$W" . 2>/dev/null
  mv -f "$OUT/gpu-check.tar.gz.tmp" "$OUT/gpu-check.tar.gz"
}
trap snapshot EXIT

echo "== machine ($(date -u +%FT%TZ)); results in $W${OUT:+, copied to $OUT}"
nvidia-smi 2>&1 | tee "$W/nvidia-smi.txt" | head -20 || true
check_imports || {
  echo "gpu_check: FAILED: an import the stages need fails (line above); nothing measured"
  exit 2
}
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: FAILED: torch sees no CUDA device"
  exit 2
fi

cum=0
for i in "${!NAMES[@]}"; do
  cum=$((cum + BUDGETS[i]))
  now=$(date +%s)
  limit=$((start + cum - now))
  [ $((deadline - now)) -lt "$limit" ] && limit=$((deadline - now))
  echo
  echo "== ${NAMES[i]}: budget ${BUDGETS[i]} s, $limit s left for it ($((now - start)) s since start)"
  if [ "$limit" -lt 15 ]; then
    echo "   not run: no time left"
    SUMMARY+=("| ${NAMES[i]} | ${BUDGETS[i]} | 0 | not run: no time left |")
    continue
  fi
  echo "\$ ${CMDS[i]}"
  t0=$(date +%s)
  eval "timeout -s INT -k 20 $limit env ${CMDS[i]}"
  rc=$?
  used=$(($(date +%s) - t0))
  case $rc in
  0) result=passed ;;
  124 | 137) result="cut short at its budget (exit $rc); what it finished is kept" status=1 ;;
  *) result="FAILED (exit $rc)" status=1 ;;
  esac
  echo "-- ${NAMES[i]}: $result, $used s"
  SUMMARY+=("| ${NAMES[i]} | ${BUDGETS[i]} | $used | $result |")
  snapshot
done

echo
echo "== plots"
results=$(ls "$W"/train-*.json "$W"/sample-*.json 2>/dev/null)
if "$PY" -c "import matplotlib" 2>/dev/null && [ -n "$results" ]; then
  # shellcheck disable=SC2086 # file names made here: no spaces
  timeout 30 "$PY" plot/bench.py --out "$W" $results || echo "plots failed"
else
  echo "no plots (matplotlib missing or no rows)"
fi

echo
echo "== stages"
echo "| stage | budget s | used s | result |"
echo "|---|--:|--:|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "== the README's tables (paste as they are; also in tables.md)"
echo
tables
cat "$W/tables.md" 2>/dev/null || echo "(no train or sample rows)"
echo
echo "== done in $(($(date +%s) - start)) s: status $status; everything is in $W${OUT:+ (and $OUT/gpu-check.tar.gz)}"
ls -l "$W"
exit $status
