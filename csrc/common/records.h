// The arguments the listwise kernels share, CPU and CUDA alike: the records (docs/math.md,
// "Record layout"), the E-step's grouping by annotator and its outputs. Host pointers for
// the CPU kernels, device pointers for the CUDA ones. Each entry point takes these structs
// instead of a dozen positional arguments, so the CPU and CUDA declarations, their
// definitions and the bindings name every array once, by field.
#pragma once

#include <cstdint>

namespace emdpo {

// policy (K, M) row-major, ref (M,), offsets (N+1,): record i holds slots offsets[i] ..
// offsets[i+1]-1; n_ranked (N,) ranked depths, or null for full rankings (L = m - 1). The
// rewards are beta * (policy - ref).
template <typename T>
struct Records {
  const T* policy;
  const T* ref;
  const int64_t* offsets;
  const int64_t* n_ranked;
  int64_t N, M, K;
  double beta;
};

// E-step inputs besides the records: H annotators, offsets (H+1,) grouping consecutive
// records by annotator; record_weights (N,) c_i or null (all ones); log_weights (K,)
// log eta_k; weights (H,) v_h or null (all ones).
template <typename T>
struct Annotators {
  int64_t H;
  const int64_t* offsets;
  const T* record_weights;
  const double* log_weights;
  const double* weights;
};

// E-step outputs: responsibilities (H, K); annotator_loglik (H, K), the sums S_hk; loglik
// (one double) = sum_h v_h logsumexp_k (log eta_k + S_hk); record_ll (N, K) and type_totals
// (K,) = sum_h v_h g_hk, each only when not null.
template <typename T>
struct EStepOut {
  T* responsibilities;
  T* annotator_loglik;
  double* loglik;
  T* record_ll;
  double* type_totals;
};

// Loss inputs and outputs besides the records: weights (K, N) or null (all ones), scale
// (K,); loss (one double) = sum_k scale_k sum_i w_ki (-ll_ki); grad (K, M) = d loss /
// d policy; record_loss (K, N) = w_ki (-ll_ki) (unscaled), only when not null.
template <typename T>
struct LossArgs {
  const T* weights;
  const double* scale;
  double* loss;
  T* grad;
  T* record_loss;
};

}  // namespace emdpo
