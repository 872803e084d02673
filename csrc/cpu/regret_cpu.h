// CPU (OpenMP) kernel of the MMRA regret matrix (math in common/regret.h). Raw pointers, no
// Python.
#pragma once
#include <cstdint>

namespace emdpo {
namespace cpu {

// R (K, K) row-major float64: R[k * K + j] = regret of type k served by policy j.
// sample_logps (K, S) row-major; sample_ref (S,) (read only for kind = reward, may be null
// for kind = kl); source_offsets (K+1,) with every source holding at least one sample;
// sample_weights (S,) >= 0 with a positive sum per source, or null for plain means;
// kind: 0 = reward, 1 = kl (emdpo::RegretKind).
// Returns -1 when R is finite. Otherwise a sample index >= 0: the first sample whose term is
// not finite (NaN/inf log-probability) or, when a sum of finite terms overflows, the first
// sample of the chunk or source that overflowed (the caller scans the inputs to tell the two
// apart; R is then meaningless).
// Bitwise identical results for any number of threads.
template <typename T>
int64_t regret_matrix(const T* sample_logps, const T* sample_ref, const int64_t* source_offsets,
                      const T* sample_weights, int64_t K, int64_t S, int kind, double beta,
                      double* R);

}  // namespace cpu
}  // namespace emdpo
