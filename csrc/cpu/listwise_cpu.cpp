// OpenMP loops over records and annotators around the shared per-record math.
//
// Determinism: every reduction is cut into pieces whose boundaries depend only on the data
// (fixed-size chunks of kChunk records), summed sequentially inside a piece and then in
// piece order. The thread count only decides who computes a piece, never how the sums are
// associated, so results are bitwise identical for any OMP_NUM_THREADS.
#include "cpu/listwise_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/listwise.h"

namespace emdpo {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // records per reduction piece; fixed, never thread-dependent
constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();

inline int64_t ranked_of(const int64_t* n_ranked, int64_t i, int64_t m) {
  return n_ranked ? n_ranked[i] : m - 1;
}

inline int64_t as_result(int64_t first_bad) { return first_bad == kNoBad ? -1 : first_bad; }

}  // namespace

template <typename T>
int64_t listwise_loglik(const T* policy, const T* ref, const int64_t* offsets,
                        const int64_t* n_ranked, int64_t N, int64_t M, int64_t K, double beta,
                        T* out) {
  using A = typename compute_type<T>::type;
  int64_t first_bad = kNoBad;
#pragma omp parallel for schedule(static) reduction(min : first_bad)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t off = offsets[i];
    const int64_t m = offsets[i + 1] - off;
    const int64_t L = ranked_of(n_ranked, i, m);
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      out[i * K + k] = T(record_loglik<A>(policy + k * M + off, ref + off, m, L, A(beta), finite));
    }
    if (!finite) first_bad = std::min(first_bad, i);
  }
  return as_result(first_bad);
}

template <typename T>
int64_t e_step(const T* policy, const T* ref, const int64_t* offsets, const int64_t* n_ranked,
               const T* record_weights, const int64_t* annotator_offsets,
               const double* log_weights, int64_t N, int64_t M, int64_t K, int64_t H,
               double beta, T* responsibilities, T* annotator_loglik, double* loglik,
               T* record_ll) {
  using A = typename compute_type<T>::type;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  // An annotator whose records all fall inside one chunk is finished by that chunk. One
  // that crosses chunk boundaries leaves a partial sum in its first chunk (slot "tail") and
  // in each later chunk it reaches (slot "head"); these are added in chunk order afterwards.
  std::vector<double> head(n_chunks * K, 0.0), tail(n_chunks * K, 0.0);
  std::vector<int64_t> tail_owner(n_chunks, -1);
  std::vector<double> lse(H, 0.0);
  const int64_t* aoff = annotator_offsets;
  int64_t first_bad = kNoBad;

#pragma omp parallel reduction(min : first_bad)
  {
    std::vector<double> S(K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(N, lo + kChunk);
      // First annotator with a record at or after lo: the last h with aoff[h] <= lo that
      // still has records beyond lo.
      int64_t h = int64_t(std::upper_bound(aoff, aoff + H + 1, lo) - aoff) - 1;
      for (; h < H && aoff[h] < hi; ++h) {
        const int64_t a = aoff[h], b = aoff[h + 1];
        if (a == b) continue;  // annotators without records are finished below
        std::fill(S.begin(), S.end(), 0.0);
        const int64_t seg_lo = std::max(a, lo), seg_hi = std::min(b, hi);
        for (int64_t i = seg_lo; i < seg_hi; ++i) {
          const int64_t off = offsets[i];
          const int64_t m = offsets[i + 1] - off;
          const int64_t L = ranked_of(n_ranked, i, m);
          const double c_i = record_weights ? double(record_weights[i]) : 1.0;
          bool finite = true;
          for (int64_t k = 0; k < K; ++k) {
            const A ll = record_loglik<A>(policy + k * M + off, ref + off, m, L, A(beta), finite);
            if (record_ll) record_ll[i * K + k] = T(ll);
            S[k] += c_i * double(ll);
          }
          if (!finite) first_bad = std::min(first_bad, i);
        }
        if (a >= lo && b <= hi) {
          lse[h] = finish_annotator<T>(S.data(), log_weights, K, responsibilities + h * K,
                                       annotator_loglik + h * K);
        } else if (a < lo) {
          std::copy(S.begin(), S.end(), head.begin() + c * K);
        } else {
          std::copy(S.begin(), S.end(), tail.begin() + c * K);
          tail_owner[c] = h;
        }
      }
    }
  }

  // Annotators that cross chunks: their first piece, then the following chunks' heads.
  std::vector<double> S(K);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t h = tail_owner[c];
    if (h < 0) continue;
    std::copy(tail.begin() + c * K, tail.begin() + (c + 1) * K, S.begin());
    const int64_t last_chunk = (aoff[h + 1] - 1) / kChunk;
    for (int64_t c2 = c + 1; c2 <= last_chunk; ++c2)
      for (int64_t k = 0; k < K; ++k) S[k] += head[c2 * K + k];
    lse[h] = finish_annotator<T>(S.data(), log_weights, K, responsibilities + h * K,
                                 annotator_loglik + h * K);
  }
  // Annotators with no records: posterior = prior.
  std::fill(S.begin(), S.end(), 0.0);
  for (int64_t h = 0; h < H; ++h) {
    if (aoff[h] == aoff[h + 1])
      lse[h] = finish_annotator<T>(S.data(), log_weights, K, responsibilities + h * K,
                                   annotator_loglik + h * K);
  }
  double total = 0.0;
  for (int64_t h = 0; h < H; ++h) total += lse[h];
  *loglik = total;
  return as_result(first_bad);
}

