// pybind11 bindings: the private module emdpo_core._core.
//
// The Python layer (emdpo_core/ops/, with the checks of emdpo_core/_checks.py) validates
// arguments and converts dtypes before it calls in here; these functions re-check what they
// rely on for memory safety (dtype, contiguity, sizes) so that a direct call with bad buffers
// raises instead of crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "buffers.h"
#include "cpu/listwise_cpu.h"

namespace py = pybind11;

namespace {

using namespace emdpo_bindings;

// The records every kernel reads, each buffer checked against the sizes.
template <typename T>
emdpo::Records<T> records(py::array policy, py::array ref, py::array offsets,
                          py::object n_ranked, int64_t N, int64_t M, int64_t K, double beta) {
  return {in_ptr<T>(policy, "policy_logps", size_product(K, M, "K * M")),
          in_ptr<T>(ref, "ref_logps", M),
          in_ptr<int64_t>(offsets, "offsets", size_plus_one(N, "N")),
          opt_in_ptr<int64_t>(n_ranked, "n_ranked", N),
          N, M, K, beta};
}

template <typename T>
int64_t listwise_loglik_impl(const emdpo::Records<T>& rec, py::array out) {
  T* y = out_ptr<T>(out, "out", size_product(rec.N, rec.K, "N * K"));
  py::gil_scoped_release release;
  return emdpo::cpu::listwise_loglik<T>(rec, y);
}

template <typename T>
py::tuple e_step_impl(const emdpo::Records<T>& rec, py::object record_weights,
                      py::array annotator_offsets, py::array log_weights, int64_t H,
                      py::array resp, py::array annot_ll, py::object record_ll,
                      py::object annotator_weights, py::object type_totals) {
  const int64_t N = rec.N, K = rec.K;
  // Checked in argument order, so a call with several bad buffers names the first one.
  emdpo::Annotators<T> ann{H, nullptr, opt_in_ptr<T>(record_weights, "record_weights", N)};
  ann.offsets = in_ptr<int64_t>(annotator_offsets, "annotator_offsets", size_plus_one(H, "H"));
  ann.log_weights = in_ptr<double>(log_weights, "log_weights", K);
  double loglik = 0.0;
  emdpo::EStepOut<T> out{
      out_ptr<T>(resp, "responsibilities", size_product(H, K, "H * K")),
      out_ptr<T>(annot_ll, "annotator_loglik", size_product(H, K, "H * K")), &loglik,
      opt_out_ptr<T>(record_ll, "record_loglik", size_product(N, K, "N * K")), nullptr};
  ann.weights = opt_in_ptr<double>(annotator_weights, "annotator_weights", H);
  if (const double* v = ann.weights) {
    for (int64_t h = 0; h < H; ++h)
      if (!(v[h] >= 0.0 && v[h] < INFINITY))
        throw py::value_error("annotator_weights: expected finite values >= 0, got " +
                              std::to_string(v[h]) + " at index " + std::to_string(h));
  }
  out.type_totals = opt_out_ptr<double>(type_totals, "type_totals", K);
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = emdpo::cpu::e_step<T>(rec, ann, out);
  }
  if (bad < 0) {
    // A row of NaN: no posterior exists in float64 (finish_annotator in common/listwise.h).
    const int64_t* ao = ann.offsets;
    for (int64_t h = 0; h < H; ++h) {
      if (std::isnan(double(out.responsibilities[h * K])))
        throw py::value_error(
            "annotator " + std::to_string(h) + ": log_weights[k] + the summed log-likelihood "
            "of its records (records " + std::to_string(ao[h]) + ".." +
            std::to_string(ao[h + 1] - 1) + ") is below the float64 range (about -1.8e308) "
            "for every type k, so its posterior cannot be formed; the rewards beta * "
            "(policy_logps - ref_logps) of its records are out of range");
    }
  }
  return py::make_tuple(bad, loglik);
}

template <typename T>
py::tuple loss_impl(const emdpo::Records<T>& rec, py::object weights, py::array scale,
                    py::array grad, py::object record_loss) {
  const int64_t N = rec.N, K = rec.K;
  double loss = 0.0;
  const emdpo::LossArgs<T> args{opt_in_ptr<T>(weights, "weights", size_product(K, N, "K * N")),
                                in_ptr<double>(scale, "scale", K), &loss,
                                out_ptr<T>(grad, "grad", size_product(K, rec.M, "K * M")),
                                opt_out_ptr<T>(record_loss, "record_loss",
                                               size_product(K, N, "K * N"))};
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = emdpo::cpu::listwise_dpo_loss_and_grad<T>(rec, args);
  }
  return py::make_tuple(bad, loss);
}

void check_layout(py::array offsets, py::object n_ranked, int64_t N, int64_t M) {
  // Memory safety of the kernels rests on these; emdpo_core/_checks.py checks them first
  // with better messages, this is the last line of defence for direct callers.
  const int64_t* o = in_ptr<int64_t>(offsets, "offsets", size_plus_one(N, "N"));
  if (emdpo::cpu::first_bad_offset(o, N + 1, M, 2) >= 0)
    throw py::value_error("offsets: not a valid layout");
  if (!n_ranked.is_none()) {
    const int64_t* nr = in_ptr<int64_t>(n_ranked.cast<py::array>(), "n_ranked", N);
    if (emdpo::cpu::first_bad_n_ranked(nr, o, N) >= 0)
      throw py::value_error("n_ranked: out of range");
  }
}

}  // namespace

