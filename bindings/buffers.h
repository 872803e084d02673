// Buffer checks shared by the bindings: the Python layer validates and converts before it
// calls in, and these re-check what memory safety rests on (dtype, contiguity, size,
// writability) so that a direct call with bad buffers raises instead of crashing.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

namespace emdpo_bindings {

namespace py = pybind11;

// Sizes arrive from Python as arbitrary int64 values. Products and successors of them are
// formed only through these two, which raise ValueError instead of overflowing: a wrapped
// product could equal the length of a real buffer and let a kernel run far past its end.
inline int64_t size_product(int64_t a, int64_t b, const char* what) {
  if (a < 0 || b < 0 || (a != 0 && b > std::numeric_limits<int64_t>::max() / a))
    throw py::value_error(std::string("sizes: ") + what + " = " + std::to_string(a) + " * " +
                          std::to_string(b) + " is negative or does not fit in int64");
  return a * b;
}

inline int64_t size_plus_one(int64_t n, const char* name) {
  if (n < 0 || n == std::numeric_limits<int64_t>::max())
    throw py::value_error(std::string("sizes: ") + name + " = " + std::to_string(n) +
                          " is out of range");
  return n + 1;
}

// Element count n of 8-byte elements (the widest the kernels take) whose byte size fits in
// int64: a kernel forms byte offsets from element indices, and a wrapped byte offset would
// address the start of a real buffer.
inline int64_t elements_of_8_bytes(int64_t n, const char* what) {
  size_product(n, 8, what);
  return n;
}

// The sizes every listwise kernel takes, on either device: N records of at least 2 of the M
// slots, K types. Every buffer the kernels index is sized by one of these products.
inline void check_sizes(int64_t N, int64_t M, int64_t K) {
  if (N < 1 || M < 2 || K < 1)
    throw py::value_error("sizes: expected N >= 1, M >= 2, K >= 1, got N=" + std::to_string(N) +
                          ", M=" + std::to_string(M) + ", K=" + std::to_string(K));
  elements_of_8_bytes(size_product(K, M, "K * M"), "K * M elements, in bytes,");
  elements_of_8_bytes(size_product(N, K, "N * K"), "N * K elements, in bytes,");
  size_plus_one(N, "N");
}

// H annotators of the E-step: (H, K) outputs and H+1 offsets.
inline void check_annotator_sizes(int64_t H, int64_t K) {
  if (H < 1) throw py::value_error("sizes: expected H >= 1, got H=" + std::to_string(H));
  elements_of_8_bytes(size_product(H, K, "H * K"), "H * K elements, in bytes,");
  size_plus_one(H, "H");
}

template <typename T>
const T* in_ptr(const py::array& a, const char* name, int64_t size) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style))
    throw py::type_error(std::string(name) + ": expected a C-contiguous array of " +
                         py::str(py::dtype::of<T>()).cast<std::string>());
  if (int64_t(a.size()) != size)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(size) +
                          " elements, got " + std::to_string(a.size()));
  return static_cast<const T*>(a.data());
}

template <typename T>
const T* opt_in_ptr(const py::object& a, const char* name, int64_t size) {
  if (a.is_none()) return nullptr;
  return in_ptr<T>(a.cast<py::array>(), name, size);
}

template <typename T>
T* out_ptr(py::array& a, const char* name, int64_t size) {
  in_ptr<T>(a, name, size);
  if (!a.writeable()) throw py::value_error(std::string(name) + ": output array is read-only");
  return static_cast<T*>(a.mutable_data());
}

template <typename T>
T* opt_out_ptr(py::object& a, const char* name, int64_t size) {
  if (a.is_none()) return nullptr;
  py::array arr = a.cast<py::array>();
  return out_ptr<T>(arr, name, size);
}

// Calls f(T{}) with T the element type of `a`: float for a float32 array, double otherwise
// (the buffer checks then refuse anything but float64), so that a binding spells its
// kernel call once for both precisions.
template <typename F> auto with_dtype_of(const py::array& a, F&& f) {
  return py::isinstance<py::array_t<float>>(a) ? f(float{}) : f(double{});
}

// CUDA bindings: device pointers arrive as integers (torch's data_ptr()).
template <typename T> T* dev_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The same for the CUDA bindings, which get the element type by name ("float32" or
// "float64").
template <typename F> void with_dtype(const std::string& dtype, F&& f) {
  if (dtype == "float32")
    f(float{});
  else if (dtype == "float64")
    f(double{});
  else
    throw py::type_error("dtype: expected 'float32' or 'float64', got '" + dtype + "'");
}

}  // namespace emdpo_bindings
