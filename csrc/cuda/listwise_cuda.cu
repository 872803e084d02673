// CUDA kernels over records and annotators. The per-record math is csrc/cuda/record2.cuh:
// the formulas of common/listwise.h (docs/math.md) in base 2, so that float code runs on
// the hardware's exp2/log2/reciprocal approximations.
//
// Work layout. Records are cut into tiles of kTile consecutive records; one block of kTile
// threads handles a tile, one thread per record. A thread loads its record's layout
// (offset, length, ranking depth, weight, annotator) and reference log-probs once, then
// walks the K types, so consecutive threads read consecutive records of one type row.
// Lists of up to kShortMax slots are processed in registers by code specialised for the
// exact length 2, 3 or 4, or for any length up to 8; longer lists take a loop.
//
// The memory floor. Both big kernels are built to move each input byte once and keep the
// instruction count per (record, type) small (see benchmarks/README.md, "Bandwidth model"):
// the loss does one block reduction per tile (not per type); the E-step handles the types
// in groups of kGroupTypes with all of a group's loads issued before its one barrier, and
// for K <= kGroupTypes finishes every annotator that lies inside a tile in the tile kernel
// (posteriors, annotator log-likelihoods, the log-normaliser, the type totals), so nothing
// per annotator goes through device memory twice.
//
// Determinism. No floating-point atomics anywhere. Every sum is cut into pieces whose
// boundaries depend only on the sizes and the data layout (tiles of kTile records, groups
// of kGroup tiles, blocks of kSumThreads values), each piece is added up in a fixed order
// (warp shuffle trees with fixed offsets, then warps in index order), and pieces are added
// in index order. Nothing depends on scheduling, so results are bitwise the same run to run.
// The only atomic is an integer atomicMin on first_bad (a min does not depend on order).
//
// E-step reduction per annotator (S_hk = sum_i c_i ll_ik), parallel for any annotator sizes:
//   1. e_step_tiles: inside each tile, a segmented reduction by annotator (warp shuffle
//      suffix scan, skipped when no two records of a warp share an annotator; then a short
//      walk over the following warps' heads). An annotator that lies inside the tile is
//      complete there. With K <= kGroupTypes its head thread finishes it on the spot; with
//      more types its sums go to S (H, K) in the workspace. One crossing the tile's left edge
//      leaves its in-tile sum in first_part[k][tile], one that starts in the tile and crosses
//      its right edge leaves it in last_part[k][tile]. Annotators with no records are
//      finished by the thread whose record follows them (or the last tile's thread 0).
//   2. e_step_group_sums: group_sum[k][g] = sum of first_part over the kGroup tiles of g.
//   3. e_step_cross: one warp per tile; the warp of the tile where a crossing annotator
//      starts adds last_part of that tile, first_part of the following tiles up to its
//      last tile, using group_sum for whole groups in between, then finishes it (K <=
//      kGroupTypes) or writes its row of S.
//   4. K > kGroupTypes only: e_step_finish, one warp per annotator with the lanes over the
//      types (coalesced rows), blocks of kSumThreads/32 * 32 annotators.
//   5. e_step_sum: one block adds the per-tile (or per-finish-block) parts of the
//      log-likelihood and of the type totals, in index order.
// Workspace (caller-allocated, size from (N, H, K) alone): about 3K + 2 doubles per tile,
// plus S (H*K doubles) only when K > kGroupTypes; nothing is allocated here.
#include "cuda/listwise_cuda.h"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/record2.cuh"

