// Per-record Plackett-Luce math for the CUDA kernels, in base 2.
//
// The same formulas as common/listwise.h (docs/math.md), with the rewards measured in bits:
//     r2_j = beta * log2(e) * (logpi(y_j) - logpi_ref(y_j)),   LSE2_t = log2 sum_{s>=t} 2^r2_s,
//     ll = ln(2) * sum_{t<L} (r2_t - LSE2_t).
// Base 2 lets float code use the hardware's exp2/log2/reciprocal approximations directly
// (ex2.approx, lg2.approx, rcp.approx: one MUFU instruction each, relative error about
// 2^-22), where expf/logf cost 10-30 instructions. The ratios the gradient is built from,
// a_t = 2^(r2_t - mx_t), b_t = 2^(mx_{t+1} - mx_t) and the running sums z_t, are the same
// numbers in either base, so the gradient formulas of record_loglik_grad_short carry over
// unchanged. Every exponent stays <= 0 and every sum >= 1, as in the common header.
//
// Accuracy (float): one rounding of beta*log2(e), then per slot a subtraction and a product
// as before; the approximations add about 2^-22 relative per exp2 and 2^-22 absolute per
// log2, far inside the float32 tolerance of the tests (1e-4). double inputs use the accurate
// exp2/log2 and an IEEE division.
//
// Host compilers see plain exp2/log2/division, so the logic can be checked on the CPU
// against the float64 reference (tests/test_cuda_math.py builds a small driver).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EMDPO_B2 __host__ __device__ __forceinline__
#else
#define EMDPO_B2 inline
#endif

namespace emdpo {
namespace base2 {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// Lists of at most this many slots run entirely in registers.
constexpr int kShortMax = 8;

EMDPO_B2 float ex2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
EMDPO_B2 float lg2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::log2(x);
#endif
}
EMDPO_B2 float rcp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}
EMDPO_B2 double ex2(double x) { return exp2(x); }  // accurate (about 1 ulp)
EMDPO_B2 double lg2(double x) { return log2(x); }
EMDPO_B2 double rcp(double x) { return 1.0 / x; }
EMDPO_B2 float fabs_(float x) { return fabsf(x); }
EMDPO_B2 double fabs_(double x) { return fabs(x); }
template <typename A> EMDPO_B2 bool finite2(A x) { return fabs_(x) < A(INFINITY); }

// Rewards of a short record in bits: r[j] = c * (p[j] - ref[j]) for j < m (c = beta*log2 e).
// The difference comes first: p and ref are often close and large (-1e4), and c*p - c*ref
// would lose the low bits. Slots j >= m are not read.
template <int MM, bool EXACT, typename A, typename T>
EMDPO_B2 void load_rewards(const T* __restrict__ p, const A (&ref)[MM], int m, A c, A (&r)[MM],
                           bool& finite) {
  bool ok = true;
#pragma unroll
  for (int j = 0; j < MM; ++j) {
    if (EXACT || j < m) {
      r[j] = c * (A(p[j]) - ref[j]);
      ok = ok & finite2(r[j]);  // not &&: one predicated compare per slot, no branches
    }
  }
  finite = finite & ok;
}

// Log-likelihood (natural units) of a record of m <= MM slots from its rewards in bits.
// EXACT: m == MM, known at compile time. Otherwise slots t >= m are skipped, and the pass
// starts from (mx, z) = (-inf, 0): the first real slot then sets mx = r, z = 1, exactly
// as the EXACT start does, with no run-time index into the register array.
template <int MM, bool EXACT, typename A>
EMDPO_B2 A short_loglik(const A (&r)[MM], int m, int L) {
  A mx = EXACT ? r[MM - 1] : A(-INFINITY);
  A z = EXACT ? A(1) : A(0);
  A sum_r = A(0), prod = A(1);  // prod of at most 7 sums each <= 8: no overflow
#pragma unroll
  for (int t = EXACT ? MM - 2 : MM - 1; t >= 0; --t) {
    if (EXACT || t < m) {
      const A d = r[t] - mx;
      const A e = ex2(-fabs_(d));
      const bool up = d > A(0);
      z = up ? z * e + A(1) : z + e;
      mx = up ? r[t] : mx;
      if (t < L) {
        sum_r += r[t] - mx;
        prod *= z;
      }
    }
  }
  return A(kLn2) * (sum_r - lg2(prod));
}

