// The CPU kernels' inner loops: blocks of W consecutive records processed in lockstep, one
// record per SIMD lane, so the exp/log work is vectorized across records whatever K is
// (K = 1 included) and whatever the list lengths are. W is the native float width of the
// instruction set the caller was compiled for (4 SSE, 8 AVX2, 16 AVX-512).
//
// Lists of different lengths are aligned at their ends: step s handles slot t = m - 1 - s
// of every lane, and a lane whose list is shorter than s sits the step out (masked). Each
// lane performs exactly the arithmetic of the scalar functions in common/listwise.h, in the
// same order, so a record's result does not depend on which path or block computed it.
//
// The lanes are written with GCC/Clang vector types rather than left to the
// auto-vectorizer: GCC 12 vectorized these loops or not depending on unrelated details of
// their bodies. The vectors must be the target's native width: GCC splits wider ones badly
// (measured: 16-lane vectors on AVX2 ran 5x slower than 8-lane ones).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/fastmath.h"
#include "common/listwise.h"

namespace emdpo {
inline namespace EMDPO_ISA_NS {
namespace lanes {

constexpr int kMaxLanes = 16;
// Longest list the blocks buffer on the stack; blocks holding a longer list take the scalar
// path record by record.
constexpr int kMaxLaneList = 256;

// Per-precision lane vectors: F (values), I (the mask type F's comparisons produce: all ones
// or all zeros per lane), select(mask, a, b) as a bitwise blend (GCC 12 scalarized some
// vector `?:` selects lane by lane), and exp/log that match the scalar exp_/log_ of
// common/listwise.h bit for bit.
template <typename A, int W> struct LaneOps;

template <int W> struct LaneOps<float, W> {
  using F = typename fastmath::vec<W>::F;
  using I = typename fastmath::vec<W>::I;
  using vint = I;
  static EMDPO_ALWAYS_INLINE I mask(vint m) { return m; }
  static EMDPO_ALWAYS_INLINE F select(I m, F a, F b) {
    return (F)(((I)a & m) | ((I)b & ~m));
  }
  static EMDPO_ALWAYS_INLINE F exp(F x) { return fastmath::exp_generic<F, I>(x); }
  static EMDPO_ALWAYS_INLINE F log(F x) { return fastmath::log_generic<F, I>(x); }
};

// float64 vectors of W lanes and their int64 masks (vector_size needs a literal size, hence
// one specialization per width).
template <int W> struct dvec;
#define EMDPO_DOUBLE_VECTOR(W)                                                \
  template <> struct dvec<W> {                                                \
    typedef double F __attribute__((vector_size(W * sizeof(double))));        \
    typedef int64_t I __attribute__((vector_size(W * sizeof(int64_t))));      \
  };
EMDPO_DOUBLE_VECTOR(4)
EMDPO_DOUBLE_VECTOR(8)
EMDPO_DOUBLE_VECTOR(16)
#undef EMDPO_DOUBLE_VECTOR

template <int W> struct LaneOps<double, W> {
  using F = typename dvec<W>::F;
  using I = typename dvec<W>::I;
  using vint = typename fastmath::vec<W>::I;
  static EMDPO_ALWAYS_INLINE I mask(vint m) { return __builtin_convertvector(m, I); }
  static EMDPO_ALWAYS_INLINE F select(I m, F a, F b) {
    return (F)(((I)a & m) | ((I)b & ~m));
  }
  // float64 is the accuracy path, not the fast one: libm per lane, as the scalar twin does.
  static EMDPO_ALWAYS_INLINE F exp(F x) {
    for (int l = 0; l < W; ++l) x[l] = std::exp(x[l]);
    return x;
  }
  static EMDPO_ALWAYS_INLINE F log(F x) {
    for (int l = 0; l < W; ++l) x[l] = std::log(x[l]);
    return x;
  }
};

template <typename V> EMDPO_ALWAYS_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V> EMDPO_ALWAYS_INLINE void store(void* p, V v) { std::memcpy(p, &v, sizeof v); }

template <int W>
struct Block {
  int64_t base;          // first slot of the block
  int32_t off[W];        // first slot of each lane's record, relative to base
  int32_t m[W];          // list lengths (1 in padding lanes: no steps)
  int32_t L[W];          // ranked depths (0 in padding lanes)
  int32_t max_m;
  int32_t span;          // slots in the block
  int32_t no_flush_steps;  // steps after which a product of z could pass the flush bound
  int n;                 // lanes holding real records
};

// Describes records [i0, i0 + n). Returns false when relative slot indices would not fit in
// int32 (a block spanning over 2^31 slots); the caller then takes the scalar path.
template <int W>
EMDPO_ALWAYS_INLINE bool make_block(const int64_t* offsets, const int64_t* n_ranked, int64_t i0,
                                    int n, Block<W>& b) {
  b.base = offsets[i0];
  b.n = n;
  if (offsets[i0 + n] - b.base > std::numeric_limits<int32_t>::max()) return false;
  int32_t max_m = 1;
  for (int l = 0; l < W; ++l) {
    if (l < n) {
      const int64_t i = i0 + l;
      const int32_t m = int32_t(offsets[i + 1] - offsets[i]);
      b.off[l] = int32_t(offsets[i] - b.base);
      b.m[l] = m;
      b.L[l] = int32_t(n_ranked ? n_ranked[i] : m - 1);
      max_m = m > max_m ? m : max_m;
    } else {
      b.off[l] = 0;
      b.m[l] = 1;
      b.L[l] = 0;
    }
  }
  b.max_m = max_m;
  b.span = int32_t(offsets[i0 + n] - b.base);
  // Each z is at most max_m, so after s ranked steps the product is at most max_m^s.
  int32_t steps = 0;
  for (double bound = max_m; bound <= 1.8e19 && steps < max_m; bound *= max_m) ++steps;
  b.no_flush_steps = steps;
  return true;
}

inline int first_bad_lane(const int32_t* bad, int n) {
  for (int l = 0; l < n; ++l)
    if (bad[l]) return l;
  return -1;
}

// r_at[s][l] = reward of lane l's slot t = m_l - 1 - s (0 where the lane has no such slot),
// an end-aligned tile the steps below load as whole vectors. The block's slots are
// contiguous, so the rewards are first computed in one contiguous (vectorized) pass and
// then moved into the tile. bad[l] = 1 when lane l has a non-finite reward.
template <typename A, typename T, int W>
EMDPO_ALWAYS_INLINE void load_rewards(const T* p, const T* ref, const Block<W>& b, A beta,
                                      A (*r_at)[W], int32_t* bad) {
  const T* pb = p + b.base;
  const T* rb = ref + b.base;
  A rr[kMaxLaneList * W];
  int32_t any_bad = 0;
#pragma omp simd reduction(| : any_bad)
  for (int32_t j = 0; j < b.span; ++j) {
    const A r = beta * (A(pb[j]) - A(rb[j]));
    rr[j] = r;
    any_bad |= finite_(r) ? 0 : 1;
  }
  // A plain loop the auto-vectorizer turns into (L1-resident) gathers on AVX2/AVX-512.
  for (int32_t s = 0; s < b.max_m; ++s) {
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const int32_t t = b.m[l] - 1 - s;
      r_at[s][l] = t >= 0 ? rr[b.off[l] + (t >= 0 ? t : 0)] : A(0);
    }
  }
  for (int l = 0; l < W; ++l) {
    bad[l] = 0;
    if (any_bad && l < b.n)  // rare: find the lanes that hold the non-finite rewards
      for (int32_t s = 0; s < b.m[l]; ++s) bad[l] |= finite_(rr[b.off[l] + s]) ? 0 : 1;
  }
}

// The backward-pass update of common/listwise.h's push_reward, on lanes; `active` lanes
// take the update, the others keep (mx, z).
template <typename A, int W, typename Ops = LaneOps<A, W>>
EMDPO_ALWAYS_INLINE void push_reward_lanes(typename Ops::F r, typename Ops::I active,
                                           typename Ops::F& mx, typename Ops::F& z) {
  using F = typename Ops::F;
  const F d = r - mx;
  const F abs_d = Ops::select(d < A(0), -d, d);
  const F e = Ops::exp(-abs_d);
  const auto up = d > A(0);
  const F z2 = Ops::select(up, z * e + A(1), z + e);
  const F mx2 = Ops::select(up, r, mx);
  z = Ops::select(active, z2, z);
  mx = Ops::select(active, mx2, mx);
}

// ll[l] = log-likelihood of lane l's record under the type whose row is p. Lane-wise twin
// of record_loglik. Needs b.max_m <= kMaxLaneList. Returns the first lane whose rewards are
// not finite, or -1.
template <typename A, typename T, int W>
EMDPO_ALWAYS_INLINE int block_loglik(const T* p, const T* ref, const Block<W>& b, A beta, A* ll) {
  using Ops = LaneOps<A, W>;
  using F = typename Ops::F;
  using I = typename Ops::I;
  using vint = typename Ops::vint;
  A r_at[kMaxLaneList][W];
  int32_t bad[W];
  load_rewards(p, ref, b, beta, r_at, bad);
  const vint m = load<vint>(b.m), L = load<vint>(b.L);
  F mx = load<F>(r_at[0]);
  F z = F{} + A(1), sum_r = F{}, log_sum = F{}, prod_z = F{} + A(1);
  const int32_t no_flush_steps = b.no_flush_steps;
  for (int32_t s = 1; s < b.max_m; ++s) {
    const vint t = m - 1 - s;
    const I active = Ops::mask(t >= 0);
    const I ranked = Ops::mask((t >= 0) & (t < L));
    const F r = load<F>(r_at[s]);
    push_reward_lanes<A, W>(r, active, mx, z);
    sum_r = Ops::select(ranked, sum_r + (r - mx), sum_r);
    prod_z = Ops::select(ranked, prod_z * z, prod_z);
    // After s steps the product is at most max_m^s, so no lane can pass the flush bound
    // before step no_flush_steps; skipping the check until then changes nothing.
    if (s > no_flush_steps) {
      for (int l = 0; l < W; ++l) {
        if (prod_z[l] > prod_flush_bound<A>()) {
          log_sum[l] += log_(prod_z[l]);
          prod_z[l] = A(1);
        }
      }
    }
  }
  A result[W];
  store(result, sum_r - (log_sum + Ops::log(prod_z)));
  std::memcpy(ll, result, b.n * sizeof(A));
  return first_bad_lane(bad, b.n);
}

// Lane-wise twin of record_loglik_grad_short: ll[l], and g[slot] = coef[l] * beta *
// d ll / d logpi for every slot of every real lane, with no exponential in the forward pass.
// Needs b.max_m <= kMaxLaneList (== kShortList). Returns the first lane whose rewards are
// not finite, or -1.
template <typename A, typename T, typename G, int W>
EMDPO_ALWAYS_INLINE int block_loglik_grad(const T* p, const T* ref, const Block<W>& b, A beta,
                                          const A* coef, G* g, A* ll) {
  static_assert(kMaxLaneList <= kShortList, "lanes handle what the scalar twin handles");
  using Ops = LaneOps<A, W>;
  using F = typename Ops::F;
  using I = typename Ops::I;
  using vint = typename Ops::vint;
  // Step s holds slot t = m - 1 - s of each lane. Row max_m of b_at is padding (ones) so
  // the forward pass can always read "the previous slot's" b.
  A r_at[kMaxLaneList][W];
  A a_at[kMaxLaneList][W], b_at[kMaxLaneList + 1][W], z_at[kMaxLaneList][W];
  int32_t bad[W];
  load_rewards(p, ref, b, beta, r_at, bad);
  const vint m = load<vint>(b.m), L = load<vint>(b.L);
  const F ones = F{} + A(1);
  // Backward pass (t descending): a, b, z per slot, and ll as in block_loglik.
  F mx = load<F>(r_at[0]);
  F z = ones, sum_r = F{}, log_sum = F{}, prod_z = ones;
  store(a_at[0], ones);
  store(b_at[0], ones);
  store(z_at[0], ones);
  for (int32_t s = 1; s < b.max_m; ++s) {
    const vint t = m - 1 - s;
    const I active = Ops::mask(t >= 0);
    const I ranked = Ops::mask((t >= 0) & (t < L));
    const F r = load<F>(r_at[s]);
    const F d = r - mx;
    const F e = Ops::exp(-Ops::select(d < A(0), -d, d));
    const I up = d > A(0);
    const F z2 = Ops::select(up, z * e + A(1), z + e);
    const F mx2 = Ops::select(up, r, mx);
    z = Ops::select(active, z2, z);
    mx = Ops::select(active, mx2, mx);
    // Inactive lanes store the padding values (a = b = z = 1), which the forward pass never
    // uses for them.
    store(a_at[s], Ops::select(active & ~up, e, ones));
    store(b_at[s], Ops::select(active & up, e, ones));
    store(z_at[s], z);
    sum_r = Ops::select(ranked, sum_r + (r - mx), sum_r);
    prod_z = Ops::select(ranked, prod_z * z, prod_z);
    if (s > b.no_flush_steps) {
      for (int l = 0; l < W; ++l) {
        if (prod_z[l] > prod_flush_bound<A>()) {
          log_sum[l] += log_(prod_z[l]);
          prod_z[l] = A(1);
        }
      }
    }
  }
  store(b_at[b.max_m], ones);
  // Forward pass (t ascending, i.e. s descending), written over r_at.
  const F scale = load<F>(coef) * beta;
  F q = F{}, inv_z_prev = ones, P = ones;
  for (int32_t s = b.max_m - 1; s >= 0; --s) {
    const vint t = m - 1 - s;
    const I active = Ops::mask(t >= 0);
    const I ranked = Ops::mask((t >= 0) & (t < L));
    const I first = Ops::mask(t == 0);
    const I at_L = Ops::mask(t == L);
    const F a_s = load<F>(a_at[s]);
    const F b_prev = load<F>(b_at[s + 1]);  // b of slot t - 1
    const F z_s = load<F>(z_at[s]);
    const F inv_z = ones / z_s;
    const F q2 = Ops::select(first, ones, q * b_prev * z_s * inv_z_prev + A(1));
    q = Ops::select(ranked, q2, q);
    const F g_ranked = scale * (A(1) - a_s * inv_z * q);
    const F P2 = Ops::select(at_L, b_prev, P * b_prev);
    P = Ops::select(active & ~ranked, P2, P);
    const F g_unranked = scale * -(a_s * P * inv_z_prev * q);
    inv_z_prev = Ops::select(ranked, inv_z, inv_z_prev);
    store(r_at[s], Ops::select(ranked, g_ranked, g_unranked));
  }
  for (int l = 0; l < b.n; ++l) {
    G* gl = g + b.base + b.off[l];
    const int32_t ml = b.m[l];
    for (int32_t s = 0; s < ml; ++s) gl[ml - 1 - s] = G(r_at[s][l]);
  }
  A result[W];
  store(result, sum_r - (log_sum + Ops::log(prod_z)));
  std::memcpy(ll, result, b.n * sizeof(A));
  return first_bad_lane(bad, b.n);
}

}  // namespace lanes
}  // namespace EMDPO_ISA_NS
}  // namespace emdpo