namespace emdpo {
namespace cuda {
namespace {

using base2::kShortMax;

constexpr int kTile = 256;         // records per tile = threads per record-parallel block
constexpr int kWarps = kTile / 32;
constexpr int kGroupTypes = 8;     // types per pass of the E-step: registers and staging
constexpr int kGroup = 256;        // tiles per group (second level of the E-step reduction)
constexpr int kSumThreads = 256;   // threads of the reduction blocks
constexpr unsigned kFull = 0xffffffffu;

static_assert(kTile % 32 == 0 && kTile >= 64, "a tile is whole warps, at least two");
static_assert(kSumThreads % 32 == 0, "reduction blocks are whole warps");
static_assert(kTile == kSumThreads, "tile kernels use block_sum");

template <typename T> struct compute_type { using type = T; };

// ---------------------------------------------------------------------------------------
// Host helpers

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("emdpo_core CUDA kernel ") + kernel +
                             " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

void check_call(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("emdpo_core CUDA call ") + what +
                             " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

void check_size(int64_t v, const char* name) {
  if (v < 0) throw std::invalid_argument(std::string(name) + ": expected >= 0, got " +
                                         std::to_string(v));
}

// Record lengths are kept in int on the device.
void check_slots(int64_t M) {
  check_size(M, "M");
  if (M > INT_MAX)
    throw std::invalid_argument("M: the CUDA kernels take at most 2^31-1 slots, got " +
                                std::to_string(M));
}

void check_ptr(const void* p, const char* name) {
  if (p == nullptr)
    throw std::invalid_argument(std::string(name) + ": null device pointer");
}

template <typename T>
void check_records(const Records<T>& rec) {
  check_ptr(rec.policy, "policy_logps");
  check_ptr(rec.ref, "ref_logps");
  check_ptr(rec.offsets, "offsets");
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid sizes are int: refuse sizes whose grid would not fit rather than truncate.
unsigned grid_size(int64_t blocks, const char* kernel) {
  if (blocks > INT_MAX)
    throw std::invalid_argument(std::string("emdpo_core CUDA kernel ") + kernel +
                                ": problem too large (" + std::to_string(blocks) + " blocks)");
  return unsigned(blocks);
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Workspace carving: each array starts on a 256-byte boundary.
constexpr size_t kAlign = 256;
size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// With a null base it only counts bytes (workspace size queries).
struct Carver {
  char* base;
  size_t used = 0;
  template <typename U> U* take(int64_t count) {
    U* p = base ? reinterpret_cast<U*>(base + used) : nullptr;
    used += aligned(size_t(count) * sizeof(U));
    return p;
  }
};

void check_workspace(const void* ws, size_t have, size_t need, const char* fn) {
  if (have < need)
    throw std::invalid_argument(std::string(fn) + ": workspace of " + std::to_string(have) +
                                " bytes, need " + std::to_string(need));
  if (need > 0 && ws == nullptr)
    throw std::invalid_argument(std::string(fn) + ": null workspace");
}

// ---------------------------------------------------------------------------------------
// Device helpers

struct Record {
  int64_t off;
  int m, L;  // record lengths are at most M, and the entry points refuse M > INT_MAX
};

__device__ __forceinline__ Record load_record(const int64_t* __restrict__ offsets,
                                              const int64_t* __restrict__ n_ranked, int64_t i) {
  Record r;
  r.off = offsets[i];
  r.m = int(offsets[i + 1] - r.off);
  r.L = n_ranked ? int(n_ranked[i]) : r.m - 1;
  return r;
}

// Largest h in [lo, hi] with aoff[h] <= i (aoff[lo] <= i is the caller's promise). With
// lo = 0, hi = H-1 this is the annotator that owns record i: empty annotators have
// aoff[h] == aoff[h+1], so the largest such h is never empty.
__device__ __forceinline__ int64_t owner(const int64_t* __restrict__ aoff, int64_t lo,
                                         int64_t hi, int64_t i) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (aoff[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// The same search started from a guess g in [lo, hi]: check g, then gallop away from it
// (steps 1, 2, 4, ...) until the answer is bracketed, then bisect the bracket. With a good
// guess (records spread evenly over annotators, or one annotator per record) it costs two
// loads instead of log2(hi - lo) dependent ones: the tile kernel's prologue is latency.
__device__ __forceinline__ int64_t owner_from(const int64_t* __restrict__ aoff, int64_t lo,
                                              int64_t hi, int64_t i, int64_t g) {
  g = g < lo ? lo : (g > hi ? hi : g);
  if (aoff[g] <= i) {  // the answer is in [g, hi]
    int64_t step = 1;
    while (g + step <= hi && aoff[g + step] <= i) {
      g += step;
      step *= 2;
    }
    return owner(aoff, g, min(hi, g + step - 1), i);
  }
  int64_t step = 1;  // the answer is in [lo, g - 1]
  int64_t top = g - 1;
  while (top - step >= lo && aoff[top - step + 1] > i) {
    top -= step;
    step *= 2;
  }
  return owner(aoff, max(lo, top - step + 1), top, i);
}

// Sum over a warp in a fixed tree; the result is valid in lane 0.
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) x += __shfl_down_sync(kFull, x, s);
  return x;
}

// Sum over a block of kSumThreads threads, valid in thread 0. `scratch` is one of two
// alternating buffers of kSumThreads/32 doubles: consecutive calls must alternate, so that a
// single barrier per call suffices (a buffer is rewritten only after every thread has
// passed the next call's barrier, hence finished reading it).
__device__ __forceinline__ double block_sum(double x, double* scratch) {
  x = warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kSumThreads / 32; ++w) total += scratch[w];
  return total;
}

// Rows of a stage in shared memory: one more than the types of a group, so that threads
// reading their own rows column by column hit distinct banks.
constexpr int kStageStride = kGroupTypes + 1;

// Writes a staged (n_rows x n_cols) block of an (., K) row-major output: stage holds row r
// at stage[r * kStageStride], dst points at the block's first element. When n_cols == K the
// block is one contiguous range and the stores are fully coalesced.
template <typename T>
__device__ __forceinline__ void store_staged(const T* stage, int n_rows, int n_cols, T* dst,
                                             int64_t K) {
  for (int e = threadIdx.x; e < n_rows * n_cols; e += blockDim.x) {
    const int r = e / n_cols, c = e - r * n_cols;
    dst[int64_t(r) * K + c] = stage[r * kStageStride + c];
  }
}

__device__ __forceinline__ void flag_non_finite(unsigned long long* first_bad, int64_t i) {
  atomicMin(first_bad, static_cast<unsigned long long>(i));
}

// ---------------------------------------------------------------------------------------
// Per-record work over a group of types (E-step, loglik): ll[c] for types k0 + c, c < kc.
// `p` points at the record's first slot in row k0. Every load of the group is issued
// before the first exp2 (the short paths are fully unrolled).

// Register words of rewards loaded at once: batches of types whose loads are all issued
// before the first exp2 of the batch, and that keep the kernels within their register
// budget (no spills).
constexpr int kLoadWords = 8;

// One list-length path over a group of types. KC > 0: a full group of KC types, known at
// compile time (no guards, all loads of a batch issued together); KC == 0: the last,
// partial group of kc types. Writes ll of type t to out[t * stride] (shared memory) and
// returns false when a reward was not finite.
template <int MM, bool EXACT, int KC, typename A, typename T>
__device__ __forceinline__ bool group_loglik_short(const T* __restrict__ p,
                                                   const T* __restrict__ ref, int64_t M, int m,
                                                   int L, int kc, A c, A* out, int stride) {
  constexpr int kWordsPerType = MM * int(sizeof(A) / 4);
  constexpr int B0 = kLoadWords / kWordsPerType;
  constexpr int B = B0 < 1 ? 1 : (B0 > kGroupTypes ? kGroupTypes : B0);
  bool finite = true;
  A rf[MM];
#pragma unroll
  for (int j = 0; j < MM; ++j)
    if (EXACT || j < m) rf[j] = A(ref[j]);
#pragma unroll
  for (int t0 = 0; t0 < kGroupTypes; t0 += B) {
    A r[B][MM];
#pragma unroll
    for (int u = 0; u < B; ++u)
      if (t0 + u < kGroupTypes && (KC > 0 ? t0 + u < KC : t0 + u < kc))
        base2::load_rewards<MM, EXACT>(p + (t0 + u) * M, rf, m, c, r[u], finite);
#pragma unroll
    for (int u = 0; u < B; ++u)
      if (t0 + u < kGroupTypes && (KC > 0 ? t0 + u < KC : t0 + u < kc))
        out[(t0 + u) * stride] = base2::short_loglik<MM, EXACT>(r[u], m, L);
  }
  return finite;
}

// The less common shapes are real calls (not inlined): inlined side by side with the
// common ones, ptxas if-converts the paths into one predicated sequence whose registers add
// up, and spills.
template <int MM, bool EXACT, int KC, typename... Args>
__device__ __noinline__ bool group_loglik_call(Args... args) {
  return group_loglik_short<MM, EXACT, KC>(args...);
}

template <typename A, typename T>
__device__ __noinline__ bool group_loglik_long(const T* __restrict__ p, const T* __restrict__ ref,
                                               int64_t M, int m, int L, int kc, A c, A* out,
                                               int stride) {
  bool finite = true;
  for (int t = 0; t < kc; ++t)
    out[t * stride] = base2::long_loglik<A>(p + t * M, ref, m, L, c, finite);
  return finite;
}

// ll of types k0 + c (c < kc) of one record into out[c * stride]; `p` points at the
// record's first slot in row k0. Lists of 4 (the common ranking length) in full groups are
// inlined; everything else is a call.
template <typename A, typename T>
__device__ __forceinline__ bool group_loglik(const T* __restrict__ p, const T* __restrict__ ref,
                                             int64_t M, const Record& rec, int kc, A c, A* out,
                                             int stride) {
  const int m = rec.m, L = rec.L;
  if (kc == kGroupTypes) {
    if (m == 4) return group_loglik_short<4, true, kGroupTypes>(p, ref, M, m, L, kc, c, out, stride);
    if (m == 2) return group_loglik_call<2, true, kGroupTypes>(p, ref, M, m, L, kc, c, out, stride);
    if (m == 3) return group_loglik_call<3, true, kGroupTypes>(p, ref, M, m, L, kc, c, out, stride);
    if (m <= kShortMax)
      return group_loglik_call<kShortMax, false, kGroupTypes>(p, ref, M, m, L, kc, c, out, stride);
  } else {
    if (m == 4) return group_loglik_call<4, true, 0>(p, ref, M, m, L, kc, c, out, stride);
    if (m == 2) return group_loglik_call<2, true, 0>(p, ref, M, m, L, kc, c, out, stride);
    if (m == 3) return group_loglik_call<3, true, 0>(p, ref, M, m, L, kc, c, out, stride);
    if (m <= kShortMax)
      return group_loglik_call<kShortMax, false, 0>(p, ref, M, m, L, kc, c, out, stride);
  }
  return group_loglik_long<A>(p, ref, M, m, L, kc, c, out, stride);
}

// ---------------------------------------------------------------------------------------
// listwise_loglik: out[i, k] = ll_ik.

// Bounds as for e_step_tiles_kernel (the same per-record code).
template <typename T>
__global__ void __launch_bounds__(kTile, sizeof(T) == sizeof(float) ? 2 : 1)
    listwise_loglik_kernel(const T* __restrict__ policy, const T* __restrict__ ref,
                           const int64_t* __restrict__ offsets,
                           const int64_t* __restrict__ n_ranked, int64_t N, int64_t M,
                           int64_t K, double beta, T* __restrict__ out,
                           unsigned long long* first_bad) {
  using A = typename compute_type<T>::type;
  __shared__ T stage[kTile * kStageStride];
  const int64_t lo = int64_t(blockIdx.x) * kTile;
  const int n_in = int(min(int64_t(kTile), N - lo));
  const int r = threadIdx.x;
  const bool active = r < n_in;
  const int64_t i = lo + r;
  const Record rec = active ? load_record(offsets, n_ranked, i) : Record{0, 0, 0};
  const A c = A(beta * base2::kLog2e);
  bool finite = true;
  for (int64_t k0 = 0; k0 < K; k0 += kGroupTypes) {
    const int kc = int(min(int64_t(kGroupTypes), K - k0));
    if (active)
      finite &= group_loglik(policy + k0 * M + rec.off, ref + rec.off, M, rec, kc, c,
                             stage + r * kStageStride, 1);
    __syncthreads();
    store_staged(stage, n_in, kc, out + lo * K + k0, K);
    __syncthreads();  // the stage is rewritten by the next group
  }
  if (active && !finite) flag_non_finite(first_bad, i);
}

// ---------------------------------------------------------------------------------------
// E-step

struct EStepScratch {
  double* S;              // (H, K) per-annotator sums; only when K > kGroupTypes
  double* first_part;     // (K, n_tiles) in-tile sum of the annotator crossing the left edge
  double* last_part;      // (K, n_tiles) in-tile sum of the annotator crossing the right edge
  double* group_sum;      // (K, n_groups) sums of first_part over groups of kGroup tiles
  int64_t* tile_owner;    // (n_tiles,) annotator of each tile's last record
  double* lse_part;       // (n_parts,) sums of v_h * lse_h, one per tile or finish block
  double* tot_part;       // (K, n_parts) sums of v_h * g_hk
  int64_t n_tiles, n_groups, n_parts;
  bool fused;             // K <= kGroupTypes: annotators finished in the tile/cross kernels
};

constexpr int kFinishAnnotators = kSumThreads;  // annotators per finish block (K > 8)

EStepScratch carve_e_step(void* workspace, int64_t N, int64_t H, int64_t K, size_t* bytes) {
  EStepScratch s;
  s.fused = K <= kGroupTypes;
  s.n_tiles = ceil_div(N, kTile);
  s.n_groups = ceil_div(s.n_tiles, kGroup);
  s.n_parts = s.fused ? (s.n_tiles > 0 ? s.n_tiles : 1) : ceil_div(H, kFinishAnnotators);
  Carver c{static_cast<char*>(workspace)};
  s.S = s.fused ? nullptr : c.take<double>(H * K);
  s.first_part = c.take<double>(K * s.n_tiles);
  s.last_part = c.take<double>(K * s.n_tiles);
  s.group_sum = c.take<double>(K * s.n_groups);
  s.tile_owner = c.take<int64_t>(s.n_tiles);
  s.lse_part = c.take<double>(s.n_parts);
  s.tot_part = c.take<double>(K * s.n_parts);
  *bytes = c.used;
  return s;
}

// Finish one annotator from its per-type sums S[k * stride] (k < K <= kGroupTypes):
// log g_k = log eta_k + S_k - lse, lse = logsumexp_j (log eta_j + S_j). Writes the rows,
// adds v * lse to lse_acc and v * g_k to tot[k]. The offsets log eta_k + S_k - max are
// formed in double; float outputs then take the exponentials and the log through the
// base-2 approximations (relative error ~1e-6 for every g_k above 1e-30), double outputs
// through the accurate exp/log. EMPTY: an annotator with no records (S = 0, the posterior
// is the prior; S is not read).
template <typename T, bool EMPTY>
__device__ __forceinline__ void finish_annotator(const double* S, int stride,
                                                 const double* __restrict__ lw, int K,
                                                 double v, T* __restrict__ resp_row,
                                                 T* __restrict__ annot_row, double& lse_acc,
                                                 double (&tot)[kGroupTypes], bool want_totals) {
  const bool full = K == kGroupTypes;  // the common case: no per-type guards
  double x[kGroupTypes];
  double mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < kGroupTypes; ++k) {
    x[k] = -INFINITY;
    if (full || k < K) {
      x[k] = lw[k] + (EMPTY ? 0.0 : S[k * stride]);
      mx = x[k] > mx ? x[k] : mx;
    }
  }
  constexpr bool kFloat = sizeof(T) == sizeof(float);
  double lse;
  T g[kGroupTypes];
  if (kFloat) {
    // g_k = 2^((x_k - mx) log2 e) / z: one exp2 per type, one log2 and one reciprocal.
    float e[kGroupTypes], z = 0.0f;
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) {
      e[k] = 0.0f;
      if (full || k < K) e[k] = base2::ex2(float(x[k] - mx) * float(base2::kLog2e));
      z += e[k];
    }
    lse = mx + base2::kLn2 * double(base2::lg2(z));
    const float inv_z = base2::rcp(z);
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) g[k] = T(e[k] * inv_z);
  } else {
    double z = 0.0;
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k)
      if (full || k < K) z += exp(x[k] - mx);
    lse = mx + log(z);
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) g[k] = T((full || k < K) ? exp(x[k] - lse) : 0.0);
  }
  if (want_totals) {
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) tot[k] += v * double(g[k]);  // g = 0 for k >= K
  }
  T a[kGroupTypes];
