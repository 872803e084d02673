// CUDA kernels over records and annotators (same math as the CPU loops: common/listwise.h).
// All array pointers are device pointers; `stream` is a cudaStream_t passed as void* so this
// header needs no CUDA include. Launch and runtime errors throw std::runtime_error.
//
// first_bad: a device uint64 the caller initialises to UINT64_MAX (int64 -1); kernels lower
// it with atomicMin to the first record whose rewards are not finite (a min is
// order-independent, so this stays deterministic).
// Reductions (per-annotator sums, the total log-likelihood, the total loss) use no
// floating-point atomics: fixed pieces summed in a fixed order, so results are bitwise
// reproducible run to run.
#pragma once
#include <cstddef>
#include <cstdint>

namespace emdpo {
namespace cuda {

// out (N, K).
template <typename T>
void listwise_loglik(const T* policy, const T* ref, const int64_t* offsets,
                     const int64_t* n_ranked, int64_t N, int64_t M, int64_t K, double beta,
                     T* out, unsigned long long* first_bad, void* stream);

// Bytes of scratch the E-step needs (the caller allocates it, e.g. through torch's caching
// allocator).
size_t e_step_workspace_bytes(int64_t N, int64_t H, int64_t K);

// log_weights (K,) float64 on the device; loglik: one float64 on the device.
// record_ll (N, K) or null; record_weights (N,) or null.
// annotator_weights (H,) float64 or null (all ones): loglik = sum_h v_h lse_h with
// lse_h = logsumexp_k (log eta_k + S_hk); the posteriors do not depend on v.
// type_totals (K,) float64 or null: sum_h v_h g_hk, summed in a fixed order.
template <typename T>
void e_step(const T* policy, const T* ref, const int64_t* offsets, const int64_t* n_ranked,
            const T* record_weights, const int64_t* annotator_offsets,
            const double* log_weights, int64_t N, int64_t M, int64_t K, int64_t H, double beta,
            T* responsibilities, T* annotator_loglik, double* loglik, T* record_ll,
            unsigned long long* first_bad, void* workspace, size_t workspace_bytes,
            void* stream, const double* annotator_weights = nullptr,
            double* type_totals = nullptr);

size_t loss_workspace_bytes(int64_t N, int64_t K);

// scale (K,) float64 on the device; loss: one float64 on the device; weights (K, N) or null;
// record_loss (K, N) or null. grad (K, M). A record with non-finite rewards or weights makes
// the loss NaN. bad_weight, when not null (initialised to UINT64_MAX like first_bad), is
// lowered to the first flat index k * N + i of a non-finite weight, so that callers need no
// separate pass over the weights.
template <typename T>
void listwise_dpo_loss_and_grad(const T* policy, const T* ref, const int64_t* offsets,
                                const int64_t* n_ranked, const T* weights, const double* scale,
                                int64_t N, int64_t M, int64_t K, double beta, double* loss,
                                T* grad, T* record_loss, unsigned long long* first_bad,
                                void* workspace, size_t workspace_bytes, void* stream,
                                unsigned long long* bad_weight = nullptr);

}  // namespace cuda
}  // namespace emdpo
