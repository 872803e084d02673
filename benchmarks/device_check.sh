#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA kernels for the device (sm_90 on an H200),
# check them against the CPU kernels before any timing, run the CUDA tests, run
# compute-sanitizer (memcheck, racecheck) on a small run, time the kernels against the copy
# bandwidth and the vectorized PyTorch baseline, and print a readable table LAST.
#
#     OUT=/some/folder bash benchmarks/device_check.sh            # on the GPU machine
#     OUT=/tmp/dc bash benchmarks/device_check.sh --dry-run       # anywhere: checks the script
#
# Every step runs under its own time limit even when an earlier one failed; the limits add
# up to 570 s (under the 600 s a command may run on the GPU machine, with room for the
# machine's own start). The exit status is non-zero when any step failed. Logs and CSVs go
# to $OUT (default ./device_check_out). --dry-run uses the emdpo_core installed in the
# current Python (no build), runs the kernel script on the CPU kernels at tiny sizes and
# skips what needs a device, so a first GPU run does not fail on a typo.
set -u -o pipefail
export PYTHONUNBUFFERED=1

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARCH="${EMDPO_CUDA_ARCHITECTURES:-90}"
# Step limits in seconds (sum 570).
T_INFO=15 T_BUILD=120 T_TESTS=150 T_KERNELS=90 T_SANITIZER=30 T_HF=50 T_PREFIX=40 T_DIST=45
STATUS=0
declare -a SUMMARY=()
note() { SUMMARY+=("$(printf '%-10s %s' "$1" "$2")"); }
step() { echo; echo "==== $* ($(date -u +%H:%M:%S))"; }
# Run a step under a limit, log to $OUT/NAME.log; returns the command's status (124: timeout).
run_step() {
  local name=$1 limit=$2
  shift 2
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  return $rc
}
outcome() {  # outcome NAME RC [text for success]
  if [ "$2" -eq 0 ]; then note "$1" "${3:-ok}"
  elif [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then note "$1" "TIMEOUT (see $1.log)"; STATUS=1
  else note "$1" "FAILED rc=$2 (see $1.log)"; STATUS=1; fi
}

# nvcc may live outside PATH on a fresh machine.
if ! command -v nvcc > /dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

step "device"
GPU="cpu (dry run)"
if [ "$DRY" -eq 0 ]; then
  timeout "$T_INFO" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
  GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1 | tee "$OUT/torch.txt"
{ command -v nvcc && nvcc --version | tail -n 2; } > "$OUT/nvcc.txt" 2>&1
note device "${GPU:-unknown (nvidia-smi failed)}"

step "build (EMDPO_WITH_CUDA=ON, architectures $ARCH)"
if [ "$DRY" -eq 0 ]; then
  START=$SECONDS
  (cd "$REPO" && export EMDPO_WITH_CUDA=ON EMDPO_CUDA_ARCHITECTURES="$ARCH" &&
    run_step build "$T_BUILD" "$PY" -m pip install --no-build-isolation --no-deps -q .)
  RC=$?
  if [ "$RC" -ne 0 ] && grep -q "externally-managed-environment" "$OUT/build.log"; then
    (cd "$REPO" && export EMDPO_WITH_CUDA=ON EMDPO_CUDA_ARCHITECTURES="$ARCH" &&
      run_step build "$T_BUILD" "$PY" -m pip install --no-build-isolation --no-deps -q \
      --break-system-packages .)
    RC=$?
  fi
  outcome build "$RC" "ok in $((SECONDS - START)) s"
fi
# Import from outside the source tree: the checkout's emdpo_core has no compiled module.
INFO="$(cd /tmp && "$PY" -c "import emdpo_core as ec; print(ec.build_info())" 2>&1)"
echo "$INFO" | tee "$OUT/build_info.txt"
if [ "$DRY" -eq 0 ] && ! echo "$INFO" | grep -q "'cuda': True"; then
  note build_info "NO CUDA in build_info: $INFO"; STATUS=1
fi

step "kernels: correctness vs the CPU kernels, then timings"
DRYFLAG=()
[ "$DRY" -eq 1 ] && DRYFLAG=(--dry-run)
(cd /tmp && run_step kernels "$T_KERNELS" "$PY" "$REPO/benchmarks/device_kernels.py" \
  --out "$OUT" "${DRYFLAG[@]}")
outcome kernels $? "ok (table below)"

step "tests (every CUDA test, the CUDA-only file and the kernel math; slow tests skipped)"
# -k cuda selects by keyword over the whole tests/ folder: every test marked cuda (the "cuda"
# entry of the one devices list in tests/conftest.py, in whichever file), every test of a
# file named for CUDA (test_cuda.py: what only CUDA has and the build's own checks;
# test_cuda_math.py: the kernels' math on the host) and every test named for it. The CPU
# entries are not rerun here. The float64 references run on the host, so four workers when
# pytest-xdist is installed.
XDIST=()
"$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n 4)
(cd /tmp && run_step tests "$T_TESTS" "$PY" -m pytest "$REPO/tests" -k cuda -m "not slow" -q -rs \
  "${XDIST[@]}" -p no:cacheprovider --rootdir "$REPO")
RC=$?
LINE="$(grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -n 1 | sed -E 's/=+//g; s/^ +| +$//g')"
outcome tests "$RC" "$LINE"
if [ "$DRY" -eq 0 ] && grep -qE "SKIPPED.*(no CUDA device|without CUDA)" "$OUT/tests.log"; then
  note tests "GPU TESTS SKIPPED on the GPU machine (see tests.log)"; STATUS=1
fi

step "compute-sanitizer memcheck and racecheck (small run)"
if [ "$DRY" -eq 1 ] || ! command -v compute-sanitizer > /dev/null 2>&1; then
  note sanitizer "skipped ($([ "$DRY" -eq 1 ] && echo dry run || echo no compute-sanitizer))"
  [ "$DRY" -eq 1 ] && (cd /tmp && "$PY" "$REPO/benchmarks/device_sanitize.py" --dry-run \
    > "$OUT/sanitize_dry.log" 2>&1) && note sanitize.py "dry run ok"
else
  for TOOL in memcheck racecheck; do
    (cd /tmp && run_step "sanitizer_$TOOL" "$T_SANITIZER" compute-sanitizer --tool "$TOOL" \
      --error-exitcode 3 "$PY" "$REPO/benchmarks/device_sanitize.py")
    RC=$?
    ERRS="$(grep -oE "ERROR SUMMARY: [0-9]+ error" "$OUT/sanitizer_$TOOL.log" | tail -n 1)"
    outcome "$TOOL" "$RC" "${ERRS:-ok}"
  done
fi

# ---- hook: the LM trainer's bf16 benchmark (EMDPOTrainer). Runs when the file exists and
# the hf extra is installed; its own limit keeps the total under the budget.
step "hook: benchmarks/bench_hf_trainer.py --device cuda --dtype bf16"
if [ "$DRY" -eq 1 ] || [ ! -f "$REPO/benchmarks/bench_hf_trainer.py" ]; then
  note hf_trainer "skipped ($([ "$DRY" -eq 1 ] && echo dry run || echo not in this checkout))"
elif ! (cd /tmp && "$PY" -c "import transformers, peft, tokenizers, accelerate" > /dev/null 2>&1); then
  note hf_trainer "skipped: transformers/peft/tokenizers/accelerate not installed (pip install '.[hf]')"
else
  (cd /tmp && run_step hf_trainer "$T_HF" "$PY" "$REPO/benchmarks/bench_hf_trainer.py" \
    --device cuda --dtype bf16 --output "$OUT/bench_hf_trainer.csv")
  RC=$?
  outcome hf_trainer "$RC" "ok -> bench_hf_trainer.csv; $(grep -E "library overhead" \
    "$OUT/hf_trainer.log" 2>/dev/null | sed -E 's/ +/ /g' | tr '\n' ';')"
fi

# ---- step of the Hugging Face layer (emdpo_core.hf): prefix sharing on CUDA. Padded vs
# prefix-shared sequence log-probabilities of ranked lists (bf16, a 1024-hidden, 8-layer
# random Llama), m = 2, 4 and prompt:response 1:1, 4:1; needs transformers.
step "benchmarks/bench_prefix_sharing.py --device cuda --quick"
if [ "$DRY" -eq 1 ] || [ ! -f "$REPO/benchmarks/bench_prefix_sharing.py" ]; then
  note prefix "skipped ($([ "$DRY" -eq 1 ] && echo dry run || echo not in this checkout))"
elif ! (cd /tmp && "$PY" -c "import transformers" > /dev/null 2>&1); then
  note prefix "skipped: transformers is not installed (pip install .[hf])"
else
  (cd /tmp && run_step prefix_sharing "$T_PREFIX" "$PY" "$REPO/benchmarks/bench_prefix_sharing.py" \
    --device cuda --quick --output "$OUT/bench_prefix_sharing_cuda.csv")
  outcome prefix $? "ok -> bench_prefix_sharing_cuda.csv"
fi

# ---- step of the distributed EM (emdpo_core.distributed): NCCL collectives on CUDA buffers,
# a group of one rank on one GPU (benchmarks/device_check_distributed.py; --cpu tries it on gloo).
step "benchmarks/device_check_distributed.py (NCCL, one rank)"
if [ "$DRY" -eq 1 ] || [ ! -f "$REPO/benchmarks/device_check_distributed.py" ]; then
  note distributed "skipped ($([ "$DRY" -eq 1 ] && echo dry run || echo not in this checkout))"
else
  (cd /tmp && run_step distributed "$T_DIST" "$PY" "$REPO/benchmarks/device_check_distributed.py")
  outcome distributed $? "ok (see distributed.log)"
fi

echo
echo "======================== device_check summary ========================"
{
  for LINE in "${SUMMARY[@]}"; do echo "$LINE"; done
  echo
  if [ -s "$OUT/kernels_table.txt" ]; then cat "$OUT/kernels_table.txt"
  else echo "(no kernel table: see kernels.log)"; fi
  if [ -s "$OUT/prefix_sharing.log" ]; then
    echo; grep -E "^(mode|fwd)" "$OUT/prefix_sharing.log"
  fi
  echo
  echo "status: $([ "$STATUS" -eq 0 ] && echo ok || echo FAILED)  (logs in $OUT)"
} | tee "$OUT/summary.txt"
exit "$STATUS"
