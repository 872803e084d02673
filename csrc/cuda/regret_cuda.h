// CUDA kernel of the MMRA regret matrix (same math as the CPU loop: common/regret.h).
// All array pointers are device pointers; `stream` is a cudaStream_t passed as void* so this
// header needs no CUDA include. Launch and runtime errors throw std::runtime_error.
//
// The reduction uses no floating-point atomics: each (type k, source j) pair is cut into a
// number of slices that depends only on (K, S); a block sums one slice with a fixed tree,
// and a second kernel adds the slices in order. Results are bitwise reproducible run to run.
//
// first_bad: a device uint64 the caller initialises to UINT64_MAX (int64 -1); the kernels
// lower it with atomicMin (an integer minimum, order-independent) to a sample index when a
// term is not finite (the first such sample) or an entry of R is not (the first sample of
// its source). It stays -1 when R is finite; otherwise the caller scans the inputs to tell
// a non-finite log-probability from an overflow.
#pragma once
#include <cstddef>
#include <cstdint>

namespace emdpo {
namespace cuda {

// Bytes of scratch regret_matrix needs (the caller allocates it, e.g. through torch's caching
// allocator).
size_t regret_matrix_workspace_bytes(int64_t K, int64_t S);

// sample_logps (K, S), sample_ref (S,) (may be null for kind = kl), source_offsets (K+1,),
// sample_weights (S,) or null, R (K, K) float64. kind: 0 = reward, 1 = kl.
template <typename T>
void regret_matrix(const T* sample_logps, const T* sample_ref, const int64_t* source_offsets,
                   const T* sample_weights, int64_t K, int64_t S, int kind, double beta,
                   double* R, unsigned long long* first_bad, void* workspace,
                   size_t workspace_bytes, void* stream);

}  // namespace cuda
}  // namespace emdpo
