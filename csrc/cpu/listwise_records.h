// The record loops of the CPU kernels, over lane blocks (cpu/listwise_lanes.h), templated on
// the lane width W. They are compiled once per instruction set: listwise_cpu.cpp (baseline),
// listwise_avx2.cpp and listwise_avx512.cpp each include this header and instantiate them
// through EMDPO_DEFINE_RECORD_LOOPS, inside their own EMDPO_ISA_NS (see common/fastmath.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/listwise.h"
#include "cpu/listwise_lanes.h"

namespace emdpo {
inline namespace EMDPO_ISA_NS {
namespace records {

using lanes::Block;
using lanes::kMaxLaneList;

constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();

EMDPO_ALWAYS_INLINE int64_t ranked_of(const int64_t* n_ranked, int64_t i, int64_t m) {
  return n_ranked ? n_ranked[i] : m - 1;
}

// Log-likelihoods of records [lo, hi) under the K type rows of p (row stride M):
// out[k * out_stride + (i - lo)]. Returns the first record with non-finite rewards or kNoBad.
template <int W, typename A, typename T>
EMDPO_ALWAYS_INLINE int64_t records_loglik(const T* p, int64_t M, int64_t K, const T* ref,
                                           const int64_t* offsets, const int64_t* n_ranked,
                                           int64_t lo, int64_t hi, A beta, A* out,
                                           int64_t out_stride) {
  int64_t first_bad = kNoBad;
  for (int64_t i0 = lo; i0 < hi; i0 += W) {
    const int n = int(std::min<int64_t>(W, hi - i0));
    Block<W> b;
    if (lanes::make_block(offsets, n_ranked, i0, n, b) && b.max_m <= kMaxLaneList) {
      for (int64_t k = 0; k < K; ++k) {
        const int bad = lanes::block_loglik<A>(p + k * M, ref, b, beta, out + k * out_stride + (i0 - lo));
        if (bad >= 0) first_bad = std::min(first_bad, i0 + bad);
      }
    } else {
      for (int64_t i = i0; i < i0 + n; ++i) {
        const int64_t off = offsets[i], m = offsets[i + 1] - off;
        bool finite = true;
        for (int64_t k = 0; k < K; ++k)
          out[k * out_stride + (i - lo)] = record_loglik<A>(
              p + k * M + off, ref + off, m, ranked_of(n_ranked, i, m), beta, finite);
        if (!finite) first_bad = std::min(first_bad, i);
      }
    }
  }
  return first_bad;
}

// Gradient of records [lo, hi) under one type row p into g (same layout as p), with
// per-record coefficient coef_i = -scale * w_i; per-record ll into ll_out[i - lo].
template <int W, typename A, typename T>
EMDPO_ALWAYS_INLINE int64_t records_loglik_grad(const T* p, const T* ref, const int64_t* offsets,
                                                const int64_t* n_ranked, const T* w, A scale,
                                                int64_t lo, int64_t hi, A beta, T* g,
                                                A* ll_out) {
  int64_t first_bad = kNoBad;
  for (int64_t i0 = lo; i0 < hi; i0 += W) {
    const int n = int(std::min<int64_t>(W, hi - i0));
    A coef[W];
    for (int l = 0; l < W; ++l) coef[l] = l < n ? -scale * (w ? A(w[i0 + l]) : A(1)) : A(0);
    Block<W> b;
    if (lanes::make_block(offsets, n_ranked, i0, n, b) && b.max_m <= kMaxLaneList) {
      const int bad = lanes::block_loglik_grad<A>(p, ref, b, beta, coef, g, ll_out + (i0 - lo));
      if (bad >= 0) first_bad = std::min(first_bad, i0 + bad);
    } else {
      for (int l = 0; l < n; ++l) {
        const int64_t i = i0 + l, off = offsets[i], m = offsets[i + 1] - off;
        bool finite = true;
        // Lists the lanes could hold take the same formulation as the lanes; longer ones the
        // general one (LSE kept in the output buffer between the passes).
        const int64_t L = ranked_of(n_ranked, i, m);
        const A scale = coef[l] * beta;
        ll_out[i - lo] = m <= kShortList
                             ? record_loglik_grad_short<A>(p + off, ref + off, m, L, beta,
                                                           scale, g + off, finite)
                             : record_loglik_grad<A>(p + off, ref + off, m, L, beta, scale,
                                                     g + off, finite);
        if (!finite) first_bad = std::min(first_bad, i);
      }
    }
  }
  return first_bad;
}

}  // namespace records
}  // namespace EMDPO_ISA_NS
}  // namespace emdpo

// Defines the exported entry points of one instruction set: records_loglik_<SUFFIX> and
// records_loglik_grad_<SUFFIX> for float and double (declared in cpu/listwise_isa.h), with
// lane widths WF (float) and WD (double).
#define EMDPO_DEFINE_RECORD_LOOPS(SUFFIX, WF, WD)                                             \
  namespace emdpo {                                                                           \
  namespace cpu {                                                                             \
  EMDPO_RECORD_LOOP(SUFFIX, WF, float)                                                        \
  EMDPO_RECORD_LOOP(SUFFIX, WD, double)                                                       \
  }                                                                                           \
  }

#define EMDPO_RECORD_LOOP(NAME, W, T)                                                         \
  int64_t records_loglik_##NAME(const T* p, int64_t M, int64_t K, const T* ref,               \
                                const int64_t* o, const int64_t* nr, int64_t lo, int64_t hi,  \
                                T beta, T* out, int64_t stride) {                             \
    return records::records_loglik<W>(p, M, K, ref, o, nr, lo, hi, beta, out, stride);        \
  }                                                                                           \
  int64_t records_loglik_grad_##NAME(const T* p, const T* ref, const int64_t* o,              \
                                     const int64_t* nr, const T* w, T scale, int64_t lo,      \
                                     int64_t hi, T beta, T* g, T* ll) {                       \
    return records::records_loglik_grad<W>(p, ref, o, nr, w, scale, lo, hi, beta, g, ll);     \
  }
