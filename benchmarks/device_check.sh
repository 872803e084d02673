#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a GPU machine: build with CUDA, run the CUDA tests,
# time the kernels (and benchmarks/bench_kernels.py when present), and print a short summary
# table last. Run from the repository root:
#
#     OUT=/some/folder bash benchmarks/device_check.sh
#
# Logs and CSVs go to $OUT (default: ./device_check_out). Every step runs even when an
# earlier one failed, under its own time limit (about 6 minutes in all); the exit status is
# non-zero when any step failed.
set -u -o pipefail
export PYTHONUNBUFFERED=1

PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
REPO="$(pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
STATUS=0

note() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo; echo "==== $* ($(date +%H:%M:%S))"; }

# nvcc may live outside PATH on a fresh machine.
if ! command -v nvcc > /dev/null 2>&1 && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
nvidia-smi 2>&1 | head -n 15 | tee -a "$OUT/nvidia_smi.txt"
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
{ command -v nvcc && nvcc --version | tail -n 2; } 2>&1 | tee "$OUT/nvcc.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 \
  | tee "$OUT/torch.txt"

step "build (EMDPO_WITH_CUDA=ON)"
BUILD_START=$SECONDS
build() {
  EMDPO_WITH_CUDA=ON timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -q "$@" . \
    > "$OUT/build.log" 2>&1
}
build
BUILD_RC=$?
if [ "$BUILD_RC" -ne 0 ] && grep -q "externally-managed-environment" "$OUT/build.log"; then
  echo "system Python is marked externally managed; retrying with --break-system-packages"
  build --break-system-packages
  BUILD_RC=$?
fi
tail -n 20 "$OUT/build.log"
BUILD_S=$((SECONDS - BUILD_START))
# Import from outside the source tree, or the checkout's emdpo_core (with no compiled
# module) would shadow the installed package.
BUILD_INFO="$(cd /tmp && "$PY" -c "import emdpo_core as ec; print(ec.build_info())" 2>&1)"
echo "$BUILD_INFO" | tee "$OUT/build_info.txt"
if [ "$BUILD_RC" -ne 0 ] || ! echo "$BUILD_INFO" | grep -q "'cuda': True"; then
  STATUS=1
  BUILD_LINE="FAILED (rc=$BUILD_RC, see build.log / build_info.txt)"
else
  BUILD_LINE="ok in ${BUILD_S}s"
fi

step "tests"
TESTS=("$REPO/tests/test_cuda.py")
[ -f "$REPO/tests/test_torch.py" ] && TESTS+=("$REPO/tests/test_torch.py")
(cd /tmp && timeout 240 "$PY" -m pytest "${TESTS[@]}" -q -rs -p no:cacheprovider 2>&1) \
  | tee "$OUT/tests.log"
TEST_RC=$?
TEST_LINE="$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran" "$OUT/tests.log" \
  | tail -n 1 | sed -E 's/=+//g; s/^ +| +$//g')"
[ -z "$TEST_LINE" ] && TEST_LINE="no summary line (rc=$TEST_RC; timed out or crashed?)"
[ "$TEST_RC" -ne 0 ] && STATUS=1
# On the GPU machine the CUDA tests must run, not skip.
if grep -qE "SKIPPED.*(no CUDA device|without CUDA|torch is not installed)" "$OUT/tests.log"; then
  TEST_LINE="$TEST_LINE  (GPU TESTS SKIPPED, see tests.log)"
  STATUS=1
fi

step "kernel timings (CUDA events, kernels only) and copy bandwidth"
COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
(cd /tmp && timeout 150 "$PY" - "$OUT" "$GPU_NAME" "$COMMIT" <<'PYEOF' 2>&1) | tee "$OUT/kernels.log"
import csv, sys
import numpy as np
import torch
import emdpo_core as ec
from emdpo_core import _core

out_dir, gpu, commit = sys.argv[1], sys.argv[2], sys.argv[3]
dev = torch.device("cuda", 0)
stream = torch.cuda.current_stream(dev).cuda_stream


