// CPU (OpenMP) kernels over records and annotators (arguments: common/records.h). Raw
// pointers, no Python. Every kernel returns the index of the first record whose rewards are
// not finite, or -1.
#pragma once
#include <cstdint>

#include "common/records.h"
#include "cpu/threads.h"

namespace emdpo {
namespace cpu {

// out (N, K): log-likelihood of each record under each type.
template <typename T>
int64_t listwise_loglik(const Records<T>& rec, T* out);

// E-step. Sums are taken in annotator order (deterministic). An annotator whose term
// log eta_k + S_hk is below the double range for every type gets a row of NaN posteriors
// (see finish_annotator); callers report it.
template <typename T>
int64_t e_step(const Records<T>& rec, const Annotators<T>& ann, const EStepOut<T>& out);

// Weighted listwise DPO loss of K policies at once (see LossArgs).
template <typename T>
int64_t listwise_dpo_loss_and_grad(const Records<T>& rec, const LossArgs<T>& loss);

// Structural checks of index arrays, in one pass without allocation. Each returns -1 when
// the array is valid, else the first offending index.
int64_t first_bad_offset(const int64_t* offsets, int64_t n, int64_t total, int64_t min_gap);
int64_t first_bad_n_ranked(const int64_t* n_ranked, const int64_t* offsets, int64_t N);

// The instruction set the CPU kernels run with: "avx512", "avx2" or "baseline".
const char* cpu_isa();

}  // namespace cpu
}  // namespace emdpo