#pragma unroll
  for (int k = 0; k < kGroupTypes; ++k) a[k] = T(EMPTY || !(full || k < K) ? 0.0 : S[k * stride]);
  if (kFloat && full &&
      ((reinterpret_cast<uintptr_t>(resp_row) | reinterpret_cast<uintptr_t>(annot_row)) & 15) == 0) {
    // Rows of 8 floats are 32 bytes: two 16-byte stores each.
    float4* rr = reinterpret_cast<float4*>(resp_row);
    float4* ar = reinterpret_cast<float4*>(annot_row);
    rr[0] = make_float4(float(g[0]), float(g[1]), float(g[2]), float(g[3]));
    rr[1] = make_float4(float(g[4]), float(g[5]), float(g[6]), float(g[7]));
    ar[0] = make_float4(float(a[0]), float(a[1]), float(a[2]), float(a[3]));
    ar[1] = make_float4(float(a[4]), float(a[5]), float(a[6]), float(a[7]));
  } else {
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) {
      if (full || k < K) {
        resp_row[k] = g[k];
        annot_row[k] = a[k];
      }
    }
  }
  lse_acc += weighted(v, lse);
}

// Tile sums of v*g_k (k < K <= kGroupTypes) over the block's threads into
// tot_part[k * n_parts + part]: a transpose through shared memory, then warp k sums
// column k (rows lane, lane+32, ... in order, then a shuffle tree). Fixed order.
__device__ __forceinline__ void block_type_totals(const double (&tot)[kGroupTypes], int K,
                                                  double* s_tot, double* tot_part,
                                                  int64_t n_parts, int64_t part) {
  static_assert(kWarps == kGroupTypes, "one warp per type column");
  const int r = threadIdx.x, lane = r & 31, warp = r >> 5;
#pragma unroll
  for (int k = 0; k < kGroupTypes; ++k) s_tot[k * kTile + r] = tot[k];
  __syncthreads();
  if (warp < K) {
    double x = 0.0;
    for (int j = lane; j < kTile; j += 32) x += s_tot[warp * kTile + j];
    x = warp_sum(x);
    if (lane == 0) tot_part[warp * n_parts + part] = x;
  }
}

