"""The CUDA kernels' per-record math (csrc/cuda/record2.cuh) on the CPU.

record2.cuh is written for both compilers: under nvcc's device pass it uses the hardware's
exp2/log2/reciprocal approximations, elsewhere the libm functions. Its formulas (base-2
rewards, the register short-list paths with their compile-time and padded variants, the
long-list loops) are compiled here with the host C++ compiler into a small driver and
checked against the float64 reference on fresh random records, so the logic of every path
the GPU runs is tested on any machine. What only a GPU can show (the approximations'
rounding, the kernels' orchestration) is covered by the "cuda" entry of the devices list
(tests/conftest.py DEVICES; test_kernels.py, test_torch.py, ...), tests/test_cuda.py and
benchmarks/device_check.sh on a device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from emdpo_core.ops import _reference as reference

from conftest import TOL

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "cuda/record2.cuh"

using namespace emdpo::base2;

// Reads records "m L beta coef p_0..p_{m-1} ref_0..ref_{m-1}" from stdin, writes per record:
// the path tag, ll, finite, then the m gradient values g_j = coef * beta * d ll / d r_j.
template <typename A, int MM, bool EXACT>
void run_short(const std::vector<A>& p, const std::vector<A>& ref, int m, int L, A beta, A coef) {
  const A c = A(beta * kLog2e);
  A rf[MM], r[MM], g[MM];
  for (int j = 0; j < m; ++j) rf[j] = ref[j];
  bool finite = true;
  load_rewards<MM, EXACT>(p.data(), rf, m, c, r, finite);
  const A ll = short_loglik<MM, EXACT>(r, m, L);
  const A llg = short_loglik_grad<MM, EXACT>(r, m, L, coef * beta, g);
  std::printf("short%d%s %.17g %.17g %d", MM, EXACT ? "x" : "p", double(ll), double(llg), int(finite));
  for (int j = 0; j < m; ++j) std::printf(" %.17g", double(g[j]));
  std::printf("\n");
}

template <typename A>
void run_long(const std::vector<A>& p, const std::vector<A>& ref, int m, int L, A beta, A coef) {
  const A c = A(beta * kLog2e);
  std::vector<A> g(m);
  bool f1 = true, f2 = true;
  const A ll = long_loglik<A>(p.data(), ref.data(), m, L, c, f1);
  const A llg = long_loglik_grad<A>(p.data(), ref.data(), m, L, c, coef * beta, g.data(), f2);
  std::printf("long %.17g %.17g %d", double(ll), double(llg), int(f1 && f2));
  for (int j = 0; j < m; ++j) std::printf(" %.17g", double(g[j]));
  std::printf("\n");
}

template <typename A>
int main_t() {
  int m, L;
  double beta, coef;
  while (std::scanf("%d %d %lf %lf", &m, &L, &beta, &coef) == 4) {
    std::vector<A> p(m), ref(m);
    for (auto& x : p) { double v; if (std::scanf("%lf", &v) != 1) return 1; x = A(v); }
    for (auto& x : ref) { double v; if (std::scanf("%lf", &v) != 1) return 1; x = A(v); }
    const A b = A(beta), cf = A(coef);
    switch (m) {
      case 2: run_short<A, 2, true>(p, ref, m, L, b, cf); break;
      case 3: run_short<A, 3, true>(p, ref, m, L, b, cf); break;
      case 4: run_short<A, 4, true>(p, ref, m, L, b, cf); break;
      default: break;
    }
    if (m <= kShortMax) run_short<A, kShortMax, false>(p, ref, m, L, b, cf);
    if (m == kShortMax) run_short<A, kShortMax, true>(p, ref, m, L, b, cf);
    run_long<A>(p, ref, m, L, b, cf);
    std::printf("end\n");
  }
  return 0;
}

int main(int argc, char** argv) {
  return (argc > 1 && argv[1][0] == 'f') ? main_t<float>() : main_t<double>();
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler (g++, c++ or clang++) on PATH")
    d = tmp_path_factory.mktemp("record2")
    src = d / "driver.cpp"
    src.write_text(DRIVER)
    exe = d / "driver"
    subprocess.run([CXX, "-O2", "-std=c++17", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


def _run(exe, dtype, records):
    lines = []
    for p, ref, L, beta, coef in records:
        vals = " ".join(repr(float(v)) for v in np.concatenate([p, ref]))
        lines.append(f"{len(p)} {L} {beta!r} {coef!r} {vals}")
    out = subprocess.run([str(exe), "f" if dtype == np.float32 else "d"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True).stdout
    results, cur = [], {}
    for line in out.splitlines():
        if line == "end":
            results.append(cur)
            cur = {}
            continue
        tag, ll, llg, finite, *g = line.split()
        cur[tag] = (float(ll), float(llg), finite == "1", np.array(g, dtype=np.float64))
    return results


def _random_records(rng, n, max_len, dtype, scale=3.0, center=-40.0):
    recs = []
    for _ in range(n):
        m = int(rng.integers(2, max_len + 1))
        L = int(rng.integers(1, m))
        p = rng.normal(center, scale, size=m).astype(dtype)
        ref = rng.normal(center, scale, size=m).astype(dtype)
        beta = float(rng.choice([0.1, 0.5, 1.0, 10.0]))
        coef = float(rng.normal())
        recs.append((p, ref, L, beta, coef))
    return recs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_path_matches_the_reference(driver, dtype):
    """Each path (exact lengths 2/3/4/8, padded <= 8, long loop) against the float64
    reference: ll and the gradient coef * beta * d ll / d r."""
    rng = np.random.default_rng(1601)
    recs = _random_records(rng, 300, 12, dtype)
    tol = TOL[dtype]
    seen = set()
    for (p, ref, L, beta, coef), res in zip(recs, _run(driver, dtype, recs)):
        # The reference sees the same rounded inputs, in float64.
        r = beta * (p.astype(np.float64) - ref.astype(np.float64))
        want_ll = reference.record_loglik(r, L)
        want_g = coef * beta * reference.record_loglik_grad_rewards(r, L)
        scale = max(1.0, abs(want_ll))
        for tag, (ll, llg, finite, g) in res.items():
            seen.add(tag)
            assert finite, (tag, len(p), L)
            np.testing.assert_allclose(ll, want_ll, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       err_msg=f"{tag} m={len(p)} L={L}")
            np.testing.assert_allclose(llg, want_ll, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       err_msg=f"{tag} m={len(p)} L={L} (grad pass)")
            np.testing.assert_allclose(g, want_g, rtol=tol["rtol"],
                                       atol=tol["atol"] * max(1.0, abs(coef * beta)),
                                       err_msg=f"{tag} m={len(p)} L={L}")
    assert {"short2x", "short3x", "short4x", "short8x", "short8p", "long"} <= seen


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extreme_rewards_and_long_lists(driver, dtype):
    """Log-probs of -1e4 with beta 10 (rewards of +-1e3 and beyond), lists of 200: every
    exponent stays <= 0, no overflow, the long loop's product flush included."""
    rng = np.random.default_rng(1602)
    recs = []
    for _ in range(40):
        m = int(rng.choice([3, 4, 7, 8, 200]))
        L = int(rng.integers(1, m))
        p = rng.normal(-1e4, 50.0, size=m).astype(dtype)
        ref = rng.normal(-1e4, 50.0, size=m).astype(dtype)
        recs.append((p, ref, L, 10.0, 1.0))
    tol = TOL[dtype]
    for (p, ref, L, beta, coef), res in zip(recs, _run(driver, dtype, recs)):
        r = beta * (p.astype(np.float64) - ref.astype(np.float64))
        want_ll = reference.record_loglik(r, L)
        want_g = beta * reference.record_loglik_grad_rewards(r, L)
        for tag, (ll, _, finite, g) in res.items():
            assert finite and np.isfinite(ll) and np.all(np.isfinite(g)), tag
            # float32 rewards of ~1e3 carry an absolute rounding of ~1e-4 each; the
            # reference uses the rounded inputs, so only the kernel's own arithmetic counts.
            np.testing.assert_allclose(ll, want_ll, rtol=tol["rtol"],
                                       atol=tol["atol"] * max(1.0, abs(want_ll)),
                                       err_msg=f"{tag} m={len(p)} L={L}")
            np.testing.assert_allclose(g, want_g, rtol=tol["rtol"], atol=tol["atol"] * beta,
                                       err_msg=f"{tag} m={len(p)} L={L}")


def test_non_finite_rewards_are_flagged(driver):
    """A NaN or infinite log-prob in any slot clears the finite flag on every path."""
    rng = np.random.default_rng(1603)
    recs = []
    for bad in (np.nan, np.inf, -np.inf):
        for m in (2, 3, 4, 6, 8, 11):
            p = rng.normal(-40, 3, size=m)
            ref = rng.normal(-40, 3, size=m)
            p[int(rng.integers(0, m))] = bad
            recs.append((p, ref, m - 1, 0.5, 1.0))
    for res in _run(driver, np.float64, recs):
        assert res and all(not finite for (_, _, finite, _) in res.values()), res.keys()
