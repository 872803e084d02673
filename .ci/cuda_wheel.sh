#!/usr/bin/env bash
# Release wheel with the CUDA kernels, built with a CUDA toolkit from the package registry:
# sm_80 and sm_90 machine code plus sm_90 PTX (newer GPUs compile it at load), the CUDA
# runtime linked statically. Then .ci/wheel_smoke.sh --cuda: repair (auditwheel), install in
# a fresh venv, smoke tests on the CPU path (this machine has no GPU), build_info lists the
# architectures.
#
#     .ci/cuda_wheel.sh                 # CUDA 13.0 toolkit from the registry
#     EMDPO_CUDA_MAJOR=12 .ci/cuda_wheel.sh
#
# CUDA 12: the registry's cu12 compiler packages (nvidia-cuda-nvcc-cu12, every release from
# 12.0 to 12.9) hold ptxas and libnvvm only, not the nvcc driver, cicc or cudafe++, so no
# CUDA 12 build can be made from the registry alone; the script says so and stops (exit 2).
# A CUDA 12 wheel needs a full CUDA 12 toolkit (NVIDIA's build images or installers) with
# CUDACXX pointing at its nvcc; CUDA 13 wheels need a driver of the CUDA 13 series (580+).
#
# Not part of .ci/run: the two-architecture build takes about 10 minutes on 2 cores (see
# benchmarks/README.md, "Wheels"). Run it before a release, or in a release job.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
MAJOR="${EMDPO_CUDA_MAJOR:-13}"
export EMDPO_CUDA_ARCHITECTURES="${EMDPO_CUDA_ARCHITECTURES:-80-real;90}"
TK_VENV="$(mktemp -d)/toolkit"
step() { echo "== $* (${SECONDS}s)"; }

step "CUDA $MAJOR toolkit from the package registry"
"$PY" -m venv "$TK_VENV"
if [ "$MAJOR" = "12" ]; then
  "$TK_VENV/bin/python" -m pip download --quiet --no-deps -d "$TK_VENV/dl" "nvidia-cuda-nvcc-cu12"
  if ! unzip -l "$TK_VENV"/dl/nvidia_cuda_nvcc_cu12-*.whl | grep -qE "bin/nvcc$"; then
    echo "nvidia-cuda-nvcc-cu12 has no nvcc driver (only ptxas and libnvvm):"
    unzip -l "$TK_VENV"/dl/nvidia_cuda_nvcc_cu12-*.whl | grep -E "bin/|nvvm/" || true
    echo "a CUDA 12 wheel needs a full CUDA 12 toolkit; set CUDACXX to its nvcc and run"
    echo ".ci/wheel_smoke.sh --cuda with EMDPO_CUDA_ARCHITECTURES=\"$EMDPO_CUDA_ARCHITECTURES\""
    exit 2
  fi
fi
"$TK_VENV/bin/python" -m pip install --quiet "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
  "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cuda-culibos==13.0.*"
TK="$("$TK_VENV/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")"
# nvcc.profile links from $TOP/lib64 and CMake's FindCUDAToolkit looks for an unversioned
# libcudart.so; the registry packages install lib/ and libcudart.so.13 only.
[ -e "$TK/lib64" ] || ln -s lib "$TK/lib64"
[ -e "$TK/lib/libcudart.so" ] || ln -s libcudart.so.13 "$TK/lib/libcudart.so"
export CUDACXX="$TK/bin/nvcc" CUDAToolkit_ROOT="$TK"
export PATH="$TK/bin:$PATH"
"$CUDACXX" --version | tail -n 2

step "wheel (EMDPO_CUDA_ARCHITECTURES=$EMDPO_CUDA_ARCHITECTURES), repair, fresh venv, smoke"
export EXPECT_CUDA_ARCHS="${EMDPO_CUDA_ARCHITECTURES//;/,}"
KEEP="${KEEP:-0}" bash "$REPO/.ci/wheel_smoke.sh" --cuda
step "cuda wheel: ok"