// Segment kinds and the bits of the tile kernel's packed per-thread layout state.
enum : unsigned { kInTile = 0, kFirst = 1, kLast = 2 };
enum : unsigned {
  kStHead = 1u,        // the thread's record starts a segment (annotator run) of the tile
  kStZeroFirst = 2u,   // thread 0, whose annotator starts at the tile: first_part = 0
  kStStarts = 4u,      // the head's annotator starts at this record
  kStKindShift = 3,    // 2 bits: kInTile, kFirst, kLast
  kStFollowShift = 5,  // 4 bits: following warps whose first record is the same annotator
  kStAddShift = 9,     // 5 bits: the suffix scan's add mask
};
// Read off the packed state where used (not kept in registers of their own).
__device__ __forceinline__ bool st_head(unsigned st) { return st & kStHead; }
__device__ __forceinline__ unsigned st_kind(unsigned st) { return (st >> kStKindShift) & 3u; }
__device__ __forceinline__ int st_follow(unsigned st) { return int((st >> kStFollowShift) & 15u); }

// The packed layout state of thread r once s_owner holds every record's annotator (-1 for
// inactive threads). Warp suffix scan: at step b a lane adds lane (lane + 2^b)'s partial
// when it is in the same annotator, so that after 5 steps each lane holds the sum from
// itself to the end of its annotator or of its warp, whichever comes first.
__device__ __forceinline__ unsigned layout_state(const int64_t* s_owner,
                                                 const int64_t* __restrict__ aoff, int r,
                                                 bool active, int64_t lo, int64_t hi) {
  const int lane = r & 31, warp = r >> 5;
  const int64_t h = s_owner[r];
  unsigned st = 0, add_mask = 0;
  if (active) {
#pragma unroll
    for (int b = 0; b < 5; ++b)
      if (lane + (1 << b) < 32 && s_owner[r + (1 << b)] == h) add_mask |= 1u << b;
  }
  st |= add_mask << kStAddShift;
  if (active && (r == 0 || s_owner[r - 1] != h)) {  // a segment head
    int n_follow = 0;  // following warps whose first record still belongs to h
    while (warp + n_follow + 1 < kWarps && s_owner[(warp + n_follow + 1) * 32] == h) ++n_follow;
    const int64_t a_h = aoff[h], b_h = aoff[h + 1];
    const unsigned kind = (a_h >= lo && b_h <= hi) ? kInTile : (a_h < lo ? kFirst : kLast);
    st |= kStHead | (kind << kStKindShift) | (unsigned(n_follow) << kStFollowShift);
    if (r == 0 && a_h >= lo) st |= kStZeroFirst;
    if (a_h >= lo) st |= kStStarts;
  }
  return st;
}

// Per type of a group (FULL: all kGroupTypes, known at compile time): x = c_i * ll, the
// warp's segmented suffix scan (skipped when no two records of the warp share an
// annotator), the warp's first lane's partial to s_head_warp[c * kWarps], and a segment
// head's partial to S[c * kTile] (read back after the barrier, so that no double array
// lives in registers across it). ll: the thread's row of the stage.
template <bool FULL, typename A>
__device__ __forceinline__ void scan_group(const A* ll, double cw, int kc, bool scan, unsigned st,
                                           bool head, int lane, double* s_head_warp, double* S) {
#pragma unroll
  for (int c = 0; c < kGroupTypes; ++c) {
    if (FULL || c < kc) {
      double x = weighted(cw, double(ll[c]));  // weight 0: exactly 0, also for ll = -inf
      if (scan) {
#pragma unroll
        for (int b = 0; b < 5; ++b) {
          const double y = __shfl_down_sync(kFull, x, 1 << b);
          if (st & (1u << (kStAddShift + b))) x += y;
        }
      }
      if (lane == 0) s_head_warp[c * kWarps] = x;
      if (head) S[c * kTile] = x;
    }
  }
}

// float: at least 2 resident blocks (<= 128 registers); double gets the registers it needs.
template <typename T>
__global__ void __launch_bounds__(kTile, sizeof(T) == sizeof(float) ? 2 : 1)
    e_step_tiles_kernel(const T* __restrict__ policy, const T* __restrict__ ref,
                        const int64_t* __restrict__ offsets,
                        const int64_t* __restrict__ n_ranked,
                        const T* __restrict__ record_weights,
                        const int64_t* __restrict__ aoff, const double* __restrict__ log_weights,
                        const double* __restrict__ annotator_weights, int64_t N, int64_t M,
                        int64_t K, int64_t H, double beta, T* __restrict__ responsibilities,
                        T* __restrict__ annotator_loglik, T* __restrict__ record_ll,
                        bool want_totals, unsigned long long* first_bad, EStepScratch ws) {
  using A = typename compute_type<T>::type;
  __shared__ int64_t s_owner[kTile];
  __shared__ int64_t s_edge[2];
  __shared__ double s_head[2][kGroupTypes][kWarps];
  __shared__ double s_lw[kGroupTypes];
  __shared__ double s_sum[2][kSumThreads / 32];
  // Each thread's partial sums of the current group, at s_S[k * kTile + r]; in fused mode
  // they end as each in-tile head's sums S_k (registers would cost 16 of them). After the
  // finish, the type-total transpose.
  __shared__ double s_S[kGroupTypes * kTile];
  // Each thread's ll of the current group, row r at r * kStageStride: also the record_ll
  // stage.
  __shared__ A s_ll[kTile * kStageStride];

  const int64_t t = blockIdx.x;
  const int64_t lo = t * kTile;
  const int n_in = int(min(int64_t(kTile), N - lo));
  const int64_t hi = lo + n_in;
  const int r = threadIdx.x, lane = r & 31, warp = r >> 5;
  const bool active = r < n_in;
  const int64_t i = lo + r;
  const int Kc = int(min(K, int64_t(kGroupTypes)));  // types finished in registers

  Record rec{0, 0, 0};
  if (active) rec = load_record(offsets, n_ranked, i);
  const A c2 = A(beta * base2::kLog2e);
  const double cw = (record_weights && active) ? double(record_weights[i]) : 1.0;
  bool finite = true;
  unsigned st = 0;    // packed layout state, set up in the first pass
  bool scan = false;  // warp-uniform: some records of the warp share an annotator
  int buf = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kGroupTypes) {
    const int kc = int(min(int64_t(kGroupTypes), K - k0));
    if (active)
      finite &= group_loglik(policy + k0 * M + rec.off, ref + rec.off, M, rec, kc, c2,
                             s_ll + r * kStageStride, 1);
    else
      for (int c = 0; c < kGroupTypes; ++c) s_ll[r * kStageStride + c] = A(0);
    if (k0 == 0) {
      // The layout is set up once the first group's loads are issued, so that the latency
      // of the annotator searches overlaps theirs (a block-uniform branch).
      // Annotators of the tile's first and last records bound every search in the tile;
      // the searches start where the annotators would be if records were spread evenly.
      const double per_record = double(H) / double(N);
      if (r == 0) s_edge[0] = owner_from(aoff, 0, H - 1, lo, int64_t(double(lo) * per_record));
      if (r == 32)
        s_edge[1] = owner_from(aoff, 0, H - 1, hi - 1, int64_t(double(hi - 1) * per_record));
      if (ws.fused && r < K) s_lw[r] = log_weights[r];
      __syncthreads();
      const int64_t e0 = s_edge[0], e1 = s_edge[1];
      // Within the tile the guess spreads the tile's records evenly over [e0, e1].
      const int64_t g = e0 + (e1 - e0) * r / (n_in > 1 ? n_in - 1 : 1);
      s_owner[r] = active ? owner_from(aoff, e0, e1, i, g) : -1;
      if (r == 0) ws.tile_owner[t] = e1;
      __syncthreads();
      st = layout_state(s_owner, aoff, r, active, lo, hi);
      scan = __any_sync(kFull, (st >> kStAddShift) != 0);
    }
    scan_group<false>(s_ll + r * kStageStride, cw, kc, scan, st, st_head(st), lane,
                      s_head[buf][0] + warp, s_S + r);
    __syncthreads();
    // A fused in-tile annotator that ends inside its head's warp is complete in s_S already.
    if (st_head(st) && !(ws.fused && st_kind(st) == kInTile && st_follow(st) == 0)) {
#pragma unroll
      for (int c = 0; c < kGroupTypes; ++c) {
        if (c < kc) {
          double total = s_S[c * kTile + r];
          for (int j = 1; j <= st_follow(st); ++j) total += s_head[buf][c][warp + j];
          const int64_t k = k0 + c;
          if (st_kind(st) == kInTile) {
            if (ws.fused)
              s_S[c * kTile + r] = total;  // this thread's own slot
            else
              ws.S[s_owner[r] * K + k] = total;
          } else if (st_kind(st) == kFirst) {
            ws.first_part[k * ws.n_tiles + t] = total;
          } else {
            ws.last_part[k * ws.n_tiles + t] = total;
          }
        }
      }
    }
    if (st & kStZeroFirst) {
#pragma unroll
      for (int c = 0; c < kGroupTypes; ++c)
        if (c < kc) ws.first_part[(k0 + c) * ws.n_tiles + t] = 0.0;
    }
    if (record_ll) {
      // Every stage write of this group precedes the barrier above.
      store_staged(s_ll, n_in, kc, record_ll + lo * K + k0, K);
      __syncthreads();  // before the next group rewrites the stage
    }
    buf ^= 1;
  }
  if (active && !finite) flag_non_finite(first_bad, lo + r);
  if (!ws.fused) return;  // block-uniform; the finish kernel does the rest

  // Finish: annotators inside the tile (their head thread), empty annotators just before an
  // annotator that starts in the tile (its head) or after the last record (thread 0 of the
  // last tile). Each thread accumulates v * lse and v * g; then one block sum.
  double lse_acc = 0.0, tot[kGroupTypes];
