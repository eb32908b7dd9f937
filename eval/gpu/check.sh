#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`), for one H200 with torch preinstalled, no network, under 8 minutes:
#
#   setup         carried wheels (.whl/, made by eval/gpu/fetch_wheels.sh) -> /tmp/site on PYTHONPATH
#   env           GPU, driver, python / torch / transformers versions (vtprune's floor: transformers 5.23)
#   build         JIT-build csrc/ with its CUDA kernels (VTPRUNE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0)
#   kernel-tests  pytest tests/functional/test_kernels.py (CPU parity + the CUDA-vs-CPU test)
#   kernels-cuda  eval/gpu/kernels_cuda.py: CUDA ops vs CPU ops vs torch on random inputs
#   kernels-nvrtc eval/gpu/kernels_cuda.py --impl nvrtc: NVRTC kernels (no nvcc) vs CPU ops, CUDA ops and torch,
#                 their torch.ops registration, and the timing of all three back ends
#   contract      eval/gpu/contract.py: keep-all == unpatched and batch == rows alone, SDPA / FA2, bf16
#   prefill-7b    eval/gpu/prefill_7b.py: LLaVA-1.5-7B-width prefill, every method at 64/128/192 vs unpatched
#   video         eval/bench/overhead.py --video --device cuda: the pure video selection functions (evs, vidcom2,
#                 fastvid, frame_budgets, dyseg, dpc_knn) at 16 / 32 frames x 100 / 400 tokens vs one 7B layer
#   bench         eval/bench/native_ops.py --device cuda: native CUDA ops vs pure torch on the GPU
#
# Each stage runs under its own `timeout` (and a total budget, GPU_CHECK_BUDGET_S, default 450 s); a failed
# stage never stops the next. One summary line per stage at the end. Results: eval/results/gpu/ (override:
# GPU_CHECK_RESULTS), copied to $OUT when set (the device tool's folder: at most 8 files come back).
#
#   bash eval/gpu/check.sh             on the GPU machine (python3 = the one with CUDA torch; PYTHON overrides)
#   bash eval/gpu/check.sh --dry-run   print the plan, run nothing
#   bash eval/gpu/check.sh --smoke     CPU only: each script's --smoke mode (what tests/tools/test_gpu_check.py runs)
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: bash eval/gpu/check.sh [--dry-run | --smoke]" >&2; exit 2 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$(pwd)
RES=${GPU_CHECK_RESULTS:-eval/results/gpu}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
PY=${PYTHON:-python3}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LOG="$RES/check.log"
if [[ $MODE != dry ]]; then
  mkdir -p "$RES"
  : >"$LOG"
  STAGE_OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
fi
SUMMARIES=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - T0)); }

# run_stage NAME MAX_S RESERVE_S CMD...: run CMD under `timeout`, at most MAX_S seconds and never into the last
# RESERVE_S seconds of the budget (kept for the stages after it); record one summary line.
run_stage() {
  local name=$1 max=$2 reserve=$3
  shift 3
  local left=$((BUDGET - $(elapsed) - reserve))
  local limit=$((max < left ? max : left))
  if [[ $MODE == dry ]]; then
    printf '%-13s limit %4ss: %s\n' "$name" "$max" "$*"
    return 0
  fi
  if ((limit < 20)); then
    SUMMARIES+=("$(printf '%-13s SKIP     0s  out of time (budget %ss)' "$name" "$BUDGET")")
    FAILED=1
    return 0
  fi
  log ""
  log "=== [$name] (limit ${limit}s, t=$(elapsed)s) $*"
  local start rc out="$STAGE_OUT/$name.out"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG" >"$out"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - start)) status line
  line=$(grep '^SUMMARY: ' "$out" | tail -n 1 | cut -c10-)
  [[ -z $line ]] && line=$(grep -v '^[[:space:]]*$' "$out" | tail -n 1 | cut -c1-200)
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT; line="killed after ${limit}s; last: $line" ;;
    *) status="FAIL($rc)" ;;
  esac
  [[ $rc != 0 ]] && FAILED=1
  SUMMARIES+=("$(printf '%-13s %-8s %4ss  %s' "$name" "$status" "$took" "$line")")
  log "=== [$name] $status in ${took}s"
  export_out
  return 0
}