def timed(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return np.percentile(times, [20, 50, 80])


# Device-to-device copy: bytes read plus bytes written per second.
n_copy = 1 << 28  # 1 GiB of float32
src = torch.rand(n_copy, device=dev)
dst = torch.empty_like(src)
copy_t = timed(lambda: dst.copy_(src))
copy_bw = 2 * src.numel() * 4 / copy_t[1]
del src, dst
print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (p50 of 20 copies of 1 GiB)")

# The issue's benchmark shape, scaled: N lists of 4, K = 8 types, float32.
N, m, K = 10_000_000, 4, 8
M = N * m
torch.manual_seed(0)
base = torch.randn(M, device=dev)
policy = (base + 0.3 * torch.randn(K, M, device=dev)).contiguous()
ref = (base + 0.3 * torch.randn(M, device=dev)).contiguous()
del base
offsets = torch.arange(0, M + 1, m, device=dev, dtype=torch.int64)
beta = 0.5
first_bad = torch.full((1,), -1, dtype=torch.int64, device=dev)
fb = first_bad.data_ptr()
f4, i8 = 4, 8

# Correctness first: a slice against the CPU kernels (float64 on the same float32 values).
n_chk = 200_000
ll = ec.listwise_loglik(policy, ref, offsets, beta=beta)
want = ec.listwise_loglik(policy[:, : n_chk * m].double().cpu().numpy(),
                          ref[: n_chk * m].double().cpu().numpy(),
                          offsets[: n_chk + 1].cpu().numpy(), beta=beta)
rel = np.linalg.norm(ll[:n_chk].double().cpu().numpy() - want) / np.linalg.norm(want)
print(f"listwise_loglik vs CPU float64 on {n_chk} records: relative error {rel:.2e}")
assert rel < 1e-5, rel
del ll

rows = []


def record(name, H, t, nbytes, extra=""):
    bw = nbytes / t[1]
    rows.append(dict(kernel=name, N=N, m=m, K=K, H=H, p20_ms=t[0] * 1e3, p50_ms=t[1] * 1e3,
                     p80_ms=t[2] * 1e3, GB_s=bw / 1e9, frac_copy=bw / copy_bw,
                     ns_per_record_type=t[1] * 1e9 / (N * K), note=extra))
    print(f"{name:28s} H={H:<9d} p50 {t[1] * 1e3:8.3f} ms  {bw / 1e9:7.0f} GB/s  "
          f"{100 * bw / copy_bw:5.1f}% of copy  {extra}")


read_in = K * M * f4 + M * f4 + (N + 1) * i8  # policy, ref, offsets

out = torch.empty((N, K), dtype=torch.float32, device=dev)
t = timed(lambda: _core.cuda_listwise_loglik(
    "float32", policy.data_ptr(), ref.data_ptr(), offsets.data_ptr(), 0, N, M, K, beta,
    out.data_ptr(), fb, stream))
record("listwise_loglik", 0, t, read_in + N * K * f4)
del out

log_w = torch.full((K,), -float(np.log(K)), dtype=torch.float64, device=dev)
loglik = torch.empty(1, dtype=torch.float64, device=dev)
for H in (1, 50_000, N):
    ao = torch.div(torch.arange(H + 1, device=dev) * N, H, rounding_mode="floor").to(torch.int64)
    resp = torch.empty((H, K), dtype=torch.float32, device=dev)
    annot = torch.empty_like(resp)
    ws_bytes = _core.cuda_e_step_workspace_bytes(N, H, K)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)

    def run_e_step():
        _core.cuda_e_step("float32", policy.data_ptr(), ref.data_ptr(), offsets.data_ptr(), 0, 0,
                          ao.data_ptr(), log_w.data_ptr(), N, M, K, H, beta, resp.data_ptr(),
                          annot.data_ptr(), loglik.data_ptr(), 0, fb, ws.data_ptr(), ws_bytes,
                          stream)

    t = timed(run_e_step)
    first = (resp.clone(), loglik.clone())
    run_e_step()
    same = torch.equal(first[0], resp) and torch.equal(first[1], loglik)
    record("e_step", H, t, read_in + (H + 1) * i8 + 2 * H * K * f4,
           f"bitwise repeat: {'yes' if same else 'NO'}; workspace {ws_bytes / 2**20:.1f} MiB")
    del ao, resp, annot, ws