#pragma unroll
  for (int k = 0; k < kGroupTypes; ++k) tot[k] = 0.0;
  const int64_t h = s_owner[r];
  if (st_head(st) && st_kind(st) == kInTile)
    finish_annotator<T, false>(s_S + r, kTile, s_lw, Kc, annotator_weights ? annotator_weights[h] : 1.0,
                        responsibilities + h * K, annotator_loglik + h * K, lse_acc, tot, want_totals);
  if (st & kStStarts) {  // empties just before h all sit at offset aoff[h] = i
    for (int64_t e = h - 1; e >= 0 && aoff[e] == lo + r; --e)
      finish_annotator<T, true>(nullptr, 0, s_lw, Kc, annotator_weights ? annotator_weights[e] : 1.0,
                          responsibilities + e * K, annotator_loglik + e * K, lse_acc, tot, want_totals);
  }
  if (r == 0 && hi == N) {  // empties after the last record
    for (int64_t e = H - 1; e >= 0 && aoff[e] == N; --e)
      finish_annotator<T, true>(nullptr, 0, s_lw, Kc, annotator_weights ? annotator_weights[e] : 1.0,
                          responsibilities + e * K, annotator_loglik + e * K, lse_acc, tot, want_totals);
  }
  const double s = block_sum(lse_acc, s_sum[0]);
  if (r == 0) ws.lse_part[t] = s;
  // The transpose reuses s_S: block_sum's barrier above orders it after every finish.
  if (want_totals) block_type_totals(tot, Kc, s_S, ws.tot_part, ws.n_parts, t);
}

// E-step with no records (N == 0, fused mode): every annotator is empty, so every
// posterior is the prior: thread 0 finishes annotator 0, the block copies its row to the
// others and adds up the annotator weights V = sum_h v_h (thread j takes j, j+kSumThreads,
// ... in order); loglik = V * lse_0, type_totals = V * g_0.
template <typename T>
__global__ void __launch_bounds__(kSumThreads, 1)
    e_step_empty_kernel(const double* __restrict__ log_weights,
                        const double* __restrict__ annotator_weights, int64_t K, int64_t H,
                        T* __restrict__ responsibilities, T* __restrict__ annotator_loglik,
                        bool want_totals, EStepScratch ws) {
  __shared__ double s_sum[2][kSumThreads / 32];
  __shared__ double s_g[kGroupTypes + 1];
  const int Kc = int(K);
  if (threadIdx.x == 0) {
    double lse = 0.0, g[kGroupTypes];
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) g[k] = 0.0;
    finish_annotator<T, true>(nullptr, 0, log_weights, Kc, 1.0, responsibilities,
                              annotator_loglik, lse, g, true);
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) s_g[k] = g[k];
    s_g[kGroupTypes] = lse;
  }
  __syncthreads();
  double V = 0.0;
  for (int64_t e = threadIdx.x; e < H; e += kSumThreads) {
    V += annotator_weights ? annotator_weights[e] : 1.0;
    if (e > 0) {
      for (int k = 0; k < Kc; ++k) {
        responsibilities[e * K + k] = responsibilities[k];
        annotator_loglik[e * K + k] = T(0);
      }
    }
  }
  V = block_sum(V, s_sum[0]);
  if (threadIdx.x == 0) {
    ws.lse_part[0] = V * s_g[kGroupTypes];
    if (want_totals)
      for (int k = 0; k < Kc; ++k) ws.tot_part[k * ws.n_parts] = V * s_g[k];
  }
}

// group_sum[k][g] = sum over the tiles of group g of first_part[k][tile]; one block per group.
__global__ void __launch_bounds__(kSumThreads)
    e_step_group_sums_kernel(int64_t K, EStepScratch ws) {
  static_assert(kGroup == kSumThreads, "one thread per tile of a group");
  __shared__ double scratch[2][kSumThreads / 32];
  const int64_t g = blockIdx.x;
  const int64_t tile = g * kGroup + threadIdx.x;
  for (int64_t k = 0; k < K; ++k) {
    const double x = tile < ws.n_tiles ? ws.first_part[k * ws.n_tiles + tile] : 0.0;
    const double s = block_sum(x, scratch[k & 1]);
    if (threadIdx.x == 0) ws.group_sum[k * ws.n_groups + g] = s;
  }
}