template <typename T>
int64_t listwise_dpo_loss_and_grad(const T* policy, const T* ref, const int64_t* offsets,
                                   const int64_t* n_ranked, const T* weights,
                                   const double* scale, int64_t N, int64_t M, int64_t K,
                                   double beta, double* loss, T* grad, T* record_loss) {
  using A = typename compute_type<T>::type;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  std::vector<double> chunk_loss(n_chunks * K, 0.0);
  int64_t first_bad = kNoBad;
#pragma omp parallel for schedule(static) reduction(min : first_bad)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(N, lo + kChunk);
    for (int64_t k = 0; k < K; ++k) {
      const T* p = policy + k * M;
      T* g = grad + k * M;
      const T* w = weights ? weights + k * N : nullptr;
      double acc = 0.0;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t off = offsets[i];
        const int64_t m = offsets[i + 1] - off;
        const int64_t L = ranked_of(n_ranked, i, m);
        const A w_i = w ? A(w[i]) : A(1);
        bool finite = true;
        // d loss / d logpi = -scale_k * w_i * d ll / d logpi.
        const A ll = record_loglik_grad<A>(p + off, ref + off, m, L, A(beta),
                                           A(-scale[k]) * w_i, g + off, finite);
        const double l_i = -double(w_i) * double(ll);
        if (record_loss) record_loss[k * N + i] = T(l_i);
        acc += l_i;
        if (!finite) first_bad = std::min(first_bad, i);
      }
      chunk_loss[c * K + k] = acc;
    }
  }
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double type_total = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) type_total += chunk_loss[c * K + k];
    total += scale[k] * type_total;
  }
  *loss = total;
  return as_result(first_bad);
}

#define EMDPO_INSTANTIATE(T)                                                                  \
  template int64_t listwise_loglik<T>(const T*, const T*, const int64_t*, const int64_t*,     \
                                      int64_t, int64_t, int64_t, double, T*);                 \
  template int64_t e_step<T>(const T*, const T*, const int64_t*, const int64_t*, const T*,    \
                             const int64_t*, const double*, int64_t, int64_t, int64_t,        \
                             int64_t, double, T*, T*, double*, T*);                           \
  template int64_t listwise_dpo_loss_and_grad<T>(const T*, const T*, const int64_t*,          \
                                                 const int64_t*, const T*, const double*,     \
                                                 int64_t, int64_t, int64_t, double, double*,  \
                                                 T*, T*);
EMDPO_INSTANTIATE(float)
EMDPO_INSTANTIATE(double)

}  // namespace cpu
}  // namespace emdpo