grad = torch.empty_like(policy)
weights = torch.rand(K, N, device=dev)
scale = torch.ones(K, dtype=torch.float64, device=dev)
loss = torch.empty((), dtype=torch.float64, device=dev)
ws_bytes = _core.cuda_loss_workspace_bytes(N, K)
ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
t = timed(lambda: _core.cuda_listwise_dpo_loss_and_grad(
    "float32", policy.data_ptr(), ref.data_ptr(), offsets.data_ptr(), 0, weights.data_ptr(),
    scale.data_ptr(), N, M, K, beta, loss.data_ptr(), grad.data_ptr(), 0, fb, ws.data_ptr(),
    ws_bytes, stream))
record("listwise_dpo_loss_and_grad", 0, t, read_in + K * N * f4 + K * M * f4)

# The public API on CUDA tensors (validation cached, one host sync for the error flag).
t = timed(lambda: ec.listwise_dpo_loss_and_grad(policy, ref, offsets, weights, beta=beta),
          reps=10)
record("api: loss_and_grad", 0, t, read_in + K * N * f4 + K * M * f4, "incl. Python + sync")
ao = torch.tensor([0, N], device=dev)
t = timed(lambda: ec.e_step(policy, ref, offsets, ao, np.full(K, -np.log(K)), beta=beta),
          reps=10)
record("api: e_step", 1, t, read_in + 2 * i8 + 2 * K * f4, "incl. Python + sync")
assert int(first_bad.item()) == -1

with open(f"{out_dir}/kernels.csv", "w", newline="") as f:
    fields = ["device", "torch", "cuda", "emdpo_core", "commit", "copy_GB_s"] + list(rows[0])
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow(dict(device=gpu, torch=torch.__version__, cuda=torch.version.cuda,
                        emdpo_core=ec.__version__, commit=commit,
                        copy_GB_s=f"{copy_bw / 1e9:.0f}", **r))
with open(f"{out_dir}/kernels_table.txt", "w") as f:
    f.write(f"copy bandwidth (d2d, read+write) {copy_bw / 1e9:.0f} GB/s; N={N} lists of {m}, "
            f"K={K}, float32\n")
    f.write(f"{'kernel':28s} {'H':>9s} {'p50 ms':>9s} {'GB/s':>7s} {'%copy':>6s} {'ns/(rec*type)':>13s}\n")
    for r in rows:
        f.write(f"{r['kernel']:28s} {r['H']:9d} {r['p50_ms']:9.3f} {r['GB_s']:7.0f} "
                f"{100 * r['frac_copy']:5.1f}% {r['ns_per_record_type']:13.4f}\n")
PYEOF
KERN_RC=$?
[ "$KERN_RC" -ne 0 ] && STATUS=1

step "benchmarks/bench_kernels.py --device cuda"
if [ -f "$REPO/benchmarks/bench_kernels.py" ]; then
  timeout 150 "$PY" "$REPO/benchmarks/bench_kernels.py" --device cuda --n 10000000 \
    --output "$OUT/bench_cuda.csv" 2>&1 | tee "$OUT/bench_kernels.log"
  BENCH_RC=$?
  if [ "$BENCH_RC" -eq 0 ]; then BENCH_LINE="ok -> bench_cuda.csv"; else
    BENCH_LINE="FAILED (rc=$BENCH_RC, see bench_kernels.log)"; STATUS=1; fi
else
  BENCH_LINE="skipped: benchmarks/bench_kernels.py not in this checkout"
  echo "$BENCH_LINE"
fi