void register_cuda(py::module_& m);  // cuda_bindings.cpp
void register_regret(py::module_& m);  // regret_bindings.cpp

PYBIND11_MODULE(_core, m) {
  m.doc() = "emdpo-core compiled kernels (private; use the emdpo_core package)";
  m.attr("__version__") = EMDPO_VERSION;
  m.attr("cxx_compiler") = EMDPO_CXX_COMPILER;
#ifdef EMDPO_HAVE_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("num_threads", &emdpo::cpu::num_threads, "OpenMP threads the kernels use");
  m.def("cpu_isa", &emdpo::cpu::cpu_isa, "instruction set of the CPU kernels");

  m.def(
      "first_bad_offset",
      [](py::array offsets, int64_t total, int64_t min_gap) {
        if (total < 0 || min_gap < 0)
          throw py::value_error("first_bad_offset: expected total >= 0 and min_gap >= 0, got " +
                                std::to_string(total) + " and " + std::to_string(min_gap));
        const int64_t n = int64_t(offsets.size());
        const int64_t* o = in_ptr<int64_t>(offsets, "offsets", n);
        return emdpo::cpu::first_bad_offset(o, n, total, min_gap);
      },
      py::arg("offsets"), py::arg("total"), py::arg("min_gap"));
  m.def(
      "first_bad_n_ranked",
      [](py::array n_ranked, py::array offsets) {
        const int64_t N = int64_t(n_ranked.size());
        const int64_t* o = in_ptr<int64_t>(offsets, "offsets", N + 1);
        const int64_t* nr = in_ptr<int64_t>(n_ranked, "n_ranked", N);
        return emdpo::cpu::first_bad_n_ranked(nr, o, N);
      },
      py::arg("n_ranked"), py::arg("offsets"));

  m.def(
      "listwise_loglik",
      [](py::array policy, py::array ref, py::array offsets, py::object n_ranked, int64_t N,
         int64_t M, int64_t K, double beta, py::array out) {
        check_sizes(N, M, K);
        check_layout(offsets, n_ranked, N, M);
        return with_dtype_of(policy, [&](auto t) {
          using T = decltype(t);
          return listwise_loglik_impl(records<T>(policy, ref, offsets, n_ranked, N, M, K, beta),
                                      out);
        });
      },
      "Returns the first record with non-finite rewards, or -1.");

  m.def(
      "e_step",
      [](py::array policy, py::array ref, py::array offsets, py::object n_ranked,
         py::object record_weights, py::array annotator_offsets, py::array log_weights,
         int64_t N, int64_t M, int64_t K, int64_t H, double beta, py::array resp,
         py::array annot_ll, py::object record_ll, py::object annotator_weights,
         py::object type_totals) {
        check_sizes(N, M, K);
        check_layout(offsets, n_ranked, N, M);
        check_annotator_sizes(H, K);
        const int64_t* ao =
            in_ptr<int64_t>(annotator_offsets, "annotator_offsets", size_plus_one(H, "H"));
        if (emdpo::cpu::first_bad_offset(ao, H + 1, N, 0) >= 0)
          throw py::value_error("annotator_offsets: not a valid layout");
        return with_dtype_of(policy, [&](auto t) {
          using T = decltype(t);
          return e_step_impl(records<T>(policy, ref, offsets, n_ranked, N, M, K, beta),
                             record_weights, annotator_offsets, log_weights, H, resp, annot_ll,
                             record_ll, annotator_weights, type_totals);
        });
      },
      py::arg("policy_logps"), py::arg("ref_logps"), py::arg("offsets"), py::arg("n_ranked"),
      py::arg("record_weights"), py::arg("annotator_offsets"), py::arg("log_weights"),
      py::arg("N"), py::arg("M"), py::arg("K"), py::arg("H"), py::arg("beta"),
      py::arg("responsibilities"), py::arg("annotator_loglik"), py::arg("record_loglik"),
      py::arg("annotator_weights") = py::none(), py::arg("type_totals") = py::none(),
      "Returns (first record with non-finite rewards or -1, total log-likelihood).\n"
      "annotator_weights (H,) float64 >= 0 weighs each annotator's log-likelihood term\n"
      "(default 1); type_totals, a (K,) float64 output, receives sum_h v_h g_hk.");

  m.def(
      "listwise_dpo_loss_and_grad",
      [](py::array policy, py::array ref, py::array offsets, py::object n_ranked,
         py::object weights, py::array scale, int64_t N, int64_t M, int64_t K, double beta,
         py::array grad, py::object record_loss) {
        check_sizes(N, M, K);
        check_layout(offsets, n_ranked, N, M);
        return with_dtype_of(policy, [&](auto t) {
          using T = decltype(t);
          return loss_impl(records<T>(policy, ref, offsets, n_ranked, N, M, K, beta), weights,
                           scale, grad, record_loss);
        });
      },
      "Returns (first record with non-finite rewards or -1, total loss).");

  register_cuda(m);
  register_regret(m);
}