// One warp per tile t0: if an annotator starts in t0 and ends in a later tile t1, its sum is
// last_part[t0] + first_part[t0+1 .. t1] (whole groups taken from group_sum). Fused mode:
// lane 0 then finishes it and adds v*lse, v*g into tile t0's parts (after the tile's own
// sums: a fixed order). Otherwise its row of S is written for the finish kernel.
template <typename T>
__global__ void __launch_bounds__(kTile)
    e_step_cross_kernel(const int64_t* __restrict__ aoff, const double* __restrict__ log_weights,
                        const double* __restrict__ annotator_weights, int64_t N, int64_t K,
                        T* __restrict__ responsibilities, T* __restrict__ annotator_loglik,
                        bool want_totals, EStepScratch ws) {
  const int lane = threadIdx.x & 31;
  const int64_t t0 = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t0 >= ws.n_tiles - 1) return;  // warp-uniform; the last tile has nothing after it
  const int64_t h = ws.tile_owner[t0];
  const int64_t lo0 = t0 * kTile, hi0 = lo0 + kTile;
  const int64_t a = aoff[h], b = aoff[h + 1];
  if (a < lo0 || b <= hi0) return;  // warp-uniform
  const int64_t first = t0 + 1, last = (b - 1) / kTile;  // tiles holding the rest of h
  // Whole groups [ga, gb) inside [first, last]; loose tiles before and after them.
  const int64_t ga = ceil_div(first, kGroup), gb = (last + 1) / kGroup;
  const bool groups = ga < gb;
  const int64_t head_end = groups ? ga * kGroup : last + 1;
  const int64_t tail_begin = groups ? gb * kGroup : last + 1;
  const int64_t nt = ws.n_tiles, ng = ws.n_groups;
  double S_keep[kGroupTypes];  // fused mode: K <= kGroupTypes, one pass
  for (int64_t k0 = 0; k0 < K; k0 += kGroupTypes) {
    const int kc = int(min(int64_t(kGroupTypes), K - k0));
    double acc[kGroupTypes];
#pragma unroll
    for (int c = 0; c < kGroupTypes; ++c) acc[c] = 0.0;
    for (int64_t tt = first + lane; tt < head_end; tt += 32) {
#pragma unroll
      for (int c = 0; c < kGroupTypes; ++c)
        if (c < kc) acc[c] += ws.first_part[(k0 + c) * nt + tt];
    }
    if (groups) {
      for (int64_t g = ga + lane; g < gb; g += 32) {
#pragma unroll
        for (int c = 0; c < kGroupTypes; ++c)
          if (c < kc) acc[c] += ws.group_sum[(k0 + c) * ng + g];
      }
      for (int64_t tt = tail_begin + lane; tt <= last; tt += 32) {
#pragma unroll
        for (int c = 0; c < kGroupTypes; ++c)
          if (c < kc) acc[c] += ws.first_part[(k0 + c) * nt + tt];
      }
    }
#pragma unroll
    for (int c = 0; c < kGroupTypes; ++c) {
      if (c < kc) {
        const double s = ws.last_part[(k0 + c) * nt + t0] + warp_sum(acc[c]);
        if (ws.fused)
          S_keep[c] = s;
        else if (lane == 0)
          ws.S[h * K + k0 + c] = s;
      }
    }
  }
  if (ws.fused && lane == 0) {
    const int Kc = int(K);
    double lse_acc = 0.0, tot[kGroupTypes];
#pragma unroll
    for (int k = 0; k < kGroupTypes; ++k) tot[k] = 0.0;
    finish_annotator<T, false>(S_keep, 1, log_weights, Kc, annotator_weights ? annotator_weights[h] : 1.0,
                        responsibilities + h * K, annotator_loglik + h * K, lse_acc, tot, want_totals);
    ws.lse_part[t0] += lse_acc;
    if (want_totals) {
#pragma unroll
      for (int k = 0; k < kGroupTypes; ++k)
        if (k < Kc) ws.tot_part[k * ws.n_parts + t0] += tot[k];
    }
  }
}

// K > kGroupTypes: one warp per annotator, lanes over the types (rows read and written
// coalesced). Block b finishes annotators [b*kFinishAnnotators, ...), warp w every
// kWarps-th of them in order; the block's sums go to lse_part[b], tot_part[k][b].
// Its parameters are e_step_cross_kernel's, written out again on purpose: as separate
// __restrict__ kernel parameters the annotator arrays are read through the read-only cache
// (LDG.CONSTANT); gathered in a struct they are not (measured on sm_90: 43 of this kernel's
// 114 loads lose it and it needs 64 registers instead of 60).
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    e_step_finish_kernel(const int64_t* __restrict__ aoff, const double* __restrict__ log_weights,
                         const double* __restrict__ annotator_weights, int64_t H, int64_t K,
                         T* __restrict__ responsibilities, T* __restrict__ annotator_loglik,
                         bool want_totals, EStepScratch ws) {
  constexpr int kWarpsF = kSumThreads / 32;
  __shared__ double s_lse[kWarpsF];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t h0 = int64_t(blockIdx.x) * kFinishAnnotators;
  const int64_t h1 = min(H, h0 + kFinishAnnotators);
  double lse_acc = 0.0;  // lane 0's, in order of the warp's annotators
  for (int64_t h = h0 + warp; h < h1; h += kWarpsF) {
    const bool empty = aoff[h] == aoff[h + 1];
    double* S = ws.S + h * K;
    double mx = -INFINITY;
    for (int64_t k = lane; k < K; k += 32) {
      const double v = log_weights[k] + (empty ? 0.0 : S[k]);
      mx = v > mx ? v : mx;
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
      const double o = __shfl_xor_sync(kFull, mx, s);
      mx = o > mx ? o : mx;
    }
    double z = 0.0;
    for (int64_t k = lane; k < K; k += 32)
      z += exp(log_weights[k] + (empty ? 0.0 : S[k]) - mx);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) z += __shfl_xor_sync(kFull, z, s);  // same in all lanes
    const double lse = mx + log(z);
    const double v = annotator_weights ? annotator_weights[h] : 1.0;
    for (int64_t k = lane; k < K; k += 32) {
      const double Sk = empty ? 0.0 : S[k];
      const double gk = exp(log_weights[k] + Sk - lse);
      responsibilities[h * K + k] = T(gk);
      annotator_loglik[h * K + k] = T(Sk);
      if (want_totals) S[k] = v * gk;  // the row is finished: reuse it for the totals
    }
    lse_acc += weighted(v, lse);
  }
  if (lane == 0) s_lse[warp] = lse_acc;
  __syncthreads();  // also orders the S rows rewritten above before the column sums
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int w = 0; w < kWarpsF; ++w) s += s_lse[w];
    ws.lse_part[blockIdx.x] = s;
  }
  if (want_totals) {
    // Column sums over the block's annotators in index order; threads over the types.
    for (int64_t k = threadIdx.x; k < K; k += kSumThreads) {
      double s = 0.0;
      for (int64_t h = h0; h < h1; ++h) s += ws.S[h * K + k];
      ws.tot_part[k * ws.n_parts + blockIdx.x] = s;
    }
  }
}

// One block: loglik = sum of lse_part, type_totals[k] = sum of tot_part[k] (thread j adds
// parts j, j + kSumThreads, ... in order, then the block tree).
__global__ void __launch_bounds__(kSumThreads)
    e_step_sum_kernel(int64_t K, double* loglik, double* type_totals, EStepScratch ws) {
  __shared__ double scratch[2][kSumThreads / 32];
  const int64_t n = ws.n_parts;
  double x = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kSumThreads) x += ws.lse_part[j];
  const double s = block_sum(x, scratch[0]);
  if (threadIdx.x == 0) *loglik = s;
  if (type_totals == nullptr) return;  // block-uniform
  for (int64_t k = 0; k < K; ++k) {
    double y = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += kSumThreads) y += ws.tot_part[k * n + j];
    const double sk = block_sum(y, scratch[(k + 1) & 1]);
    if (threadIdx.x == 0) type_totals[k] = sk;
  }
}

