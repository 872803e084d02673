// exp and log for float written as plain arithmetic (Cephes' single-precision polynomials,
// about 1 ulp over the ranges used here), so that the CPU compiler can vectorize the loops
// that call them; libm's expf/logf are opaque calls that stop vectorization. Only the host
// uses these: CUDA code calls the device's expf/logf.
//
// No -ffast-math is needed or wanted: the kernels must keep IEEE semantics (NaN and
// infinity checks), and the build uses -ffp-contract=off so every instruction set rounds the
// same way and results stay bitwise identical across machines and thread counts.
#pragma once

// Every inline function below lives in the inline namespace EMDPO_ISA_NS: translation
// units compiled for a specific instruction set (cpu/listwise_avx2.cpp, ...) define it to
// their own name, so their copies of these functions can never be merged by the linker
// with the baseline copies (which would run AVX-512 code on machines without it).
#ifndef EMDPO_ISA_NS
#define EMDPO_ISA_NS baseline
#endif

#include <cstdint>
#include <cstring>
// Vector types are for the CPU kernels only; nvcc never sees them.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define EMDPO_HOST_VECTORS 1
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#endif

#if defined(__GNUC__)
#define EMDPO_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EMDPO_ALWAYS_INLINE inline
#endif

namespace emdpo {
inline namespace EMDPO_ISA_NS {
namespace fastmath {

// The arithmetic is written once, generic over a float type F and the matching int32 type
// I: plain float/int32_t, or GCC vector types for code that must be vectorized by hand
// (cpu/listwise_lanes.h). Both instantiations perform the same IEEE operations, so a lane of
// the vector version returns bit for bit what the scalar version returns.
EMDPO_ALWAYS_INLINE float as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
EMDPO_ALWAYS_INLINE int32_t as_int(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
EMDPO_ALWAYS_INLINE int32_t to_int(float f) { return static_cast<int32_t>(f); }
EMDPO_ALWAYS_INLINE float to_float(int32_t i) { return static_cast<float>(i); }
EMDPO_ALWAYS_INLINE float sel(bool c, float a, float b) { return c ? a : b; }
// min(max(x, lo), hi) for finite x (NaN handling may differ between versions; callers
// reject non-finite inputs anyway).
EMDPO_ALWAYS_INLINE float clamp(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}
EMDPO_ALWAYS_INLINE int32_t sel(bool c, int32_t a, int32_t b) { return c ? a : b; }
#if defined(EMDPO_HOST_VECTORS)
// Every function below is always inlined, so GCC's note that passing wide vectors without
// the matching instruction set changes the ABI does not apply (it would otherwise show in
// every translation unit that includes this header for its scalar functions).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC vector types of 4, 8 and 16 lanes (the native widths of SSE, AVX2 and AVX-512) with
// the same conversions and selects: a same-size vector cast reinterprets bits,
// __builtin_convertvector converts element-wise (truncating, like static_cast), and selects
// are bitwise blends of all-ones/all-zeros masks (GCC 12 turned some vector `?:` into
// lane-by-lane code).
template <int W> struct vec;
#define EMDPO_VECTOR_TYPES(W)                                                                 \
  typedef float vfloat##W __attribute__((vector_size(W * sizeof(float))));                    \
  typedef int32_t vint##W __attribute__((vector_size(W * sizeof(int32_t))));                  \
  template <> struct vec<W> {                                                                 \
    using F = vfloat##W;                                                                      \
    using I = vint##W;                                                                        \
  };                                                                                          \
  EMDPO_ALWAYS_INLINE vfloat##W as_float(vint##W i) { return (vfloat##W)i; }                  \
  EMDPO_ALWAYS_INLINE vint##W as_int(vfloat##W f) { return (vint##W)f; }                      \
  EMDPO_ALWAYS_INLINE vint##W to_int(vfloat##W f) { return __builtin_convertvector(f, vint##W); } \
  EMDPO_ALWAYS_INLINE vfloat##W to_float(vint##W i) {                                         \
    return __builtin_convertvector(i, vfloat##W);                                             \
  }                                                                                           \
  EMDPO_ALWAYS_INLINE vint##W sel(vint##W c, vint##W a, vint##W b) { return (a & c) | (b & ~c); } \
  EMDPO_ALWAYS_INLINE vfloat##W sel(vint##W c, vfloat##W a, vfloat##W b) {                    \
    return (vfloat##W)(((vint##W)a & c) | ((vint##W)b & ~c));                                 \
  }
EMDPO_VECTOR_TYPES(4)
EMDPO_VECTOR_TYPES(8)
EMDPO_VECTOR_TYPES(16)
#undef EMDPO_VECTOR_TYPES

// Clamps: selects at any width, and one min and one max instruction (an overload the
// compiler prefers to the template) at each width the translation unit's instruction set
// has; the same value for every finite x.
template <typename V>
EMDPO_ALWAYS_INLINE V clamp(V x, float lo, float hi) {
  x = sel(x < lo, V(V{} + lo), x);
  return sel(x > hi, V(V{} + hi), x);
}
#define EMDPO_NATIVE_CLAMP(W, REG, PREFIX)                                                    \
  EMDPO_ALWAYS_INLINE vfloat##W clamp(vfloat##W x, float lo, float hi) {                      \
    return (vfloat##W)PREFIX##_min_ps(PREFIX##_max_ps((REG)x, PREFIX##_set1_ps(lo)),          \
                                      PREFIX##_set1_ps(hi));                                  \
  }
#if defined(__SSE__)
EMDPO_NATIVE_CLAMP(4, __m128, _mm)
#endif
#if defined(__AVX__)
EMDPO_NATIVE_CLAMP(8, __m256, _mm256)
#endif
#if defined(__AVX512F__)
EMDPO_NATIVE_CLAMP(16, __m512, _mm512)
#endif
#undef EMDPO_NATIVE_CLAMP
#pragma GCC diagnostic pop
#endif

// exp(x). Inputs are clamped to [-87.3, 88.3]: below that the true result is under 1.2e-38,
// which every caller here adds to a number >= 1, so returning ~2^-126 is exact enough.
// NaN inputs come back as a finite number; callers detect non-finite inputs separately.
template <typename F, typename I>
EMDPO_ALWAYS_INLINE F exp_generic(F x) {
  x = clamp(x, -87.3f, 88.3f);
  // n = round(x / ln 2) by the "magic number" trick: adding 1.5 * 2^23 leaves the nearest
  // integer in the low mantissa bits (exact for |y| < 2^22), so no float/int conversion is
  // needed and the integer n is read straight off the bits.
  const F y = x * 1.44269504088896341f;
  const F shifted = y + 12582912.0f;
  const F fn = shifted - 12582912.0f;
  const I n = as_int(shifted) - 0x4b400000;  // as_int(12582912.0f)
  // r = x - n ln2 in two steps (Cody-Waite) to keep the low bits.
  F r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const F r2 = r * r;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F e = p * r2 + r + 1.0f;
  return e * as_float(I((n + 127) << 23));  // times 2^n, n in [-126, 127]
}

// log(x) for finite x > 0 (callers pass sums that are >= 1).
template <typename F, typename I>
EMDPO_ALWAYS_INLINE F log_generic(F x) {
  const I bits = as_int(x);
  I e = ((bits >> 23) & 0xff) - 126;                            // x = m * 2^e, m in [0.5, 1)
  F m = as_float(I((bits & 0x007fffff) | 0x3f000000));
  const auto small = m < 0.707106781186547524f;                 // keep m in [sqrt(.5), sqrt(2))
  e = sel(small, I(e - 1), e);
  m = sel(small, F(m + m - 1.0f), F(m - 1.0f));
  const F z = m * m;
  F p = m * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const F fe = to_float(e);
  F y = p * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

EMDPO_ALWAYS_INLINE float expf(float x) { return exp_generic<float, int32_t>(x); }
EMDPO_ALWAYS_INLINE float logf(float x) { return log_generic<float, int32_t>(x); }

}  // namespace fastmath
}  // namespace EMDPO_ISA_NS
}  // namespace emdpo
