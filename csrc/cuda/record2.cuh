// Per-record Plackett-Luce math for the CUDA kernels, in base 2.
//
// The formulas are those of common/listwise.h (docs/math.md), instantiated with the rewards
// measured in bits:
//     r2_j = beta * log2(e) * (logpi(y_j) - logpi_ref(y_j)),   LSE2_t = log2 sum_{s>=t} 2^r2_s,
//     ll = ln(2) * sum_{t<L} (r2_t - LSE2_t).
// Base 2 lets float code use the hardware's exp2/log2/reciprocal approximations directly
// (ex2.approx, lg2.approx, rcp.approx: one MUFU instruction each, relative error about
// 2^-22), where expf/logf cost 10-30 instructions. The ratios the gradient is built from,
// a_t = 2^(r2_t - mx_t), b_t = 2^(mx_{t+1} - mx_t) and the running sums z_t, are the same
// numbers in either base, so the gradient formulas carry over unchanged. Every exponent
// stays <= 0 and every sum >= 1, as in the common header.
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

#include "common/listwise.h"

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

// float: the hardware approximations on the device (flush-to-zero), libm on the host.
// double: the accurate exp2/log2 (about 1 ulp) and an IEEE division everywhere.
#if defined(__CUDA_ARCH__)
EMDPO_B2 float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
EMDPO_B2 float lg2(float x) { float y; asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
EMDPO_B2 float rcp(float x) { float y; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
#else
EMDPO_B2 float ex2(float x) { return std::exp2(x); }
EMDPO_B2 float lg2(float x) { return std::log2(x); }
EMDPO_B2 float rcp(float x) { return 1.0f / x; }
#endif
EMDPO_B2 double ex2(double x) { return exp2(x); }
EMDPO_B2 double lg2(double x) { return log2(x); }
EMDPO_B2 double rcp(double x) { return 1.0 / x; }

// The base the formulas of common/listwise.h run in here.
struct Base2 {
  template <typename A> static EMDPO_B2 A exp(A x) { return ex2(x); }
  template <typename A> static EMDPO_B2 A log(A x) { return lg2(x); }
  template <typename A> static EMDPO_B2 A rcp(A x) { return base2::rcp(x); }
  template <typename A> static EMDPO_B2 A to_nats(A x) { return A(kLn2) * x; }
};

// Rewards of a short record in bits: r[j] = c * (p[j] - ref[j]) for j < m (c = beta*log2 e),
// the difference first (see MemoryRewards). Slots j >= m are not read.
template <int MM, bool EXACT, typename A, typename T>
EMDPO_B2 void load_rewards(const T* __restrict__ p, const A (&ref)[MM], int m, A c, A (&r)[MM],
                           bool& finite) {
  bool ok = true;
  EMDPO_UNROLL
  for (int j = 0; j < MM; ++j) {
    if (EXACT || j < m) {
      r[j] = c * (A(p[j]) - ref[j]);
      ok = ok & finite_(r[j]);  // not &&: one predicated compare per slot, no branches
    }
  }
  finite = finite & ok;
}

// The rewards of a short record, in registers (load_rewards has checked them).
template <int MM, typename A>
struct RegisterRewards {
  static constexpr bool kCheck = false;
  const A (&r)[MM];
  EMDPO_B2 A operator()(int t) const { return r[t]; }
};

// Log-likelihood (natural units) of a record of m <= MM slots from its rewards in bits.
// EXACT: m == MM, known at compile time; otherwise the padded walk (common/listwise.h).
template <int MM, bool EXACT, typename A>
EMDPO_B2 A short_loglik(const A (&r)[MM], int m, int L) {
  bool checked = true;  // by load_rewards
  return walk_loglik<Base2, MM, EXACT ? Walk::exact : Walk::padded, A>(RegisterRewards<MM, A>{r},
                                                                      m, L, checked);
}

// Log-likelihood and gradient of a short record: g[j] = scale * d ll / d r_j (natural r),
// m-1 exp2, one log2, one reciprocal per ranked slot, all in registers.
template <int MM, bool EXACT, typename A>
EMDPO_B2 A short_loglik_grad(const A (&r)[MM], int m, int L, A scale, A (&g)[MM]) {
  bool checked = true;  // by load_rewards
  return walk_loglik_grad<Base2, MM, EXACT ? Walk::exact : Walk::padded, A>(
      RegisterRewards<MM, A>{r}, m, L, scale, g, checked);
}

// Long records (any m), reading p and ref: record_loglik and record_loglik_grad in bits
// (c = beta * log2 e). The gradient's g[0..L-1] holds LSE2_t between the passes.
template <typename A, typename T>
EMDPO_B2 A long_loglik(const T* p, const T* ref, int64_t m, int64_t L, A c, bool& finite) {
  return record_loglik<A, Base2>(p, ref, m, L, c, finite);
}
template <typename A, typename T, typename G>
EMDPO_B2 A long_loglik_grad(const T* p, const T* ref, int64_t m, int64_t L, A c, A scale, G* g,
                            bool& finite) {
  return record_loglik_grad<A, Base2>(p, ref, m, L, c, scale, g, finite);
}

}  // namespace base2
}  // namespace emdpo