step "benchmarks/bench_hf_trainer.py --device cuda --dtype bf16 (EMDPOTrainer)"
if [ ! -f "$REPO/benchmarks/bench_hf_trainer.py" ]; then
  HF_LINE="skipped: benchmarks/bench_hf_trainer.py not in this checkout"
elif ! (cd /tmp && "$PY" -c "import transformers, peft, tokenizers, accelerate" > /dev/null 2>&1); then
  HF_LINE="skipped: transformers/peft/tokenizers/accelerate not installed (pip install '.[hf]')"
else
  # From /tmp, so that the installed (CUDA) build is imported rather than the checkout.
  (cd /tmp && timeout 300 "$PY" "$REPO/benchmarks/bench_hf_trainer.py" --device cuda --dtype bf16 \
    --output "$OUT/bench_hf_trainer.csv" 2>&1) | tee "$OUT/bench_hf_trainer.log"
  HF_RC=$?
  if [ "$HF_RC" -eq 0 ]; then
    HF_LINE="ok -> bench_hf_trainer.csv; $(grep -E "library overhead" "$OUT/bench_hf_trainer.log" \
      | sed -E 's/ +/ /g' | tr '\n' ';')"
  else
    HF_LINE="FAILED (rc=$HF_RC, see bench_hf_trainer.log)"; STATUS=1
  fi
fi
echo "$HF_LINE"

# ---- step added by the Hugging Face layer (emdpo_core.hf): prefix sharing on CUDA --------
# Padded vs prefix-shared sequence log-probabilities of ranked lists (bf16, a 1024-hidden,
# 8-layer random Llama), m = 2, 4 and prompt:response 1:1, 4:1; needs transformers.
step "benchmarks/bench_prefix_sharing.py --device cuda --quick"
if ! (cd /tmp && "$PY" -c "import transformers" > /dev/null 2>&1); then
  PREFIX_LINE="skipped: transformers is not installed (pip install .[hf])"
  echo "$PREFIX_LINE"
elif [ -f "$REPO/benchmarks/bench_prefix_sharing.py" ]; then
  (cd /tmp && timeout 240 "$PY" "$REPO/benchmarks/bench_prefix_sharing.py" --device cuda \
    --quick --output "$OUT/bench_prefix_sharing_cuda.csv" 2>&1) | tee "$OUT/bench_prefix_sharing.log"
  PREFIX_RC=$?
  if [ "$PREFIX_RC" -eq 0 ]; then PREFIX_LINE="ok -> bench_prefix_sharing_cuda.csv"; else
    PREFIX_LINE="FAILED (rc=$PREFIX_RC, see bench_prefix_sharing.log)"; STATUS=1; fi
else
  PREFIX_LINE="skipped: benchmarks/bench_prefix_sharing.py not in this checkout"
  echo "$PREFIX_LINE"
fi
# ---- end of the prefix-sharing step ---------------------------------------------------------

echo
echo "==================== device_check summary ===================="
note "device:  ${GPU_NAME:-unknown (nvidia-smi failed)}"
note "build:   $BUILD_LINE"
note "tests:   $TEST_LINE  [${TESTS[*]##*/}]"
if [ -s "$OUT/kernels_table.txt" ]; then
  tee -a "$SUMMARY" < "$OUT/kernels_table.txt"
else
  note "kernels: FAILED (rc=$KERN_RC, see kernels.log)"
fi
note "bench:   $BENCH_LINE"
note "hf:      $HF_LINE"
if [ -s "$OUT/bench_cuda.csv" ]; then
  note "bench_cuda.csv (last rows):"
  tail -n 6 "$OUT/bench_cuda.csv" | cut -c1-160 | tee -a "$SUMMARY"
fi
note "prefix sharing (hf): $PREFIX_LINE"
if [ -s "$OUT/bench_prefix_sharing.log" ]; then
  grep -E "^(mode|fwd)" "$OUT/bench_prefix_sharing.log" | tee -a "$SUMMARY"
fi
note "status:  $([ "$STATUS" -eq 0 ] && echo ok || echo FAILED)  (logs in $OUT)"
exit "$STATUS"
