// CUDA kernels over records and annotators, around the per-record math of common/listwise.h
// (the same functions the CPU loops call, so the two backends cannot drift).
//
// Work layout. Records are cut into tiles of kTile consecutive records; one block of kTile
// threads handles a tile, one thread per record, and loops over the K types inside the
// block, so offsets, ranking depths, record weights and annotator lookups are read once per
// record and consecutive threads read consecutive records of the same type row.
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
//      suffix scan, then a short walk over the following warps' heads). The sum of an
//      annotator that lies inside the tile is complete there (written to S). One crossing the
//      tile's left edge leaves its in-tile sum in first_part[k][tile], one that starts in
//      the tile and crosses its right edge leaves it in last_part[k][tile]. Tiles whose
//      first record starts an annotator write first_part = 0.
//   2. e_step_group_sums: group_sum[k][g] = sum of first_part over the kGroup tiles of g.
//   3. e_step_cross: one warp per tile; the warp of the tile where a crossing annotator
//      starts adds last_part of that tile, first_part of the following tiles up to its
//      last tile, using group_sum for whole groups in between. One annotator owning all N
//      records thus costs about 2*kGroup + N/(kTile*kGroup) loads per type, spread over a
//      warp, instead of N/kTile.
//   4. e_step_finish: one thread per annotator: finish_annotator (common header), and a
//      block sum of the annotators' log-normalisers.
//   5. sum_parts: one block adds the per-block sums into loglik.
// Workspace (caller-allocated, size from (N, H, K) alone): S in float64, H*K doubles, plus
// about 2K doubles per tile and one int64 per tile; nothing is allocated here.
#include "cuda/listwise_cuda.h"

#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "common/listwise.h"

