// Per-sample and per-entry math of the MMRA regret matrices, written once for the CPU loop
// and the CUDA kernel (docs/math.md, MMRA).
//
// Samples s of source policy j occupy source_offsets[j] .. source_offsets[j+1]-1, with
// lp[k, s] = log pi_k(y_s | x_s) for every type k and ref[s] = log pi_ref(y_s | x_s).
// With weights v_s (1 when absent) and V_j = sum_{s in j} v_s, the kernels reduce
//     mean_kj = (1 / V_j) sum_{s in j} v_s * term(k, j, s)
// where term is
//     reward:  lp[k, s] - ref[s]          (A_kj, type k's implicit reward on policy j's samples)
//     kl:      lp[j, s] - lp[k, s]        (a Monte-Carlo estimate of KL(pi_j || pi_k))
// and finish the entry as
//     reward:  R_kj = beta * (mean_kk - mean_kj)
//     kl:      R_kj = beta * mean_kj.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EMDPO_REGRET_HD __host__ __device__ __forceinline__
#else
#define EMDPO_REGRET_HD inline
#endif

namespace emdpo {

enum RegretKind : int { kRegretReward = 0, kRegretKL = 1 };

// One sample's term, in double: float32 log-probabilities are widened before they are
// subtracted, so the difference of two float32 values is exact.
template <typename T>
EMDPO_REGRET_HD double regret_term(int kind, const T* lp, const T* ref, int64_t S, int64_t k,
                                   int64_t j, int64_t s) {
  return kind == kRegretReward ? double(lp[k * S + s]) - double(ref[s])
                               : double(lp[j * S + s]) - double(lp[k * S + s]);
}

EMDPO_REGRET_HD double regret_entry(int kind, double beta, double mean_kj, double mean_kk) {
  return kind == kRegretReward ? beta * (mean_kk - mean_kj) : beta * mean_kj;
}

// True for finite x; comparisons only, so it survives any math flags.
EMDPO_REGRET_HD bool regret_finite(double x) { return x < double(INFINITY) && x > -double(INFINITY); }

}  // namespace emdpo