// ---------------------------------------------------------------------------------------
// Loss and gradient: grad[k, slots of i] = -scale_k w_ki d ll_ki / d logpi; the tile's
// sum_k scale_k sum_i w_ki (-ll_ki) goes to tile_part[tile]. Each thread adds its record's
// terms over the types in order; one block reduction per tile.

// The list-length paths of the loss: ll and gradient of one record under one type, in two
// steps: load(p) reads the type's row (p: the record's first slot), then loglik_grad writes
// the gradient to g_out (same layout as p) and returns ll; the weight is read in between, so
// the row's loads are in flight first. ShortPath keeps the record in registers (the
// reference log-probs loaded once for all types; EXACT or padded, see load_rewards);
// LongPath loops over memory. kUnrollTypes: types per trip of loss_record's loop (two short
// records' loads in flight at once; the long loop gains nothing).
template <int MM, bool EXACT, typename A, typename T>
struct ShortPath {
  static constexpr int kUnrollTypes = 2;
  int m, L;
  A rf[MM], r[MM];
  __device__ __forceinline__ ShortPath(const T* __restrict__ ref, int m_, int L_) : m(m_), L(L_) {
#pragma unroll
    for (int j = 0; j < MM; ++j)
      if (EXACT || j < m) rf[j] = A(ref[j]);
  }
  __device__ __forceinline__ void load(const T* __restrict__ p, A c, bool& finite) {
    base2::load_rewards<MM, EXACT>(p, rf, m, c, r, finite);
  }
  __device__ __forceinline__ A loglik_grad(A scale, T* __restrict__ g_out, bool&) const {
    A g[MM];
    const A ll = base2::short_loglik_grad<MM, EXACT>(r, m, L, scale, g);
#pragma unroll
    for (int j = 0; j < MM; ++j)
      if (EXACT || j < m) g_out[j] = T(g[j]);
    return ll;
  }
};

template <typename A, typename T>
struct LongPath {
  static constexpr int kUnrollTypes = 1;
  int m, L;
  const T* ref;
  const T* p = nullptr;
  A c = A(0);
  __device__ __forceinline__ LongPath(const T* ref_, int m_, int L_) : m(m_), L(L_), ref(ref_) {}
  __device__ __forceinline__ void load(const T* p_, A c_, bool&) {
    p = p_;
    c = c_;
  }
  __device__ __forceinline__ A loglik_grad(A scale, T* __restrict__ g_out, bool& finite) const {
    return base2::long_loglik_grad<A>(p, ref, m, L, c, scale, g_out, finite);
  }
};

// One record over all K types along a Path. Returns a status: bit 0 set when a reward was
// not finite, bits 1.. the first type whose weight is not finite, plus one (0: none); stores
// the record's sum_k scale_k w_ki (-ll_ki) in *acc_out. `p`, `g_out`: the record's first
// slot in row 0; `w`, `rec_loss`: its column (stride N), or null.
template <typename Path, typename A, typename T>
__device__ __forceinline__ int loss_record(const T* __restrict__ ref, int m, int L,
                                           const T* __restrict__ p, int64_t M,
                                           const T* __restrict__ w, int64_t N,
                                           const double* __restrict__ scale, int64_t K, A c,
                                           A beta, T* __restrict__ g_out,
                                           T* __restrict__ rec_loss, double* acc_out) {
  Path path(ref, m, L);
  bool finite = true;
  int64_t bad_k = -1;
  double acc = 0.0;
#pragma unroll Path::kUnrollTypes
  for (int64_t k = 0; k < K; ++k) {
    path.load(p, c, finite);
    const A w_k = w ? A(w[0]) : A(1);
    if (!finite_(w_k) && bad_k < 0) bad_k = k;
    const double sc = scale[k];
    const A ll = path.loglik_grad(A(-sc) * w_k * beta, g_out, finite);
    const double l = -weighted(double(w_k), double(ll));  // weight 0: 0, also for ll = -inf
    if (rec_loss) rec_loss[0] = T(l);
    acc += sc * l;
    p += M;
    g_out += M;
    if (w) w += N;
    if (rec_loss) rec_loss += N;
  }
  *acc_out = acc;
  return (finite ? 0 : 1) | (bad_k < 0 ? 0 : int(bad_k + 1) << 1);
}

// Lists of 4 are inlined, the other shapes are calls, for the reason given at
// group_loglik_call.
template <typename Path, typename... Args>
__device__ __noinline__ int loss_record_call(Args... args) {
  return loss_record<Path>(args...);
}

// A record whose rewards or weights are not finite makes the tile's sum (hence the loss)
// NaN, so that a caller that reads the flags late (the torch layer, to avoid a host sync)
// still never gets a plausible value; first_bad and bad_weight name the first offender.
template <typename T>
__global__ void __launch_bounds__(kTile)
    loss_tiles_kernel(const T* __restrict__ policy, const T* __restrict__ ref,
                      const int64_t* __restrict__ offsets, const int64_t* __restrict__ n_ranked,
                      const T* __restrict__ weights, const double* __restrict__ scale,
                      int64_t N, int64_t M, int64_t K, double beta, T* __restrict__ grad,
                      T* __restrict__ record_loss, unsigned long long* first_bad,
                      unsigned long long* bad_weight, double* __restrict__ tile_part) {
  using A = typename compute_type<T>::type;
  __shared__ double scratch[kSumThreads / 32];
  __shared__ double s_acc[kTile];
  const int64_t lo = int64_t(blockIdx.x) * kTile;
  const int n_in = int(min(int64_t(kTile), N - lo));
  const int r = threadIdx.x;
  const int64_t i = lo + r;
  int status = 0;
  s_acc[r] = 0.0;
  if (r < n_in) {
    const Record rec = load_record(offsets, n_ranked, i);
    const A c = A(beta * base2::kLog2e);
    const T* p = policy + rec.off;
    const T* rf = ref + rec.off;
    T* g = grad + rec.off;
    const T* w = weights ? weights + i : nullptr;
    T* rl = record_loss ? record_loss + i : nullptr;
    const int m = rec.m, L = rec.L;
    double* acc = s_acc + r;
    if (m == 4)
      status = loss_record<ShortPath<4, true, A, T>>(rf, m, L, p, M, w, N, scale, K, c, A(beta),
                                                     g, rl, acc);
    else if (m == 2)
      status = loss_record_call<ShortPath<2, true, A, T>>(rf, m, L, p, M, w, N, scale, K, c,
                                                         A(beta), g, rl, acc);
    else if (m == 3)
      status = loss_record_call<ShortPath<3, true, A, T>>(rf, m, L, p, M, w, N, scale, K, c,
                                                         A(beta), g, rl, acc);
    else if (m <= kShortMax)
      status = loss_record_call<ShortPath<kShortMax, false, A, T>>(rf, m, L, p, M, w, N, scale, K,
                                                                  c, A(beta), g, rl, acc);
    else
      status = loss_record_call<LongPath<A, T>>(rf, m, L, p, M, w, N, scale, K, c, A(beta), g, rl,
                                                acc);
    if (status != 0) s_acc[r] = nan("");  // this thread's own slot
  }
  const double s = block_sum(s_acc[r], scratch);
  if (r == 0) tile_part[blockIdx.x] = s;
  if (status & 1) flag_non_finite(first_bad, i);
  if ((status >> 1) && bad_weight)
    atomicMin(bad_weight, static_cast<unsigned long long>(int64_t((status >> 1) - 1) * N + i));
}