// Log-likelihood and gradient of a short record: g[j] = scale * d ll / d r_j (natural r),
// the formulas of record_loglik_grad_short (common/listwise.h): m-1 exp2, one log2, one
// reciprocal per ranked slot, all in registers.
template <int MM, bool EXACT, typename A>
EMDPO_B2 A short_loglik_grad(const A (&r)[MM], int m, int L, A scale, A (&g)[MM]) {
  A a[MM], b[MM], zt[MM];
  A mx = EXACT ? r[MM - 1] : A(-INFINITY);
  A z = EXACT ? A(1) : A(0);
  a[MM - 1] = A(1);
  b[MM - 1] = A(1);
  zt[MM - 1] = A(1);
  A sum_r = A(0), prod = A(1);
#pragma unroll
  for (int t = EXACT ? MM - 2 : MM - 1; t >= 0; --t) {
    if (EXACT || t < m) {
      const A d = r[t] - mx;
      const A e = ex2(-fabs_(d));
      const bool up = d > A(0);
      z = up ? z * e + A(1) : z + e;
      mx = up ? r[t] : mx;
      // At t = m-1 of a non-EXACT record: up, e = 0, so a = 1, z = 1 (b is never read there).
      a[t] = up ? A(1) : e;
      b[t] = up ? e : A(1);
      zt[t] = z;
      if (t < L) {
        sum_r += r[t] - mx;
        prod *= z;
      }
    }
  }
  A q = A(1), inv_prev = A(1), P = A(1);
#pragma unroll
  for (int j = 0; j < MM; ++j) {
    if (EXACT || j < m) {
      if (j == 0) {  // L >= 1: slot 0 is always ranked
        inv_prev = rcp(zt[0]);
        g[0] = scale * (A(1) - a[0] * inv_prev);
      } else if (j < L) {
        const A inv_z = rcp(zt[j]);
        q = q * b[j - 1] * zt[j] * inv_prev + A(1);
        g[j] = scale * (A(1) - a[j] * inv_z * q);
        inv_prev = inv_z;
      } else {
        P = (j == L) ? b[j - 1] : P * b[j - 1];
        g[j] = scale * -(a[j] * P * inv_prev * q);
      }
    }
  }
  return A(kLn2) * (sum_r - lg2(prod));
}

// Products of running sums are flushed into a log2 past this bound (long lists).
template <typename A> EMDPO_B2 A flush_bound() { return A(1.8e19); }

// Long records (any m): the backward pass of record_loglik in bits, reading p and ref.
template <typename A, typename T>
EMDPO_B2 A long_loglik(const T* __restrict__ p, const T* __restrict__ ref, int64_t m,
                       int64_t L, A c, bool& finite) {
  A mx = c * (A(p[m - 1]) - A(ref[m - 1]));
  bool ok = finite2(mx);
  A z = A(1), sum_r = A(0), log_sum = A(0), prod = A(1);
  for (int64_t t = m - 2; t >= 0; --t) {
    const A r = c * (A(p[t]) - A(ref[t]));
    ok = ok && finite2(r);
    const A d = r - mx;
    const A e = ex2(-fabs_(d));
    const bool up = d > A(0);
    z = up ? z * e + A(1) : z + e;
    mx = up ? r : mx;
    if (t < L) {
      sum_r += r - mx;
      prod *= z;
    }
    if (prod > flush_bound<A>()) {
      log_sum += lg2(prod);
      prod = A(1);
    }
  }
  finite = finite && ok;
  return A(kLn2) * (sum_r - (log_sum + lg2(prod)));
}

// Long records with the gradient: record_loglik_grad in bits. g[0..L-1] holds LSE2_t between
// the passes; g[j] = scale * d ll / d r_j at the end.
template <typename A, typename T, typename G>
EMDPO_B2 A long_loglik_grad(const T* __restrict__ p, const T* __restrict__ ref, int64_t m,
                            int64_t L, A c, A scale, G* __restrict__ g, bool& finite) {
  A mx = c * (A(p[m - 1]) - A(ref[m - 1]));
  bool ok = finite2(mx);
  A z = A(1), sum_r = A(0);
  for (int64_t t = m - 2; t >= 0; --t) {
    const A r = c * (A(p[t]) - A(ref[t]));
    ok = ok && finite2(r);
    const A d = r - mx;
    const A e = ex2(-fabs_(d));
    const bool up = d > A(0);
    z = up ? z * e + A(1) : z + e;
    mx = up ? r : mx;
    if (t < L) {
      const A lse = mx + lg2(z);
      sum_r += r - lse;
      g[t] = G(lse);
    }
  }
  finite = finite && ok;
  A q = A(0), lse_prev = A(0);
  for (int64_t j = 0; j < m; ++j) {
    const A r = c * (A(p[j]) - A(ref[j]));
    A ranked = A(0);
    if (j < L) {
      const A lse = A(g[j]);
      const A step = lse - lse_prev;
      q = q * ex2(step < A(0) ? step : A(0)) + A(1);
      lse_prev = lse;
      ranked = A(1);
    }
    g[j] = G(scale * (ranked - ex2(r - lse_prev) * q));
  }
  return A(kLn2) * sum_r;
}

}  // namespace base2
}  // namespace emdpo
