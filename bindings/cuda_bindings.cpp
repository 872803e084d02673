// Bindings for the CUDA kernels: device pointers arrive as integers (torch's data_ptr()),
// the stream as an integer (torch.cuda.current_stream().cuda_stream). The Python layer
// (emdpo_core/ops/_torch.py) checks devices, dtypes, shapes and layouts before calling.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "buffers.h"
#ifdef EMDPO_HAVE_CUDA
#include "cuda/listwise_cuda.h"
#endif

namespace py = pybind11;

#ifdef EMDPO_HAVE_CUDA
namespace {

// The sizes arrive next to raw device pointers, which nothing can measure: these checks, made
// before any CUDA call (so that a build without a device tests them too), are what stands
// between an absurd direct call and a kernel far out of bounds. The CPU bindings' checks of
// N, M, K (emdpo_bindings::check_sizes), then what the CUDA kernels index in int.
void check_cuda_sizes(int64_t N, int64_t M, int64_t K) {
  emdpo_bindings::check_sizes(N, M, K);
  if (M > emdpo::cuda::kMaxSlots)
    throw py::value_error("sizes: the CUDA kernels take at most " +
                          std::to_string(emdpo::cuda::kMaxSlots) + " slots, got M=" +
                          std::to_string(M));
  if (K > emdpo::cuda::kMaxTypes)
    throw py::value_error("sizes: the CUDA kernels take at most " +
                          std::to_string(emdpo::cuda::kMaxTypes) + " types, got K=" +
                          std::to_string(K));
}

// The workspace sizes depend on N and K only (no M).
void check_cuda_workspace_sizes(int64_t N, int64_t K) {
  if (N < 1 || K < 1)
    throw py::value_error("sizes: expected N >= 1, K >= 1, got N=" + std::to_string(N) +
                          ", K=" + std::to_string(K));
  check_cuda_sizes(N, 2, K);
}

template <typename T>
emdpo::Records<T> records(uintptr_t policy, uintptr_t ref, uintptr_t offsets,
                          uintptr_t n_ranked, int64_t N, int64_t M, int64_t K, double beta) {
  using emdpo_bindings::dev_ptr;
  return {dev_ptr<T>(policy), dev_ptr<T>(ref), dev_ptr<int64_t>(offsets),
          dev_ptr<int64_t>(n_ranked), N, M, K, beta};
}

}  // namespace