namespace emdpo {
namespace cuda {
namespace {

constexpr int kTile = 256;         // records per tile = threads per record-parallel block
constexpr int kWarps = kTile / 32;
constexpr int kTypeChunk = 8;      // types per pass: register arrays and output staging
constexpr int kGroup = 256;        // tiles per group (second level of the E-step reduction)
constexpr int kSumThreads = 256;   // threads of the reduction blocks
constexpr unsigned kFull = 0xffffffffu;

static_assert(kTile % 32 == 0 && kTile >= 64, "a tile is whole warps, at least two");
static_assert(kSumThreads % 32 == 0, "reduction blocks are whole warps");

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

void check_ptr(const void* p, const char* name) {
  if (p == nullptr)
    throw std::invalid_argument(std::string(name) + ": null device pointer");
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
  int64_t off, m, L;
};

__device__ __forceinline__ Record load_record(const int64_t* __restrict__ offsets,
                                              const int64_t* __restrict__ n_ranked, int64_t i) {
  Record r;
  r.off = offsets[i];
  r.m = offsets[i + 1] - r.off;
  r.L = n_ranked ? n_ranked[i] : r.m - 1;
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

// Writes a staged (n_rows x n_cols) block of an (., K) row-major output: stage holds row r
// at stage[r * kTypeChunk], dst points at the block's first element. When n_cols == K the
// block is one contiguous range and the stores are fully coalesced.
template <typename T>
__device__ __forceinline__ void store_staged(const T* stage, int n_rows, int n_cols, T* dst,
                                             int64_t K) {
  for (int e = threadIdx.x; e < n_rows * n_cols; e += blockDim.x) {
    const int r = e / n_cols, c = e - r * n_cols;
    dst[int64_t(r) * K + c] = stage[r * kTypeChunk + c];
  }
}

__device__ __forceinline__ void flag_non_finite(unsigned long long* first_bad, int64_t i) {
  atomicMin(first_bad, static_cast<unsigned long long>(i));
}

// ---------------------------------------------------------------------------------------
// listwise_loglik: out[i, k] = ll_ik.

template <typename T>
__global__ void __launch_bounds__(kTile)
    listwise_loglik_kernel(const T* __restrict__ policy, const T* __restrict__ ref,
                           const int64_t* __restrict__ offsets,
                           const int64_t* __restrict__ n_ranked, int64_t N, int64_t M,
                           int64_t K, double beta, T* __restrict__ out,
                           unsigned long long* first_bad) {
  using A = typename compute_type<T>::type;
  __shared__ T stage[kTile * kTypeChunk];
  const int64_t lo = int64_t(blockIdx.x) * kTile;
  const int n_in = int(min(int64_t(kTile), N - lo));
  const int r = threadIdx.x;
  const bool active = r < n_in;
  const int64_t i = lo + r;
  const Record rec = active ? load_record(offsets, n_ranked, i) : Record{0, 0, 0};
  bool finite = true;
  for (int64_t k0 = 0; k0 < K; k0 += kTypeChunk) {
    const int kc = int(min(int64_t(kTypeChunk), K - k0));
    if (active) {
      for (int c = 0; c < kc; ++c) {
        const T* p = policy + (k0 + c) * M + rec.off;
        stage[r * kTypeChunk + c] =
            T(record_loglik<A>(p, ref + rec.off, rec.m, rec.L, A(beta), finite));
      }
    }
    __syncthreads();
    store_staged(stage, n_in, kc, out + lo * K + k0, K);
    __syncthreads();  // the stage is rewritten by the next chunk
  }
  if (active && !finite) flag_non_finite(first_bad, i);
}

// ---------------------------------------------------------------------------------------
// E-step

struct EStepScratch {
  double* S;              // (H, K) per-annotator sums
  double* first_part;     // (K, n_tiles) in-tile sum of the annotator crossing the left edge
  double* last_part;      // (K, n_tiles) in-tile sum of the annotator crossing the right edge
  double* group_sum;      // (K, n_groups) sums of first_part over groups of kGroup tiles
  int64_t* tile_owner;    // (n_tiles,) annotator of each tile's last record
  double* lse_part;       // (n_finish_blocks,) block sums of the annotators' lse
  int64_t n_tiles, n_groups, n_finish_blocks;
};

EStepScratch carve_e_step(void* workspace, int64_t N, int64_t H, int64_t K, size_t* bytes) {
  EStepScratch s;
  s.n_tiles = ceil_div(N, kTile);
  s.n_groups = ceil_div(s.n_tiles, kGroup);
  s.n_finish_blocks = ceil_div(H, kSumThreads);
  Carver c{static_cast<char*>(workspace)};
  s.S = c.take<double>(H * K);
  s.first_part = c.take<double>(K * s.n_tiles);
  s.last_part = c.take<double>(K * s.n_tiles);
  s.group_sum = c.take<double>(K * s.n_groups);
  s.tile_owner = c.take<int64_t>(s.n_tiles);
  s.lse_part = c.take<double>(s.n_finish_blocks);
  *bytes = c.used;
  return s;
}

// At least 4 resident blocks (<= 64 registers): left to itself, ptxas picks 48 registers
// for the double version on sm_90 and spills.
template <typename T>
__global__ void __launch_bounds__(kTile, 4)
    e_step_tiles_kernel(const T* __restrict__ policy, const T* __restrict__ ref,
                        const int64_t* __restrict__ offsets,
                        const int64_t* __restrict__ n_ranked,
                        const T* __restrict__ record_weights,
                        const int64_t* __restrict__ aoff, int64_t N, int64_t M, int64_t K,
                        int64_t H, double beta, T* __restrict__ record_ll,
                        unsigned long long* first_bad, EStepScratch ws) {
  using A = typename compute_type<T>::type;
  __shared__ int64_t s_owner[kTile];
  __shared__ int64_t s_edge[2];
  __shared__ double s_head[2][kWarps];
  __shared__ T stage[kTile * kTypeChunk];

  const int64_t t = blockIdx.x;
  const int64_t lo = t * kTile;
  const int n_in = int(min(int64_t(kTile), N - lo));
  const int64_t hi = lo + n_in;
  const int r = threadIdx.x, lane = r & 31, warp = r >> 5;
  const bool active = r < n_in;
  const int64_t i = lo + r;

  // Annotators of the tile's first and last records bound every search in the tile.
  if (r == 0) s_edge[0] = owner(aoff, 0, H - 1, lo);
  if (r == 32) s_edge[1] = owner(aoff, 0, H - 1, hi - 1);
  __syncthreads();
  const int64_t h = active ? owner(aoff, s_edge[0], s_edge[1], i) : -1;
  s_owner[r] = h;
  if (r == 0) ws.tile_owner[t] = s_edge[1];
  __syncthreads();

  // Layout facts, the same for every type.
  // Warp suffix scan: at step b, add lane (lane + 2^b)'s partial when it is in the same
  // annotator. After the 5 steps each lane holds the sum from itself to the end of its
  // annotator or of its warp, whichever comes first.
  unsigned add_mask = 0;
  if (active) {
#pragma unroll
    for (int b = 0; b < 5; ++b)
      if (lane + (1 << b) < 32 && s_owner[r + (1 << b)] == h) add_mask |= 1u << b;
  }
  const bool seg_start = active && (r == 0 || s_owner[r - 1] != h);
  int n_follow = 0;  // following warps whose first record still belongs to h
  double* dst = nullptr;
  int64_t dst_stride = 0;  // dst[k * dst_stride] receives type k's sum
  bool zero_first = false;
  if (seg_start) {
    while (warp + n_follow + 1 < kWarps && s_owner[(warp + n_follow + 1) * 32] == h) ++n_follow;
    const int64_t a = aoff[h], b = aoff[h + 1];
    if (a >= lo && b <= hi) {
      dst = ws.S + h * K;
      dst_stride = 1;
    } else if (a < lo) {  // crosses the left edge: only the tile's first segment
      dst = ws.first_part + t;
      dst_stride = ws.n_tiles;
    } else {  // starts here, crosses the right edge
      dst = ws.last_part + t;
      dst_stride = ws.n_tiles;
    }
    zero_first = (r == 0) && a >= lo;
  }

  Record rec{0, 0, 0};
  double c_i = 0.0;
  if (active) {
    rec = load_record(offsets, n_ranked, i);
    c_i = record_weights ? double(record_weights[i]) : 1.0;
  }
  bool finite = true;
  int buf = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTypeChunk) {
    const int kc = int(min(int64_t(kTypeChunk), K - k0));
    for (int c = 0; c < kc; ++c) {
      const int64_t k = k0 + c;
      double x = 0.0;
      if (active) {
        const T* p = policy + k * M + rec.off;
        const A ll = record_loglik<A>(p, ref + rec.off, rec.m, rec.L, A(beta), finite);
        if (record_ll) stage[r * kTypeChunk + c] = T(ll);
        x = c_i * double(ll);
      }
#pragma unroll
      for (int b = 0; b < 5; ++b) {
        const double y = __shfl_down_sync(kFull, x, 1 << b);
        if (add_mask & (1u << b)) x += y;
      }
      if (lane == 0) s_head[buf][warp] = x;
      __syncthreads();
      if (seg_start) {
        double total = x;
        for (int j = 1; j <= n_follow; ++j) total += s_head[buf][warp + j];
        dst[k * dst_stride] = total;
      }
      if (zero_first) ws.first_part[k * ws.n_tiles + t] = 0.0;
      buf ^= 1;
    }
    if (record_ll) {
      // Every stage write of this chunk precedes the last barrier above.
      store_staged(stage, n_in, kc, record_ll + lo * K + k0, K);
      __syncthreads();  // before the next chunk rewrites the stage
    }
  }
  if (active && !finite) flag_non_finite(first_bad, i);
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
// last_part[t0] + first_part[t0+1 .. t1] (whole groups taken from group_sum).
__global__ void __launch_bounds__(kTile)
    e_step_cross_kernel(const int64_t* __restrict__ aoff, int64_t N, int64_t K,
                        EStepScratch ws) {
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
  for (int64_t k0 = 0; k0 < K; k0 += kTypeChunk) {
    const int kc = int(min(int64_t(kTypeChunk), K - k0));
    double acc[kTypeChunk];
#pragma unroll
    for (int c = 0; c < kTypeChunk; ++c) acc[c] = 0.0;
    for (int64_t tt = first + lane; tt < head_end; tt += 32) {
#pragma unroll
      for (int c = 0; c < kTypeChunk; ++c)
        if (c < kc) acc[c] += ws.first_part[(k0 + c) * nt + tt];
    }
    if (groups) {
      for (int64_t g = ga + lane; g < gb; g += 32) {
#pragma unroll
        for (int c = 0; c < kTypeChunk; ++c)
          if (c < kc) acc[c] += ws.group_sum[(k0 + c) * ng + g];
      }
      for (int64_t tt = tail_begin + lane; tt <= last; tt += 32) {
#pragma unroll
        for (int c = 0; c < kTypeChunk; ++c)
          if (c < kc) acc[c] += ws.first_part[(k0 + c) * nt + tt];
      }
    }
#pragma unroll
    for (int c = 0; c < kTypeChunk; ++c) {
      if (c < kc) {
        const double s = warp_sum(acc[c]);
        if (lane == 0) ws.S[h * K + k0 + c] = ws.last_part[(k0 + c) * nt + t0] + s;
      }
    }
  }
}

// One thread per annotator: posterior and per-annotator log-likelihood from S; then the
// block's sum of the annotators' log-normalisers into lse_part.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    e_step_finish_kernel(const int64_t* __restrict__ aoff, const double* __restrict__ log_weights,
                         int64_t H, int64_t K, T* __restrict__ responsibilities,
                         T* __restrict__ annotator_loglik, EStepScratch ws) {
  __shared__ double scratch[kSumThreads / 32];
  const int64_t h = int64_t(blockIdx.x) * kSumThreads + threadIdx.x;
  double lse = 0.0;
  if (h < H) {
    double* S = ws.S + h * K;
    if (aoff[h] == aoff[h + 1])  // no records: the posterior is the prior
      for (int64_t k = 0; k < K; ++k) S[k] = 0.0;
    lse = finish_annotator<T>(S, log_weights, K, responsibilities + h * K,
                              annotator_loglik + h * K);
  }
  const double s = block_sum(lse, scratch);
  if (threadIdx.x == 0) ws.lse_part[blockIdx.x] = s;
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

// ---------------------------------------------------------------------------------------
// Loss and gradient: grad[k, slots of i] = -scale_k w_ki d ll_ki / d logpi; the tile's
// sum_k scale_k sum_i w_ki (-ll_ki) goes to tile_part[tile].

template <typename T>
__global__ void __launch_bounds__(kTile)
    loss_tiles_kernel(const T* __restrict__ policy, const T* __restrict__ ref,
                      const int64_t* __restrict__ offsets, const int64_t* __restrict__ n_ranked,
                      const T* __restrict__ weights, const double* __restrict__ scale,
                      int64_t N, int64_t M, int64_t K, double beta, T* __restrict__ grad,
                      T* __restrict__ record_loss, unsigned long long* first_bad,
                      double* __restrict__ tile_part) {
  static_assert(kTile == kSumThreads, "block_sum assumes kSumThreads threads");
  using A = typename compute_type<T>::type;
  __shared__ double scratch[2][kSumThreads / 32];
  const int64_t lo = int64_t(blockIdx.x) * kTile;
  const int n_in = int(min(int64_t(kTile), N - lo));
  const int r = threadIdx.x;
  const bool active = r < n_in;
  const int64_t i = lo + r;
  const Record rec = active ? load_record(offsets, n_ranked, i) : Record{0, 0, 0};
  bool finite = true;
  double tile_total = 0.0;  // meaningful in thread 0
  for (int64_t k = 0; k < K; ++k) {
    double l_i = 0.0;
    if (active) {
      const A w_i = weights ? A(weights[k * N + i]) : A(1);
      const A ll = record_loglik_grad<A>(policy + k * M + rec.off, ref + rec.off, rec.m, rec.L,
                                         A(beta), A(-scale[k]) * w_i, grad + k * M + rec.off,
                                         finite);
      l_i = -double(w_i) * double(ll);
      if (record_loss) record_loss[k * N + i] = T(l_i);
    }
    const double s = block_sum(l_i, scratch[k & 1]);
    if (r == 0) tile_total += scale[k] * s;
  }
  if (r == 0) tile_part[blockIdx.x] = tile_total;
  if (active && !finite) flag_non_finite(first_bad, i);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Host entry points

template <typename T>
void listwise_loglik(const T* policy, const T* ref, const int64_t* offsets,
                     const int64_t* n_ranked, int64_t N, int64_t M, int64_t K, double beta,
                     T* out, unsigned long long* first_bad, void* stream) {
  check_size(N, "N");
  check_size(M, "M");
  check_size(K, "K");
  if (N == 0 || K == 0) return;
  check_ptr(policy, "policy_logps");
  check_ptr(ref, "ref_logps");
  check_ptr(offsets, "offsets");
  check_ptr(out, "out");
  check_ptr(first_bad, "first_bad");
  const unsigned blocks = grid_size(ceil_div(N, kTile), "listwise_loglik");
  listwise_loglik_kernel<T><<<blocks, kTile, 0, as_stream(stream)>>>(
      policy, ref, offsets, n_ranked, N, M, K, beta, out, first_bad);
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
void e_step(const T* policy, const T* ref, const int64_t* offsets, const int64_t* n_ranked,
            const T* record_weights, const int64_t* annotator_offsets,
            const double* log_weights, int64_t N, int64_t M, int64_t K, int64_t H, double beta,
            T* responsibilities, T* annotator_loglik, double* loglik, T* record_ll,
            unsigned long long* first_bad, void* workspace, size_t workspace_bytes,
            void* stream) {
  check_size(N, "N");
  check_size(M, "M");
  check_size(H, "H");
  if (K < 1)
    throw std::invalid_argument("K: expected at least one type, got " + std::to_string(K));
  check_ptr(loglik, "loglik");
  const cudaStream_t s = as_stream(stream);
  if (H == 0) {  // an empty sum
    check_call(cudaMemsetAsync(loglik, 0, sizeof(double), s), "cudaMemsetAsync(loglik)");
    return;
  }
  check_ptr(annotator_offsets, "annotator_offsets");
  check_ptr(log_weights, "log_weights");
  check_ptr(responsibilities, "responsibilities");
  check_ptr(annotator_loglik, "annotator_loglik");
  size_t need = 0;
  const EStepScratch ws = carve_e_step(workspace, N, H, K, &need);
  check_workspace(workspace, workspace_bytes, need, "e_step");

  if (N > 0) {
    check_ptr(policy, "policy_logps");
    check_ptr(ref, "ref_logps");
    check_ptr(offsets, "offsets");
    check_ptr(first_bad, "first_bad");
    const unsigned tiles = grid_size(ws.n_tiles, "e_step_tiles");
    e_step_tiles_kernel<T><<<tiles, kTile, 0, s>>>(policy, ref, offsets, n_ranked,
                                                    record_weights, annotator_offsets, N, M,
                                                    K, H, beta, record_ll, first_bad, ws);
    check_launch("e_step_tiles");
    if (ws.n_tiles > 1) {
      if (ws.n_groups > 1) {  // group 0 never lies inside a span starting after tile 0
        e_step_group_sums_kernel<<<grid_size(ws.n_groups, "e_step_group_sums"), kSumThreads, 0,
                                   s>>>(K, ws);
        check_launch("e_step_group_sums");
      }
      const unsigned warps_blocks = grid_size(ceil_div(ws.n_tiles - 1, kWarps), "e_step_cross");
      e_step_cross_kernel<<<warps_blocks, kTile, 0, s>>>(annotator_offsets, N, K, ws);
      check_launch("e_step_cross");
    }
  }
  e_step_finish_kernel<T><<<grid_size(ws.n_finish_blocks, "e_step_finish"), kSumThreads, 0,
                            s>>>(annotator_offsets, log_weights, H, K, responsibilities,
                                 annotator_loglik, ws);
  check_launch("e_step_finish");
  sum_parts_kernel<<<1, kSumThreads, 0, s>>>(ws.lse_part, ws.n_finish_blocks, loglik);
  check_launch("e_step_sum");
}

size_t loss_workspace_bytes(int64_t N, int64_t K) {
  check_size(N, "N");
  check_size(K, "K");
  return aligned(size_t(ceil_div(N, kTile)) * sizeof(double));
}

template <typename T>
void listwise_dpo_loss_and_grad(const T* policy, const T* ref, const int64_t* offsets,
                                const int64_t* n_ranked, const T* weights, const double* scale,
                                int64_t N, int64_t M, int64_t K, double beta, double* loss,
                                T* grad, T* record_loss, unsigned long long* first_bad,
                                void* workspace, size_t workspace_bytes, void* stream) {
  check_size(N, "N");
  check_size(M, "M");
  check_size(K, "K");
  check_ptr(loss, "loss");
  const cudaStream_t s = as_stream(stream);
  if (N == 0 || K == 0) {  // an empty sum; a grad over no slots has nothing to write
    check_call(cudaMemsetAsync(loss, 0, sizeof(double), s), "cudaMemsetAsync(loss)");
    return;
  }
  check_ptr(policy, "policy_logps");
  check_ptr(ref, "ref_logps");
  check_ptr(offsets, "offsets");
  check_ptr(scale, "scale");
  check_ptr(grad, "grad");
  check_ptr(first_bad, "first_bad");
  const size_t need = loss_workspace_bytes(N, K);
  check_workspace(workspace, workspace_bytes, need, "listwise_dpo_loss_and_grad");
  double* tile_part = static_cast<double*>(workspace);
  const int64_t n_tiles = ceil_div(N, kTile);
  loss_tiles_kernel<T><<<grid_size(n_tiles, "listwise_dpo_loss_and_grad"), kTile, 0, s>>>(
      policy, ref, offsets, n_ranked, weights, scale, N, M, K, beta, grad, record_loss,
      first_bad, tile_part);
  check_launch("listwise_dpo_loss_and_grad");
  sum_parts_kernel<<<1, kSumThreads, 0, s>>>(tile_part, n_tiles, loss);
  check_launch("listwise_dpo_loss_sum");
}

#define EMDPO_CUDA_INSTANTIATE(T)                                                             \
  template void listwise_loglik<T>(const T*, const T*, const int64_t*, const int64_t*,        \
                                   int64_t, int64_t, int64_t, double, T*, unsigned long long*, \
                                   void*);                                                     \
  template void e_step<T>(const T*, const T*, const int64_t*, const int64_t*, const T*,       \
                          const int64_t*, const double*, int64_t, int64_t, int64_t, int64_t,  \
                          double, T*, T*, double*, T*, unsigned long long*, void*, size_t,    \
                          void*);                                                              \
  template void listwise_dpo_loss_and_grad<T>(const T*, const T*, const int64_t*,             \
                                              const int64_t*, const T*, const double*,        \
                                              int64_t, int64_t, int64_t, double, double*, T*, \
                                              T*, unsigned long long*, void*, size_t, void*);
EMDPO_CUDA_INSTANTIATE(float)
EMDPO_CUDA_INSTANTIATE(double)

}  // namespace cuda
}  // namespace emdpo
