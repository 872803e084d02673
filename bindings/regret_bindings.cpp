// Bindings of the MMRA regret-matrix kernels (CPU always, CUDA when built).
//
// The Python layer (emdpo_core/ops/regret.py) validates arguments and converts dtypes before it
// calls in here; the CPU binding re-checks what memory safety rests on (dtypes, contiguity,
// sizes, source_offsets) so that a direct call with bad buffers raises instead of crashing.
// CUDA pointers arrive as integers (torch's data_ptr()) with the stream as an integer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "buffers.h"
#include "cpu/listwise_cpu.h"
#include "cpu/regret_cpu.h"
#ifdef EMDPO_HAVE_CUDA
#include "cuda/regret_cuda.h"
#endif

namespace py = pybind11;

namespace {

void check_kind(int kind) {
  if (kind != 0 && kind != 1)
    throw py::value_error("kind: expected 0 (reward) or 1 (kl), got " + std::to_string(kind));
}

template <typename T>
int64_t regret_matrix_impl(py::array logps, py::object ref, py::array offsets,
                           py::object weights, int64_t K, int64_t S, int kind, double beta,
                           py::array out) {
  const T* lp = emdpo_bindings::in_ptr<T>(logps, "sample_logps",
                                          emdpo_bindings::size_product(K, S, "K * S"));
  const T* r = nullptr;
  if (!ref.is_none()) r = emdpo_bindings::in_ptr<T>(ref.cast<py::array>(), "sample_ref_logps", S);
  if (kind == 0 && r == nullptr)
    throw py::value_error("sample_ref_logps: required for kind='reward'");
  const int64_t* o = emdpo_bindings::in_ptr<int64_t>(
      offsets, "source_offsets", emdpo_bindings::size_plus_one(K, "K"));
  // Every source needs at least one sample: the kernel divides by each source's weight.
  if (emdpo::cpu::first_bad_offset(o, K + 1, S, 1) >= 0)
    throw py::value_error("source_offsets: not a valid layout");
  const T* w = nullptr;
  if (!weights.is_none()) w = emdpo_bindings::in_ptr<T>(weights.cast<py::array>(), "sample_weights", S);
  if (!py::isinstance<py::array_t<double>>(out) || !(out.flags() & py::array::c_style) ||
      int64_t(out.size()) != emdpo_bindings::size_product(K, K, "K * K") || !out.writeable())
    throw py::type_error("out: expected a writeable C-contiguous float64 array of K*K elements");
  double* R = static_cast<double*>(out.mutable_data());
  py::gil_scoped_release release;
  return emdpo::cpu::regret_matrix<T>(lp, r, o, w, K, S, kind, beta, R);
}

#ifdef EMDPO_HAVE_CUDA
// The CUDA kernel's sizes, checked before any CUDA call (the pointers cannot be measured):
// K sources of S samples ((K, S) log-probabilities, K+1 offsets), and one grid block per
// (k, j) pair and slice, so K * K must stay within int (K <= 46340).
void check_cuda_regret_sizes(int64_t K, int64_t S) {
  if (K < 1 || S < 1)
    throw py::value_error("sizes: expected K >= 1 and S >= 1, got K=" + std::to_string(K) +
                          ", S=" + std::to_string(S));
  emdpo_bindings::elements_of_8_bytes(emdpo_bindings::size_product(K, S, "K * S"),
                                      "K * S elements, in bytes,");
  if (K > 46340)
    throw py::value_error("sizes: the CUDA regret kernel takes at most 46340 policies (K * K "
                          "grid blocks), got K=" + std::to_string(K));
}
#endif

}  // namespace

void register_regret(py::module_& m) {
  m.def(
      "regret_matrix",
      [](py::array logps, py::object ref, py::array offsets, py::object weights, int64_t K,
         int64_t S, int kind, double beta, py::array out) {
        if (K < 1 || S < 1)
          throw py::value_error("sizes: expected K >= 1 and S >= 1, got K=" +
                                std::to_string(K) + ", S=" + std::to_string(S));
        check_kind(kind);
        return emdpo_bindings::with_dtype_of(logps, [&](auto t) {
          return regret_matrix_impl<decltype(t)>(logps, ref, offsets, weights, K, S, kind, beta,
                                                 out);
        });
      },
      py::arg("sample_logps"), py::arg("sample_ref_logps"), py::arg("source_offsets"),
      py::arg("sample_weights"), py::arg("K"), py::arg("S"), py::arg("kind"), py::arg("beta"),
      py::arg("out"),
      "R (K, K) float64 into `out`. Returns -1, or a sample index when R is not finite.");

#ifdef EMDPO_HAVE_CUDA
  m.def("cuda_regret_matrix_workspace_bytes", [](int64_t K, int64_t S) {
    check_cuda_regret_sizes(K, S);
    return emdpo::cuda::regret_matrix_workspace_bytes(K, S);
  });
  m.def("cuda_regret_matrix",
        [](const std::string& dtype, uintptr_t logps, uintptr_t ref, uintptr_t offsets,
           uintptr_t weights, int64_t K, int64_t S, int kind, double beta, uintptr_t out,
           uintptr_t first_bad, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
          check_kind(kind);
          check_cuda_regret_sizes(K, S);
          using emdpo_bindings::dev_ptr;
          py::gil_scoped_release release;
          emdpo_bindings::with_dtype(dtype, [&](auto t) {
            using T = decltype(t);
            emdpo::cuda::regret_matrix<T>(dev_ptr<T>(logps), dev_ptr<T>(ref),
                                          dev_ptr<int64_t>(offsets), dev_ptr<T>(weights), K, S,
                                          kind, beta, dev_ptr<double>(out),
                                          dev_ptr<unsigned long long>(first_bad),
                                          dev_ptr<void>(workspace), workspace_bytes,
                                          dev_ptr<void>(stream));
          });
        });
#endif
}