void register_cuda(py::module_& m) {
  m.attr("cuda") = true;
  m.attr("cuda_compiler") = EMDPO_CUDA_COMPILER;
  m.attr("cuda_architectures") = EMDPO_CUDA_ARCHS;
  using namespace emdpo;
  using emdpo_bindings::dev_ptr;
  using emdpo_bindings::with_dtype;

  m.def("cuda_listwise_loglik",
        [](const std::string& dtype, uintptr_t policy, uintptr_t ref, uintptr_t offsets,
           uintptr_t n_ranked, int64_t N, int64_t M, int64_t K, double beta, uintptr_t out,
           uintptr_t first_bad, uintptr_t stream) {
          check_cuda_sizes(N, M, K);
          py::gil_scoped_release release;
          with_dtype(dtype, [&](auto t) {
            using T = decltype(t);
            cuda::listwise_loglik<T>(
                records<T>(policy, ref, offsets, n_ranked, N, M, K, beta), dev_ptr<T>(out),
                {dev_ptr<unsigned long long>(first_bad), nullptr, 0, dev_ptr<void>(stream)});
          });
        });

  m.def("cuda_e_step_workspace_bytes", [](int64_t N, int64_t H, int64_t K) {
    check_cuda_workspace_sizes(N, K);
    emdpo_bindings::check_annotator_sizes(H, K);
    return cuda::e_step_workspace_bytes(N, H, K);
  });
  m.def("cuda_e_step",
        [](const std::string& dtype, uintptr_t policy, uintptr_t ref, uintptr_t offsets,
           uintptr_t n_ranked, uintptr_t record_weights, uintptr_t annotator_offsets,
           uintptr_t log_weights, int64_t N, int64_t M, int64_t K, int64_t H, double beta,
           uintptr_t resp, uintptr_t annot_ll, uintptr_t loglik, uintptr_t record_ll,
           uintptr_t first_bad, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream,
           uintptr_t annotator_weights, uintptr_t type_totals) {
          check_cuda_sizes(N, M, K);
          emdpo_bindings::check_annotator_sizes(H, K);
          py::gil_scoped_release release;
          with_dtype(dtype, [&](auto t) {
            using T = decltype(t);
            cuda::e_step<T>(
                records<T>(policy, ref, offsets, n_ranked, N, M, K, beta),
                {H, dev_ptr<int64_t>(annotator_offsets), dev_ptr<T>(record_weights),
                 dev_ptr<double>(log_weights), dev_ptr<double>(annotator_weights)},
                {dev_ptr<T>(resp), dev_ptr<T>(annot_ll), dev_ptr<double>(loglik),
                 dev_ptr<T>(record_ll), dev_ptr<double>(type_totals)},
                {dev_ptr<unsigned long long>(first_bad), dev_ptr<void>(workspace),
                 workspace_bytes, dev_ptr<void>(stream)});
          });
        },
        // The trailing pointers are optional (0 = none): annotator weights v (H,) float64
        // and the type totals output (K,) float64 = sum_h v_h g_hk.
        py::arg("dtype"), py::arg("policy"), py::arg("ref"), py::arg("offsets"),
        py::arg("n_ranked"), py::arg("record_weights"), py::arg("annotator_offsets"),
        py::arg("log_weights"), py::arg("N"), py::arg("M"), py::arg("K"), py::arg("H"),
        py::arg("beta"), py::arg("responsibilities"), py::arg("annotator_loglik"),
        py::arg("loglik"), py::arg("record_ll"), py::arg("first_bad"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"), py::arg("annotator_weights_ptr") = 0,
        py::arg("type_totals_ptr") = 0);

  m.def("cuda_loss_workspace_bytes", [](int64_t N, int64_t K) {
    check_cuda_workspace_sizes(N, K);
    return cuda::loss_workspace_bytes(N, K);
  });
  m.def("cuda_listwise_dpo_loss_and_grad",
        [](const std::string& dtype, uintptr_t policy, uintptr_t ref, uintptr_t offsets,
           uintptr_t n_ranked, uintptr_t weights, uintptr_t scale, int64_t N, int64_t M,
           int64_t K, double beta, uintptr_t loss, uintptr_t grad, uintptr_t record_loss,
           uintptr_t first_bad, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream,
           uintptr_t bad_weight) {
          check_cuda_sizes(N, M, K);
          py::gil_scoped_release release;
          with_dtype(dtype, [&](auto t) {
            using T = decltype(t);
            cuda::listwise_dpo_loss_and_grad<T>(
                records<T>(policy, ref, offsets, n_ranked, N, M, K, beta),
                {dev_ptr<T>(weights), dev_ptr<double>(scale), dev_ptr<double>(loss),
                 dev_ptr<T>(grad), dev_ptr<T>(record_loss)},
                {dev_ptr<unsigned long long>(first_bad), dev_ptr<void>(workspace),
                 workspace_bytes, dev_ptr<void>(stream)},
                dev_ptr<unsigned long long>(bad_weight));
          });
        },
        // bad_weight_ptr (optional, 0 = none): a device int64 initialised to -1, lowered to
        // the first flat index of a non-finite weight.
        py::arg("dtype"), py::arg("policy"), py::arg("ref"), py::arg("offsets"),
        py::arg("n_ranked"), py::arg("weights"), py::arg("scale"), py::arg("N"), py::arg("M"),
        py::arg("K"), py::arg("beta"), py::arg("loss"), py::arg("grad"), py::arg("record_loss"),
        py::arg("first_bad"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"), py::arg("bad_weight_ptr") = 0);
}
#else
void register_cuda(py::module_& m) { m.attr("cuda") = false; }
#endif
