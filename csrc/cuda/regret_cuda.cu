// CUDA reduction of the MMRA regret matrix. See regret_cuda.h for the contract.
//
// Kernel 1 (slice_sums): block b handles one slice p of one (type k, source j) pair. Its
// threads stride over the slice's samples accumulating in double, then a fixed shared-memory
// tree adds the 256 thread sums. Kernel 2 (finish): one thread per entry (k, j) adds the P
// slice sums of (k, j) (and of (k, k) for the reward regret) in slice order and writes R.
// The slice count P depends only on (K, S), so the association of every sum is fixed.
#include "cuda/regret_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/regret.h"

namespace emdpo {
namespace cuda {
namespace {

constexpr int kThreads = 256;             // fixed: the reduction tree depends on it
constexpr int64_t kSamplesPerSlice = 4096;
constexpr int64_t kMaxSlices = 64;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("emdpo_core regret_matrix: ") + what + ": " +
                             cudaGetErrorString(err));
}

// Slices per (k, j) pair: about kSamplesPerSlice samples each for an average source.
int64_t num_slices(int64_t K, int64_t S) {
  const int64_t per_source = (S + K - 1) / K;
  return std::min(kMaxSlices, std::max<int64_t>(1, (per_source + kSamplesPerSlice - 1) /
                                                       kSamplesPerSlice));
}

__device__ __forceinline__ void lower_first_bad(unsigned long long* first_bad, int64_t s) {
  atomicMin(first_bad, static_cast<unsigned long long>(s));
}

// part[(k * K + j) * P + p]: sum over slice p of source j of v_s * term(k, j, s).
// wpart[j * P + p]: sum of the weights of that slice (written by the k == 0 blocks).
template <typename T>
__global__ void slice_sums(const T* lp, const T* ref, const int64_t* source_offsets,
                           const T* w, int64_t K, int64_t S, int64_t P, int kind,
                           double* part, double* wpart, unsigned long long* first_bad) {
  __shared__ double sum_s[kThreads];
  __shared__ double wsum_s[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t p = b % P;
  const int64_t kj = b / P;
  const int64_t k = kj / K, j = kj % K;
  const int64_t a = source_offsets[j], n = source_offsets[j + 1] - a;
  const int64_t lo = a + (n * p) / P, hi = a + (n * (p + 1)) / P;

  double acc = 0.0, wacc = 0.0;
  int64_t bad = INT64_MAX;
  for (int64_t s = lo + threadIdx.x; s < hi; s += kThreads) {
    const double t = regret_term(kind, lp, ref, S, k, j, s);
    const double v = w ? double(w[s]) : 1.0;
    if (!regret_finite(t) && s < bad) bad = s;
    acc += v * t;
    wacc += v;
  }
  if (bad != INT64_MAX) lower_first_bad(first_bad, bad);
  sum_s[threadIdx.x] = acc;
  wsum_s[threadIdx.x] = wacc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      sum_s[threadIdx.x] += sum_s[threadIdx.x + half];
      wsum_s[threadIdx.x] += wsum_s[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part[kj * P + p] = sum_s[0];
    if (k == 0) wpart[j * P + p] = wsum_s[0];
  }
}

__global__ void finish(const int64_t* source_offsets, const double* part, const double* wpart,
                       int64_t K, int64_t P, int kind, double beta, double* R,
                       unsigned long long* first_bad) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= K * K) return;
  const int64_t k = e / K, j = e % K;
  double V = 0.0, total_kj = 0.0, total_kk = 0.0, V_k = 0.0;
  for (int64_t p = 0; p < P; ++p) {
    V += wpart[j * P + p];
    total_kj += part[(k * K + j) * P + p];
  }
  if (kind == kRegretReward) {
    for (int64_t p = 0; p < P; ++p) {
      V_k += wpart[k * P + p];
      total_kk += part[(k * K + k) * P + p];
    }
  }
  const double r = regret_entry(kind, beta, total_kj / V, kind == kRegretReward ? total_kk / V_k : 0.0);
  R[e] = r;
  if (!regret_finite(r)) lower_first_bad(first_bad, source_offsets[j]);
}

}  // namespace

size_t regret_matrix_workspace_bytes(int64_t K, int64_t S) {
  const int64_t P = num_slices(K, S);
  return size_t(K * K * P + K * P) * sizeof(double);
}

template <typename T>
void regret_matrix(const T* sample_logps, const T* sample_ref, const int64_t* source_offsets,
                   const T* sample_weights, int64_t K, int64_t S, int kind, double beta,
                   double* R, unsigned long long* first_bad, void* workspace,
                   size_t workspace_bytes, void* stream) {
  if (K < 1 || S < 1) throw std::invalid_argument("regret_matrix: expected K >= 1 and S >= 1");
  if (kind != kRegretReward && kind != kRegretKL)
    throw std::invalid_argument("regret_matrix: kind must be 0 (reward) or 1 (kl)");
  if (workspace_bytes < regret_matrix_workspace_bytes(K, S))
    throw std::invalid_argument("regret_matrix: workspace too small");
  const int64_t P = num_slices(K, S);
  const int64_t blocks = K * K * P;
  if (blocks > int64_t(INT32_MAX)) throw std::invalid_argument("regret_matrix: K too large");
  auto st = static_cast<cudaStream_t>(stream);
  double* part = static_cast<double*>(workspace);
  double* wpart = part + K * K * P;
  slice_sums<T><<<unsigned(blocks), kThreads, 0, st>>>(sample_logps, sample_ref,
                                                       source_offsets, sample_weights, K, S,
                                                       P, kind, part, wpart, first_bad);
  check(cudaGetLastError(), "slice_sums launch");
  const int64_t finish_blocks = (K * K + kThreads - 1) / kThreads;
  finish<<<unsigned(finish_blocks), kThreads, 0, st>>>(source_offsets, part, wpart, K, P, kind,
                                                       beta, R, first_bad);
  check(cudaGetLastError(), "finish launch");
}

template void regret_matrix<float>(const float*, const float*, const int64_t*, const float*,
                                   int64_t, int64_t, int, double, double*,
                                   unsigned long long*, void*, size_t, void*);
template void regret_matrix<double>(const double*, const double*, const int64_t*,
                                    const double*, int64_t, int64_t, int, double, double*,
                                    unsigned long long*, void*, size_t, void*);

}  // namespace cuda
}  // namespace emdpo
