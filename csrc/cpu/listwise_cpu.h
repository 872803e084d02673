// CPU (OpenMP) kernels over records and annotators. Raw pointers, no Python.
// Every function returns the index of the first record whose rewards are not finite, or -1.
// Layout: policy (K, M) row-major, ref (M,), offsets (N+1,), n_ranked (N,) or null for full
// rankings, annotator_offsets (H+1,) grouping consecutive records by annotator.
#pragma once
#include <cstdint>

#include "cpu/threads.h"

namespace emdpo {
namespace cpu {

// out (N, K): log-likelihood of each record under each type.
template <typename T>
int64_t listwise_loglik(const T* policy, const T* ref, const int64_t* offsets,
                        const int64_t* n_ranked, int64_t N, int64_t M, int64_t K, double beta,
                        T* out);

// E-step. record_weights (N,) or null; log_weights (K,); annotator_weights (H,) or null (all
// ones). Writes responsibilities (H, K), annotator_loglik (H, K),
// *loglik = sum_h v_h logsumexp_k (log eta_k + S_hk), record_ll (N, K) when not null, and
// type_totals (K,) = sum_h v_h g_hk when not null (summed in annotator order: deterministic).
// An annotator whose term log eta_k + S_hk is below the double range for every type gets a
// row of NaN posteriors (see finish_annotator); callers report it.
template <typename T>
int64_t e_step(const T* policy, const T* ref, const int64_t* offsets, const int64_t* n_ranked,
               const T* record_weights, const int64_t* annotator_offsets,
               const double* log_weights, const double* annotator_weights, int64_t N,
               int64_t M, int64_t K, int64_t H, double beta, T* responsibilities,
               T* annotator_loglik, double* loglik, T* record_ll, double* type_totals);

// Weighted listwise DPO loss of K policies at once:
//   loss = sum_k scale_k * sum_i w_ki * (-ll_ki),   grad (K, M) = d loss / d policy.
// weights (K, N) or null (all ones); scale (K,). record_loss (K, N), when not null, gets
// w_ki * (-ll_ki) (unscaled).
template <typename T>
int64_t listwise_dpo_loss_and_grad(const T* policy, const T* ref, const int64_t* offsets,
                                   const int64_t* n_ranked, const T* weights,
                                   const double* scale, int64_t N, int64_t M, int64_t K,
                                   double beta, double* loss, T* grad, T* record_loss);

// Structural checks of index arrays, in one pass without allocation. Each returns -1 when
// the array is valid, else the first offending index.
int64_t first_bad_offset(const int64_t* offsets, int64_t n, int64_t total, int64_t min_gap);
int64_t first_bad_n_ranked(const int64_t* n_ranked, const int64_t* offsets, int64_t N);

// The instruction set the CPU kernels run with: "avx512", "avx2" or "baseline".
const char* cpu_isa();

}  // namespace cpu
}  // namespace emdpo
