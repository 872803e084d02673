// OpenMP loops over records and annotators around the shared per-record math.
//
// Determinism: every reduction is cut into pieces whose boundaries depend only on the data
// (fixed-size chunks of kChunk records), summed sequentially inside a piece and then in
// piece order. The thread count only decides who computes a piece, never how the sums are
// associated, so results are bitwise identical for any OMP_NUM_THREADS. Pieces are handed
// out dynamically: on a busy machine a thread that loses its core does not hold the others
// up at the barrier. Inputs of one piece run on the calling thread alone (waking the others
// for a few hundred records cost milliseconds on a busy machine), and so do all inputs in a
// child forked after the parent's OpenMP threads started (cpu/threads.h).
#include "cpu/listwise_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/listwise.h"
#include "cpu/listwise_isa.h"
#include "cpu/listwise_records.h"

// The baseline build of the record loops (SSE2 on x86-64: 4 float lanes).
EMDPO_DEFINE_RECORD_LOOPS(baseline, 4, 4)

namespace emdpo {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // records per reduction piece; fixed, never thread-dependent
using records::kNoBad;

inline int64_t as_result(int64_t first_bad) { return first_bad == kNoBad ? -1 : first_bad; }

// ---------------------------------------------------------------------------------------
// Instruction-set dispatch. The record loops are compiled three times, for AVX-512 (16
// float lanes), AVX2 (8) and the baseline (4), in separate translation units with their own
// compiler flags, and the best the machine supports is picked once at run time, so a
// portable wheel still uses wide vectors. Every version performs the same IEEE operations
// per record (-ffp-contract=off in CMakeLists.txt: no fused multiply-adds), so results are
// bitwise identical whichever version runs.
enum class Isa { base, avx2, avx512 };

// The best instruction set the machine supports, capped by the environment variable
// EMDPO_CPU_ISA (baseline | avx2 | avx512) when set: for tests and benchmarks that compare
// the versions, and as an escape hatch.
Isa detect_isa() {
  Isa best = Isa::base;
#ifdef EMDPO_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) best = Isa::avx512;
  else if (__builtin_cpu_supports("avx2")) best = Isa::avx2;
#endif
  const char* cap = std::getenv("EMDPO_CPU_ISA");
  if (cap && std::strcmp(cap, "baseline") == 0) return Isa::base;
  if (cap && std::strcmp(cap, "avx2") == 0 && best == Isa::avx512) return Isa::avx2;
  return best;
}

const Isa kIsa = detect_isa();

}  // namespace

