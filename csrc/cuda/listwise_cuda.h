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

#include "common/records.h"

namespace emdpo {
namespace cuda {

// Largest sizes the kernels index: record lengths and slot offsets within a record are int
// on the device (M slots in all), and the loss kernel reports the first type with a
// non-finite weight, plus one, in bits 1..30 of an int status.
constexpr int64_t kMaxSlots = 2147483647;  // INT_MAX
constexpr int64_t kMaxTypes = (int64_t(1) << 30) - 2;

// How a kernel runs: first_bad as above, the caller's workspace (the *_workspace_bytes
// functions give its size; null and 0 where none is needed) and the stream.
struct Launch {
  unsigned long long* first_bad;
  void* workspace;
  size_t workspace_bytes;
  void* stream;
};

// out (N, K). Needs no workspace.
template <typename T>
void listwise_loglik(const Records<T>& rec, T* out, const Launch& launch);

// Bytes of scratch the E-step needs (the caller allocates it, e.g. through torch's caching
// allocator).
size_t e_step_workspace_bytes(int64_t N, int64_t H, int64_t K);

// Annotators' log_weights and weights are float64; out.loglik and out.type_totals are
// float64 on the device. The posteriors do not depend on the annotator weights; the type
// totals are summed in a fixed order.
template <typename T>
void e_step(const Records<T>& rec, const Annotators<T>& ann, const EStepOut<T>& out,
            const Launch& launch);

size_t loss_workspace_bytes(int64_t N, int64_t K);

// args.scale and args.loss are float64 on the device. A record with non-finite rewards or
// weights makes the loss NaN. bad_weight, when not null (initialised to UINT64_MAX like
// first_bad), is lowered to the first flat index k * N + i of a non-finite weight, so that
// callers need no separate pass over the weights.
template <typename T>
void listwise_dpo_loss_and_grad(const Records<T>& rec, const LossArgs<T>& args,
                                const Launch& launch, unsigned long long* bad_weight = nullptr);

}  // namespace cuda
}  // namespace emdpo
