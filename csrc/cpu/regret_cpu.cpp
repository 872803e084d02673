// OpenMP reduction of the MMRA regret matrix.
//
// Determinism: each source's samples are cut into fixed chunks of kChunk samples (the cut
// depends only on source_offsets). A chunk's sum for one type is accumulated sequentially in
// double; the chunk sums of a source are then added in chunk order by one thread. The thread
// count only decides who computes a chunk, never how sums are associated, so R is bitwise
// identical for any OMP_NUM_THREADS (and in a forked child, which runs serially:
// cpu/threads.h).
#include "cpu/regret_cpu.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/regret.h"
#include "cpu/threads.h"

namespace emdpo {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;  // samples per reduction piece; fixed, never thread-dependent
// Below this many terms (K * S, well under a millisecond of work) the loop runs on one
// thread: waking a team costs more than it saves, and on a loaded machine a descheduled
// worker stalls the join by a whole time slice (measured: 8 ms instead of 0.04 ms for
// K * S = 8e4 on 2 busy cores). The cut only decides who computes; sums are unchanged.
constexpr int64_t kParallelMinTerms = int64_t(1) << 18;
constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();

}  // namespace

template <typename T>
int64_t regret_matrix(const T* lp, const T* ref, const int64_t* source_offsets, const T* w,
                      int64_t K, int64_t S, int kind, double beta, double* R) {
  // The chunk table: chunk c covers samples [lo[c], hi[c]) of source src[c]; a source's
  // chunks are consecutive, starting at first_chunk[j].
  std::vector<int64_t> first_chunk(K + 1, 0);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t n = source_offsets[j + 1] - source_offsets[j];
    first_chunk[j + 1] = first_chunk[j] + (n + kChunk - 1) / kChunk;
  }
  const int64_t n_chunks = first_chunk[K];
  std::vector<int64_t> src(n_chunks), lo(n_chunks), hi(n_chunks);
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t c = first_chunk[j]; c < first_chunk[j + 1]; ++c) {
      src[c] = j;
      lo[c] = source_offsets[j] + (c - first_chunk[j]) * kChunk;
      hi[c] = std::min(source_offsets[j + 1], lo[c] + kChunk);
    }
  }

  std::vector<double> part(n_chunks * K, 0.0);  // part[c * K + k]: chunk sum for type k
  std::vector<double> wsum(n_chunks, 0.0);      // chunk sum of the weights
  int64_t first_bad = kNoBad;

#pragma omp parallel for collapse(2) schedule(static) reduction(min : first_bad) \
    if (use_threads(K * S >= kParallelMinTerms))
  for (int64_t c = 0; c < n_chunks; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = src[c];
      double acc = 0.0;
      if (w) {
        for (int64_t s = lo[c]; s < hi[c]; ++s)
          acc += double(w[s]) * regret_term(kind, lp, ref, S, k, j, s);
      } else {
        for (int64_t s = lo[c]; s < hi[c]; ++s) acc += regret_term(kind, lp, ref, S, k, j, s);
      }
      // A finite chunk sum means every term was finite (inf and NaN propagate), so the
      // per-sample test only runs on the error path.
      if (!regret_finite(acc)) {
        int64_t bad = lo[c];  // an overflow of finite terms points at the chunk start
        for (int64_t s = lo[c]; s < hi[c]; ++s) {
          if (!regret_finite(regret_term(kind, lp, ref, S, k, j, s))) {
            bad = s;
            break;
          }
        }
        first_bad = std::min(first_bad, bad);
      }
      part[c * K + k] = acc;
      if (k == 0) {
        double v = 0.0;
        if (w) {
          for (int64_t s = lo[c]; s < hi[c]; ++s) v += double(w[s]);
        } else {
          v = double(hi[c] - lo[c]);
        }
        wsum[c] = v;
      }
    }
  }

  if (first_bad != kNoBad) return first_bad;  // R is meaningless; the caller raises

  // mean[k * K + j], then the entries (reward needs the diagonal of the means first).
  std::vector<double> mean(K * K, 0.0);
  for (int64_t j = 0; j < K; ++j) {
    double V = 0.0;
    for (int64_t c = first_chunk[j]; c < first_chunk[j + 1]; ++c) V += wsum[c];
    for (int64_t k = 0; k < K; ++k) {
      double total = 0.0;
      for (int64_t c = first_chunk[j]; c < first_chunk[j + 1]; ++c) total += part[c * K + k];
      mean[k * K + j] = total / V;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < K; ++j) {
      const double r = regret_entry(kind, beta, mean[k * K + j], mean[k * K + k]);
      R[k * K + j] = r;
      if (!regret_finite(r)) first_bad = std::min(first_bad, source_offsets[j]);
    }
  }
  return first_bad == kNoBad ? -1 : first_bad;
}

template int64_t regret_matrix<float>(const float*, const float*, const int64_t*, const float*,
                                      int64_t, int64_t, int, double, double*);
template int64_t regret_matrix<double>(const double*, const double*, const int64_t*,
                                       const double*, int64_t, int64_t, int, double, double*);

}  // namespace cpu
}  // namespace emdpo