const char* cpu_isa() {
  switch (kIsa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

namespace {

// The record loops (cpu/listwise_isa.h) of the instruction set picked above, for element
// type T: the same two calls for every instruction set and precision.
template <typename T>
struct RecordLoops {
  int64_t (*loglik)(const T* p, int64_t M, int64_t K, const T* ref, const int64_t* o,
                    const int64_t* nr, int64_t lo, int64_t hi, T beta, T* out, int64_t stride);
  int64_t (*loglik_grad)(const T* p, const T* ref, const int64_t* o, const int64_t* nr,
                         const T* w, T scale, int64_t lo, int64_t hi, T beta, T* g, T* ll);
};

template <typename T>
RecordLoops<T> record_loops() {
#ifdef EMDPO_X86_DISPATCH
  if (kIsa == Isa::avx512) return {records_loglik_avx512, records_loglik_grad_avx512};
  if (kIsa == Isa::avx2) return {records_loglik_avx2, records_loglik_grad_avx2};
#endif
  return {records_loglik_baseline, records_loglik_grad_baseline};
}

}  // namespace

template <typename T>
int64_t listwise_loglik(const Records<T>& rec, T* out) {
  const int64_t N = rec.N, K = rec.K;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  const RecordLoops<T> loops = record_loops<T>();
  int64_t first_bad = kNoBad;
#pragma omp parallel reduction(min : first_bad) if (use_threads(n_chunks > 1))
  {
    std::vector<T> buf(K * kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(N, lo + kChunk);
      first_bad = std::min(first_bad, loops.loglik(rec.policy, rec.M, K, rec.ref, rec.offsets,
                                                   rec.n_ranked, lo, hi, T(rec.beta),
                                                   buf.data(), kChunk));
      for (int64_t i = lo; i < hi; ++i)
        for (int64_t k = 0; k < K; ++k) out[i * K + k] = buf[k * kChunk + (i - lo)];
    }
  }
  return as_result(first_bad);
}

template <typename T>
int64_t e_step(const Records<T>& rec, const Annotators<T>& ann, const EStepOut<T>& out) {
  const int64_t N = rec.N, K = rec.K, H = ann.H;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  const RecordLoops<T> loops = record_loops<T>();
  // An annotator whose records all fall inside one chunk is finished by that chunk. One
  // that crosses chunk boundaries leaves a partial sum in its first chunk (slot "tail") and
  // in each later chunk it reaches (slot "head"); these are added in chunk order afterwards.
  std::vector<double> head(n_chunks * K, 0.0), tail(n_chunks * K, 0.0);
  std::vector<int64_t> tail_owner(n_chunks, -1);
  std::vector<double> lse(H, 0.0);
  const int64_t* aoff = ann.offsets;
  const T* record_weights = ann.record_weights;
  const double* log_weights = ann.log_weights;
  const double* annotator_weights = ann.weights;
  T* responsibilities = out.responsibilities;
  T* annotator_loglik = out.annotator_loglik;
  int64_t first_bad = kNoBad;

#pragma omp parallel reduction(min : first_bad) if (use_threads(n_chunks > 1))
  {
    std::vector<double> S(K);
    std::vector<T> ll(K * kChunk);  // this chunk's per-record log-likelihoods, type-major
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(N, lo + kChunk);
      first_bad = std::min(first_bad, loops.loglik(rec.policy, rec.M, K, rec.ref, rec.offsets,
                                                   rec.n_ranked, lo, hi, T(rec.beta), ll.data(),
                                                   kChunk));
      if (out.record_ll)
        for (int64_t i = lo; i < hi; ++i)
          for (int64_t k = 0; k < K; ++k) out.record_ll[i * K + k] = ll[k * kChunk + (i - lo)];
      // First annotator with a record at or after lo: the last h with aoff[h] <= lo (it is
      // never an empty one, since an empty annotator at lo is followed by one starting at lo).
      int64_t h = int64_t(std::upper_bound(aoff, aoff + H + 1, lo) - aoff) - 1;
      for (; h < H && aoff[h] < hi; ++h) {
        const int64_t a = aoff[h], b = aoff[h + 1];
        if (a == b) continue;  // annotators without records are finished below
        const int64_t seg_lo = std::max(a, lo), seg_hi = std::min(b, hi);
        for (int64_t k = 0; k < K; ++k) {
          const T* llk = ll.data() + k * kChunk - lo;
          double acc = 0.0;
          if (record_weights) {
            // A record of weight 0 adds exactly nothing, also when its log-likelihood is -inf.
            for (int64_t i = seg_lo; i < seg_hi; ++i)
              acc += weighted(double(record_weights[i]), double(llk[i]));
          } else {
            for (int64_t i = seg_lo; i < seg_hi; ++i) acc += double(llk[i]);
          }
          S[k] = acc;
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
  // Sequential sums in annotator order: the same association for any thread count.
  double total = 0.0;
  if (annotator_weights) {
    // An annotator of weight 0 adds exactly nothing, also when its lse is -inf.
    for (int64_t h = 0; h < H; ++h) total += weighted(annotator_weights[h], lse[h]);
  } else {
    for (int64_t h = 0; h < H; ++h) total += lse[h];
  }
  *out.loglik = total;
  if (double* type_totals = out.type_totals) {
    std::fill(type_totals, type_totals + K, 0.0);
    for (int64_t h = 0; h < H; ++h) {
      const double v = annotator_weights ? annotator_weights[h] : 1.0;
      if (v == 0.0) continue;
      for (int64_t k = 0; k < K; ++k) type_totals[k] += v * double(responsibilities[h * K + k]);
    }
  }
  return as_result(first_bad);
}

template <typename T>
int64_t listwise_dpo_loss_and_grad(const Records<T>& rec, const LossArgs<T>& args) {
  const int64_t N = rec.N, M = rec.M, K = rec.K;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  const RecordLoops<T> loops = record_loops<T>();
  std::vector<double> chunk_loss(n_chunks * K, 0.0);
  int64_t first_bad = kNoBad;
#pragma omp parallel reduction(min : first_bad) if (use_threads(n_chunks > 1))
  {
    std::vector<T> ll(kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(N, lo + kChunk);
      for (int64_t k = 0; k < K; ++k) {
        const T* w = args.weights ? args.weights + k * N : nullptr;
        first_bad = std::min(first_bad, loops.loglik_grad(rec.policy + k * M, rec.ref,
                                                          rec.offsets, rec.n_ranked, w,
                                                          T(args.scale[k]), lo, hi, T(rec.beta),
                                                          args.grad + k * M, ll.data()));
        double acc = 0.0;
        for (int64_t i = lo; i < hi; ++i) {
          // A record of weight 0 adds exactly nothing, also when its ll is -inf.
          const double l_i = -weighted(w ? double(w[i]) : 1.0, double(ll[i - lo]));
          if (args.record_loss) args.record_loss[k * N + i] = T(l_i);
          acc += l_i;
        }
        chunk_loss[c * K + k] = acc;
      }
    }
  }
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double type_total = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) type_total += chunk_loss[c * K + k];
    total += args.scale[k] * type_total;
  }
  *args.loss = total;
  return as_result(first_bad);
}

#define EMDPO_INSTANTIATE(T)                                                                  \
  template int64_t listwise_loglik<T>(const Records<T>&, T*);                                 \
  template int64_t e_step<T>(const Records<T>&, const Annotators<T>&, const EStepOut<T>&);    \
  template int64_t listwise_dpo_loss_and_grad<T>(const Records<T>&, const LossArgs<T>&);
EMDPO_INSTANTIATE(float)
EMDPO_INSTANTIATE(double)
#undef EMDPO_INSTANTIATE

}  // namespace cpu
}  // namespace emdpo