# export_out [tar]: copy the reports to $OUT (the device tool's folder; at most 8 files come back: 5 reports, the
# summary, the log, and at the end one archive of the whole results folder). Called after every stage, so a run killed by
# the tool's own time limit still brings back what it had.
export_out() {
  [[ -n ${OUT:-} && $MODE != dry ]] || return 0
  mkdir -p "$OUT"
  local f n=0
  for f in summary.md check.log prefill_7b.md contract.md kernels_cuda.md kernels_nvrtc.md kernels.md; do
    [[ -f $RES/$f ]] && cp "$RES/$f" "$OUT/" && n=$((n + 1))
  done
  if [[ ${1:-} == tar ]]; then
    tar -czf "$OUT/gpu-results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")" && n=$((n + 1))
    echo "copied $n files to $OUT"
  fi
}

skip_stage() { # skip_stage NAME WHY
  [[ $MODE == dry ]] && { printf '%-13s skipped: %s\n' "$1" "$2"; return 0; }
  SUMMARIES+=("$(printf '%-13s SKIP     0s  %s' "$1" "$2")")
}

# ------------------------------------------------------------------------------------------------- setup
if [[ $MODE == gpu || $MODE == dry ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    if [[ $MODE == dry ]]; then
      echo "setup: pip install --no-index --no-deps --target /tmp/site $(ls .whl/*.whl | tr '\n' ' ')"
    else
      log "=== [setup] installing carried wheels into /tmp/site: $(ls .whl | tr '\n' ' ')"
      if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        SUMMARIES+=("$(printf '%-13s %-8s %4ss  %s' setup PASS "$(elapsed)" "wheels: $(ls .whl | tr '\n' ' ')")")
      else
        SUMMARIES+=("$(printf '%-13s %-8s %4ss  %s' setup FAIL "$(elapsed)" "pip install of .whl/*.whl failed (see check.log); using the preinstalled packages")")
        FAILED=1
      fi
    fi
  else
    [[ $MODE == dry ]] && echo "setup: no .whl/ (run eval/gpu/fetch_wheels.sh here first, and carry .whl)"
    SUMMARIES+=("$(printf '%-13s %-8s %4ss  %s' setup WARN 0 "no carried wheels in .whl/: preinstalled transformers (vtprune needs >= 5.23)")")
  fi
  export VTPRUNE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/vtprune-torch-extensions}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export VTPRUNE_NVRTC_CACHE=${VTPRUNE_NVRTC_CACHE:-/tmp/vtprune-nvrtc}
  if [[ -z ${CUDA_HOME:-} ]]; then # the toolkit root: the folder whose bin/ holds nvcc and lib64/ libcudart
    for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")"; do
      if [[ -x $d/bin/nvcc ]]; then export CUDA_HOME=$d; break; fi
    done
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT # vtprune from this checkout (after the carried wheels)

if [[ $MODE == smoke ]]; then
  DEV=(--device cpu --smoke)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # small CPU runs: one thread is steadier on a shared machine
else
  DEV=()
fi

# ------------------------------------------------------------------------------------------------- stages
if [[ $MODE == gpu ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv >>"$LOG" 2>&1
fi
REQ=()
[[ $MODE != smoke ]] && REQ=(--require-gpu)
[[ $MODE == dry ]] && echo "env: VTPRUNE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-?} MAX_JOBS=$MAX_JOBS; budget ${BUDGET}s; results in $RES/"
run_stage env 60 0 "$PY" eval/gpu/env.py "${REQ[@]}"
if [[ $MODE == gpu ]] && [[ ${SUMMARIES[-1]} != env*PASS* ]] &&
  ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "no CUDA device is visible to $PY: nothing to check here (use --smoke on a machine without a GPU)"
  printf '%s\n' "${SUMMARIES[@]}"
  exit 1
fi

run_stage build 240 0 "$PY" eval/gpu/env.py --build
BUILT=1
if [[ $MODE != dry ]] && [[ ${SUMMARIES[-1]} != build*PASS* ]]; then
  BUILT=0
  export VTPRUNE_NO_EXT=1 # no second (slow, maybe lock-blocked) build attempt in every later stage: pure torch
  log "build failed: the model stages run with VTPRUNE_NO_EXT=1 (pure-torch selection)"
fi

if [[ $MODE == smoke ]]; then
  skip_stage kernel-tests "smoke: tests/functional/test_kernels.py is part of the test suite"
elif ((BUILT)); then
  run_stage kernel-tests 120 210 "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_kernels.py
else
  skip_stage kernel-tests "the CUDA build failed"
fi

if ((BUILT)); then
  run_stage kernels-cuda 90 180 "$PY" eval/gpu/kernels_cuda.py "${DEV[@]}" --budget-s 35 --out "$RES/kernels_cuda.md"
else
  skip_stage kernels-cuda "the CUDA build failed"
fi

# NVRTC needs no nvcc: it runs whether the build passed or not (then against pure torch only)
if [[ $MODE == smoke ]]; then
  skip_stage kernels-nvrtc "smoke: needs a GPU (tests/functional/test_nvrtc.py compiles the NVRTC sources on the CPU)"
else
  run_stage kernels-nvrtc 75 170 "$PY" eval/gpu/kernels_cuda.py --impl nvrtc --budget-s 25 --out "$RES/kernels_nvrtc.md"
fi

run_stage contract 150 130 "$PY" eval/gpu/contract.py "${DEV[@]}" --out "$RES/contract.md"

if [[ $MODE == smoke ]]; then
  run_stage prefill-7b 120 0 "$PY" eval/gpu/prefill_7b.py "${DEV[@]}" --dtype float32 --out "$RES/prefill_7b.md"
else
  run_stage prefill-7b 200 85 "$PY" eval/gpu/prefill_7b.py --budget-s 70 --out "$RES/prefill_7b.md"
fi

# every registered method is in contract and prefill-7b (vtprune.list_methods); the video functions are timed here
if [[ $MODE == smoke ]]; then
  run_stage video 120 0 "$PY" eval/bench/overhead.py --video --small --frames 2,4 --frame-tokens 8 --repeats 1 \
    --out "$RES/overhead_video.md"
else
  run_stage video 60 40 "$PY" eval/bench/overhead.py --video --device cuda --frames 16,32 --frame-tokens 100,400 \
    --repeats 5 --out "$RES/overhead_video.md"
fi

if [[ $MODE == smoke ]]; then
  skip_stage bench "smoke: eval/bench/native_ops.py has no CPU smoke size"
elif ((BUILT)); then
  run_stage bench 120 0 "$PY" eval/bench/native_ops.py --device cuda --max-work 1e12 --out "$RES/kernels.md"
else
  skip_stage bench "the CUDA build failed"
fi

[[ $MODE == dry ]] && exit 0

# ------------------------------------------------------------------------------------------------- summary
TOTAL=$(elapsed)
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo
  echo "- command: \`bash eval/gpu/check.sh${1:+ $1}\` (\`make gpu-check\`), total ${TOTAL} s of a ${BUDGET} s budget"
  if git rev-parse --short HEAD >/dev/null 2>&1; then
    echo "- git: $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  fi
  if command -v nvidia-smi >/dev/null && [[ $MODE == gpu ]]; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
  fi
  echo "- results: $(cd "$RES" && ls *.md 2>/dev/null | grep -v '^summary.md$' | tr '\n' ' ')(+ .json beside each, check.log)"
  echo
  echo '```'
  printf '%s\n' "${SUMMARIES[@]}"
  echo '```'
} >"$RES/summary.md"

echo
echo "=== GPU check summary (${TOTAL}s; results in $RES/)"
printf '%s\n' "${SUMMARIES[@]}" | tee -a "$LOG"

export_out tar
rm -rf "$STAGE_OUT"
exit $FAILED