// One block: *out = sum of parts[0..n) (thread j adds j, j + kSumThreads, ... in order).
__global__ void __launch_bounds__(kSumThreads)
    sum_parts_kernel(const double* __restrict__ parts, int64_t n, double* out) {
  __shared__ double scratch[kSumThreads / 32];
  double x = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kSumThreads) x += parts[j];
  const double s = block_sum(x, scratch);
  if (threadIdx.x == 0) *out = s;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Host entry points

template <typename T>
void listwise_loglik(const Records<T>& rec, T* out, const Launch& launch) {
  const int64_t N = rec.N, K = rec.K;
  check_size(N, "N");
  check_slots(rec.M);
  check_size(K, "K");
  if (N == 0 || K == 0) return;
  check_records(rec);
  check_ptr(out, "out");
  check_ptr(launch.first_bad, "first_bad");
  const unsigned blocks = grid_size(ceil_div(N, kTile), "listwise_loglik");
  listwise_loglik_kernel<T><<<blocks, kTile, 0, as_stream(launch.stream)>>>(
      rec.policy, rec.ref, rec.offsets, rec.n_ranked, N, rec.M, K, rec.beta, out,
      launch.first_bad);
  check_launch("listwise_loglik");
}

size_t e_step_workspace_bytes(int64_t N, int64_t H, int64_t K) {
  check_size(N, "N");
  check_size(H, "H");
  check_size(K, "K");
  size_t bytes = 0;
  carve_e_step(nullptr, N, H, K, &bytes);
  return bytes;
}

template <typename T>
void e_step(const Records<T>& rec, const Annotators<T>& ann, const EStepOut<T>& out,
            const Launch& launch) {
  const int64_t N = rec.N, K = rec.K, H = ann.H;
  check_size(N, "N");
  check_slots(rec.M);
  check_size(H, "H");
  if (K < 1)
    throw std::invalid_argument("K: expected at least one type, got " + std::to_string(K));
  check_ptr(out.loglik, "loglik");
  const cudaStream_t s = as_stream(launch.stream);
  if (H == 0) {  // empty sums
    check_call(cudaMemsetAsync(out.loglik, 0, sizeof(double), s), "cudaMemsetAsync(loglik)");
    if (out.type_totals)
      check_call(cudaMemsetAsync(out.type_totals, 0, size_t(K) * sizeof(double), s),
                 "cudaMemsetAsync(type_totals)");
    return;
  }
  check_ptr(ann.offsets, "annotator_offsets");
  check_ptr(ann.log_weights, "log_weights");
  check_ptr(out.responsibilities, "responsibilities");
  check_ptr(out.annotator_loglik, "annotator_loglik");
  size_t need = 0;
  const EStepScratch ws = carve_e_step(launch.workspace, N, H, K, &need);
  check_workspace(launch.workspace, launch.workspace_bytes, need, "e_step");
  const bool totals = out.type_totals != nullptr;

  if (N > 0) {
    check_records(rec);
    check_ptr(launch.first_bad, "first_bad");
    const unsigned tiles = grid_size(ws.n_tiles, "e_step_tiles");
    e_step_tiles_kernel<T><<<tiles, kTile, 0, s>>>(
        rec.policy, rec.ref, rec.offsets, rec.n_ranked, ann.record_weights, ann.offsets,
        ann.log_weights, ann.weights, N, rec.M, K, H, rec.beta, out.responsibilities,
        out.annotator_loglik, out.record_ll, totals, launch.first_bad, ws);
    check_launch("e_step_tiles");
    if (ws.n_tiles > 1) {
      if (ws.n_groups > 1) {  // group 0 never lies inside a span starting after tile 0
        e_step_group_sums_kernel<<<grid_size(ws.n_groups, "e_step_group_sums"), kSumThreads, 0,
                                   s>>>(K, ws);
        check_launch("e_step_group_sums");
      }
      const unsigned warps_blocks = grid_size(ceil_div(ws.n_tiles - 1, kWarps), "e_step_cross");
      e_step_cross_kernel<T><<<warps_blocks, kTile, 0, s>>>(
          ann.offsets, ann.log_weights, ann.weights, N, K, out.responsibilities,
          out.annotator_loglik, totals, ws);
      check_launch("e_step_cross");
    }
  } else if (ws.fused) {
    e_step_empty_kernel<T><<<1, kSumThreads, 0, s>>>(ann.log_weights, ann.weights, K, H,
                                                     out.responsibilities,
                                                     out.annotator_loglik, totals, ws);
    check_launch("e_step_empty");
  }
  if (!ws.fused) {
    e_step_finish_kernel<T><<<grid_size(ws.n_parts, "e_step_finish"), kSumThreads, 0, s>>>(
        ann.offsets, ann.log_weights, ann.weights, H, K, out.responsibilities,
        out.annotator_loglik, totals, ws);
    check_launch("e_step_finish");
  }
  e_step_sum_kernel<<<1, kSumThreads, 0, s>>>(K, out.loglik, out.type_totals, ws);
  check_launch("e_step_sum");
}

size_t loss_workspace_bytes(int64_t N, int64_t K) {
  check_size(N, "N");
  check_size(K, "K");
  return aligned(size_t(ceil_div(N, kTile)) * sizeof(double));
}

template <typename T>
void listwise_dpo_loss_and_grad(const Records<T>& rec, const LossArgs<T>& args,
                                const Launch& launch, unsigned long long* bad_weight) {
  const int64_t N = rec.N, K = rec.K;
  check_size(N, "N");
  check_slots(rec.M);
  check_size(K, "K");
  check_ptr(args.loss, "loss");
  const cudaStream_t s = as_stream(launch.stream);
  if (N == 0 || K == 0) {  // an empty sum; a grad over no slots has nothing to write
    check_call(cudaMemsetAsync(args.loss, 0, sizeof(double), s), "cudaMemsetAsync(loss)");
    return;
  }
  check_records(rec);
  check_ptr(args.scale, "scale");
  check_ptr(args.grad, "grad");
  check_ptr(launch.first_bad, "first_bad");
  const size_t need = loss_workspace_bytes(N, K);
  check_workspace(launch.workspace, launch.workspace_bytes, need, "listwise_dpo_loss_and_grad");
  double* tile_part = static_cast<double*>(launch.workspace);
  const int64_t n_tiles = ceil_div(N, kTile);
  loss_tiles_kernel<T><<<grid_size(n_tiles, "listwise_dpo_loss_and_grad"), kTile, 0, s>>>(
      rec.policy, rec.ref, rec.offsets, rec.n_ranked, args.weights, args.scale, N, rec.M, K,
      rec.beta, args.grad, args.record_loss, launch.first_bad, bad_weight, tile_part);
  check_launch("listwise_dpo_loss_and_grad");
  sum_parts_kernel<<<1, kSumThreads, 0, s>>>(tile_part, n_tiles, args.loss);
  check_launch("listwise_dpo_loss_sum");
}

#define EMDPO_CUDA_INSTANTIATE(T)                                                             \
  template void listwise_loglik<T>(const Records<T>&, T*, const Launch&);                     \
  template void e_step<T>(const Records<T>&, const Annotators<T>&, const EStepOut<T>&,        \
                          const Launch&);                                                     \
  template void listwise_dpo_loss_and_grad<T>(const Records<T>&, const LossArgs<T>&,          \
                                              const Launch&, unsigned long long*);
EMDPO_CUDA_INSTANTIATE(float)
EMDPO_CUDA_INSTANTIATE(double)
#undef EMDPO_CUDA_INSTANTIATE

}  // namespace cuda
}  // namespace emdpo
