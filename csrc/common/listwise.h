// Per-record Plackett-Luce math, written once for the CPU loops and the CUDA kernels.
//
// Record layout (docs/math.md): the m responses of a record sit best first in
// consecutive slots; the first L positions are ranked (1 <= L <= m-1). With the implicit
// rewards r_j = beta * (logpi(y_j) - logpi_ref(y_j)) the record's log-likelihood is
//     ll = sum_{t<L} (r_t - LSE_t),   LSE_t = logsumexp_{s>=t} r_s,
// and its derivative with respect to logpi(y_j) is
//     beta * ([j < L] - exp(r_j - LSE_T) * Q_T),   T = min(j, L-1),
//     Q_T = sum_{t<=T} exp(LSE_T - LSE_t)   (so Q_T = Q_{T-1} * exp(LSE_T - LSE_{T-1}) + 1).
// Every exponent above is <= 0 (LSE_t is non-increasing in t and r_j <= LSE_T for j >= T),
// so nothing overflows even for rewards of +-1e5, and Q_T <= T + 1.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/fastmath.h"

#if defined(__CUDACC__)
#define EMDPO_HD __host__ __device__ __forceinline__
#else
// Always inlined: the CPU kernels are compiled once per instruction set (target clones)
// and each clone must get its own vectorized copy of this math.
#define EMDPO_HD EMDPO_ALWAYS_INLINE
#endif

namespace emdpo {
inline namespace EMDPO_ISA_NS {

// The type per-record math runs in: float inputs stay float (enough for ~1e-5 relative
// accuracy per record), double stays double. Sums over records always use double.
template <typename T> struct compute_type { using type = T; };

// float: the device's expf/logf on the GPU; on the CPU, polynomials that vectorize
// (common/fastmath.h). The scalar and vectorized CPU paths share them, so they agree bitwise.
#if defined(__CUDA_ARCH__)
EMDPO_HD float exp_(float x) { return expf(x); }
EMDPO_HD float log_(float x) { return logf(x); }
#else
EMDPO_HD float exp_(float x) { return fastmath::expf(x); }
EMDPO_HD float log_(float x) { return fastmath::logf(x); }
#endif
EMDPO_HD double exp_(double x) { return exp(x); }
EMDPO_HD double log_(double x) { return log(x); }
EMDPO_HD float abs_(float x) { return fabsf(x); }
EMDPO_HD double abs_(double x) { return fabs(x); }
template <typename A> EMDPO_HD A min_zero(A x) { return x < A(0) ? x : A(0); }
// True for finite x; written with comparisons only so it survives any math flags.
template <typename A> EMDPO_HD bool finite_(A x) { return abs_(x) < A(INFINITY); }
// w * x, where a weight of 0 contributes exactly nothing: also when x is infinite (a
// log-likelihood below the range of A from finite rewards, e.g. rewards -2e38 and 2e38 in
// float), where the product would be NaN. Every weighted term of the E-step and the loss goes
// through this, on both devices. For finite x it is w * x itself, signed zeros included.
template <typename A> EMDPO_HD A weighted(A w, A x) {
  return (w != A(0) || finite_(x)) ? w * x : A(0);
}

// The formulas below are written once, over a Base: the exponential, logarithm and
// reciprocal of the base the rewards are measured in, and the conversion of a result to
// natural units. NaturalBase is the CPU's (rewards in nats); cuda/record2.cuh defines the
// GPU's base 2 (rewards in bits, on the hardware's exp2/log2/reciprocal approximations).
// The ratios the formulas are built from (exp(r - mx), the running sums z) are the same
// numbers in either base.
struct NaturalBase {
  template <typename A> static EMDPO_HD A exp(A x) { return exp_(x); }
  template <typename A> static EMDPO_HD A log(A x) { return log_(x); }
  template <typename A> static EMDPO_HD A rcp(A x) { return A(1) / x; }
  template <typename A> static EMDPO_HD A to_nats(A x) { return x; }
};

// Loops over the slots of a register array are fully unrolled by nvcc (EMDPO_UNROLL), so
// that every index is a compile-time constant and the array never leaves registers.
#if defined(__CUDA_ARCH__)
#define EMDPO_UNROLL _Pragma("unroll")
#else
#define EMDPO_UNROLL
#endif

// How a formula walks a record's m slots. runtime: slots m-1 .. 0 (any m; the CPU, and the
// GPU's long lists). The GPU's short lists, in register arrays of MM slots, loop over
// compile-time ranges: exact (m == MM) or padded (m <= MM: all MM slots with guards t < m,
// the backward pass starting from (mx, z) = (-inf, 0), so that the first real slot sets
// mx = r, z = 1 exactly as the other walks start).
enum class Walk { runtime, exact, padded };

// Rewards read from memory: r_t = c * (p[t] - ref[t]) (c = beta, or beta * log2 e in base 2).
// The difference comes first: p and ref are often close and large (-1e4), and c*p - c*ref
// would lose the low bits. kCheck: the walks test each reward they read for finiteness
// (rewards in registers were tested when loaded). __restrict__ for nvcc only: the CPU
// build keeps the code it was measured with.
#if defined(__CUDACC__)
#define EMDPO_RESTRICT __restrict__
#else
#define EMDPO_RESTRICT
#endif
template <typename A, typename T>
struct MemoryRewards {
  static constexpr bool kCheck = true;
  const T* EMDPO_RESTRICT p;
  const T* EMDPO_RESTRICT ref;
  A c;
  EMDPO_HD A operator()(int64_t t) const { return c * (A(p[t]) - A(ref[t])); }
};

// One step of the backward pass: fold reward r into the running pair (mx, z) with
// sum_{s>=t} base^r_s = base^mx * z. Branch-free; z stays >= 1, so log(z) is always safe.
// Returns e = base^-|r - mx| and sets up when r became the maximum.
template <typename Base, typename A>
EMDPO_HD A push_reward(A r, A& mx, A& z, bool& up) {
  const A d = r - mx;
  const A e = Base::exp(-abs_(d));
  up = d > A(0);
  z = up ? z * e + A(1) : z + e;
  mx = up ? r : mx;
  return e;
}

// Products of the running sums z (each in [1, m]) are flushed into a log once they pass
// this bound, so a record costs about one log instead of one per ranked position while the
// product stays far from overflow in float.
template <typename A> EMDPO_HD A prod_flush_bound() { return A(1.8e19); }

// ll = sum_{t<L} (r_t - mx_t) - log(prod_{t<L} z_t), LSE_t = mx_t + log z_t, accumulated
// over the backward pass. FLUSH false: the caller's walk is short enough that the product
// cannot approach the bound (compile-time walks), and the check is left out.
template <typename A, typename Base, bool FLUSH>
struct LoglikSum {
  A sum_r = A(0), log_sum = A(0), prod = A(1);
  EMDPO_HD void add_ranked(A r, A mx, A z) {
    sum_r += r - mx;
    prod *= z;
  }
  EMDPO_HD void flush() {
    if (FLUSH && prod > prod_flush_bound<A>()) {
      log_sum += Base::log(prod);
      prod = A(1);
    }
  }
  EMDPO_HD A value() const {
    return Base::to_nats(FLUSH ? sum_r - (log_sum + Base::log(prod)) : sum_r - Base::log(prod));
  }
};
// Whether a walk needs the flush. Compile-time walks hold at most 15 sums, each <= 16: a
// product below 2^60 < 1.8e19.
template <int MM, Walk W>
struct needs_flush {
  static_assert(W == Walk::runtime || MM <= 16, "compile-time walks are short lists");
  static constexpr bool value = W == Walk::runtime;
};

// The backward pass over a record's slots t = m-1 .. 0, keeping the running (max, scaled
// sum) pair, one exp per slot; returns the record's log-likelihood. `reward(t)` gives slot
// t's reward (t < m); MM only matters for the compile-time walks. After each step,
// on_step(t, e, up, z) sees the step's exponential, its direction and the running sum
// (walk_loglik_grad keeps them for its forward pass).
template <typename Base, int MM, Walk W, typename A, typename I, typename Reward, typename OnStep>
EMDPO_HD A backward_pass(const Reward& reward, I m, I L, bool& finite, OnStep&& on_step) {
  constexpr bool kPadded = W == Walk::padded;
  const I n = W == Walk::runtime ? m : I(MM);
  A mx = kPadded ? A(-INFINITY) : reward(n - 1);
  bool ok = !Reward::kCheck || finite_(mx);
  A z = kPadded ? A(0) : A(1);
  LoglikSum<A, Base, needs_flush<MM, W>::value> ll;
  EMDPO_UNROLL
  for (I t = n - (kPadded ? 1 : 2); t >= 0; --t) {
    if (!kPadded || t < m) {
      const A r = reward(t);
      ok = ok && (!Reward::kCheck || finite_(r));
      bool up;
      const A e = push_reward<Base>(r, mx, z, up);
      on_step(t, e, up, z);
      // reward(t) again rather than r: the same value, but with the read inside the branch
      // nvcc keeps a branch around each padded slot of a register walk (holding r across it,
      // it if-converted the slots: measured, about 5% more instructions in that path).
      if (t < L) ll.add_ranked(reward(t), mx, z);
      ll.flush();
    }
  }
  finite = finite && ok;
  return ll.value();
}

struct NoStep {
  template <typename... X> EMDPO_HD void operator()(X...) const {}
};

// Log-likelihood of one record (see backward_pass).
template <typename Base, int MM, Walk W, typename A, typename I, typename Reward>
EMDPO_HD A walk_loglik(const Reward& reward, I m, I L, bool& finite) {
  return backward_pass<Base, MM, W, A>(reward, m, L, finite, NoStep{});
}

// Log-likelihood and gradient of one record with no exponential in the forward pass: the
// backward pass keeps, per slot t (arrays of MM slots, m <= MM),
//     a_t = exp(r_t - mx_t),  b_t = exp(mx_{t+1} - mx_t)  (both 1 or the step's e),  z_t,
// and then, with T = min(j, L-1),
//     exp(LSE_T - LSE_{T-1}) = b_{T-1} z_T / z_{T-1},
//     d ll / d r_j = 1 - (a_j / z_j) Q_j                       for j < L,
//                  = -(a_j P_j / z_{L-1}) Q_{L-1},  P_j = prod_{t=L-1}^{j-1} b_t   for j >= L.
// Every factor is in [0, 1] or is z >= 1. Per record: m - 1 exponentials, one log (products
// of z, as in walk_loglik, whose ll this returns bit for bit) and one reciprocal per ranked
// slot, instead of about 3m exponentials. Writes g[j] = scale * d ll / d r_j (natural r)
// and returns ll. The CPU kernels' lanes (cpu/listwise_lanes.h) perform the same
// operations in the same order.
template <typename Base, int MM, Walk W, typename A, typename I, typename Reward, typename G>
EMDPO_HD A walk_loglik_grad(const Reward& reward, I m, I L, A scale, G* g, bool& finite) {
  constexpr bool kPadded = W == Walk::padded;
  const I n = W == Walk::runtime ? m : I(MM);
  A a[MM], b[MM], zt[MM];
  a[n - 1] = A(1);
  b[n - 1] = A(1);
  zt[n - 1] = A(1);
  const A ll = backward_pass<Base, MM, W, A>(reward, m, L, finite, [&](I t, A e, bool up, A z) {
    // Padded, at t = m-1: up, e = 0, so a = 1, z = 1 (b is never read there).
    a[t] = up ? A(1) : e;
    b[t] = up ? e : A(1);
    zt[t] = z;
  });
  A q = A(1), inv_prev = A(1), P = A(1);
  EMDPO_UNROLL
  for (I j = 0; j < n; ++j) {
    if (!kPadded || j < m) {
      if (j == 0) {  // L >= 1: slot 0 is always ranked, and Q_0 = 1
        inv_prev = Base::rcp(zt[0]);
        g[0] = G(scale * (A(1) - a[0] * inv_prev));
      } else if (j < L) {
        const A inv_z = Base::rcp(zt[j]);
        q = q * b[j - 1] * zt[j] * inv_prev + A(1);
        g[j] = G(scale * (A(1) - a[j] * inv_z * q));
        inv_prev = inv_z;
      } else {
        P = (j == L) ? b[j - 1] : P * b[j - 1];
        g[j] = G(scale * -(a[j] * P * inv_prev * q));
      }
    }
  }
  return ll;
}

// Log-likelihood of one record under one type (any length). `p` and `ref` point at the
// record's first slot; rewards c * (p - ref). Sets `finite` to false when any reward is NaN
// or infinite (the result is then meaningless and the caller raises).
template <typename A, typename Base = NaturalBase, typename T>
EMDPO_HD A record_loglik(const T* p, const T* ref, int64_t m, int64_t L, A c, bool& finite) {
  return walk_loglik<Base, 0, Walk::runtime, A>(MemoryRewards<A, T>{p, ref, c}, m, L, finite);
}

// Longest list record_loglik_grad_short handles (it keeps three values per slot on the stack).
constexpr int kShortList = 256;

// walk_loglik_grad for a record of at most kShortList slots in memory.
template <typename A, typename Base = NaturalBase, typename T, typename G>
EMDPO_HD A record_loglik_grad_short(const T* p, const T* ref, int64_t m, int64_t L, A c,
                                    A scale, G* g, bool& finite) {
  return walk_loglik_grad<Base, kShortList, Walk::runtime, A>(MemoryRewards<A, T>{p, ref, c}, m,
                                                               L, scale, g, finite);
}

// Log-likelihood and its gradient for one record of any length, by the formulas of the
// header comment (LSE_t kept, about 3m exponentials): writes g[j] = scale * d ll / d r_j
// (natural r) for every slot j of the record and returns ll. g[0..L-1] doubles as scratch
// for LSE_t between the two passes, so the kernel needs no temporary beyond the output.
template <typename A, typename Base = NaturalBase, typename T, typename G>
EMDPO_HD A record_loglik_grad(const T* p, const T* ref, int64_t m, int64_t L, A c, A scale,
                              G* EMDPO_RESTRICT g, bool& finite) {
  const MemoryRewards<A, T> reward{p, ref, c};
  // Backward pass: LSE_t for t < L into g[t], and ll.
  A mx = reward(m - 1);
  bool ok = finite_(mx);
  A z = A(1);
  A ll = A(0);
  for (int64_t t = m - 2; t >= 0; --t) {
    const A r = reward(t);
    ok = ok && finite_(r);
    bool up;
    push_reward<Base>(r, mx, z, up);
    if (t < L) {
      const A lse = mx + Base::log(z);
      ll += r - lse;
      g[t] = G(lse);
    }
  }
  finite = finite && ok;
  // Forward pass: prefix sums Q_T and the gradient.
  A q = A(0);
  A lse_prev = A(0);
  for (int64_t j = 0; j < m; ++j) {
    const A r = reward(j);
    A ranked = A(0);
    if (j < L) {
      const A lse = A(g[j]);
      // LSE is non-increasing, so the exponent is <= 0 except at j = 0, where q = 0 and the
      // clamp keeps 0 * exp(.) finite: q becomes 1 there without a special case.
      q = q * Base::exp(min_zero(lse - lse_prev)) + A(1);
      lse_prev = lse;
      ranked = A(1);
    }
    g[j] = G(scale * (ranked - Base::exp(r - lse_prev) * q));
  }
  return Base::to_nats(ll);
}

// The difference (log eta_k + S_k) - (log eta_m + S_m) of two E-step terms, like parts
// first: exact when the types' log-weights are equal, and at |S| ~ 1e16 (where the spacing of
// doubles is 2) the rounding of each term would otherwise decide the posterior. Formed from
// halves: halving is exact, so this is bitwise (lw_k - lw_m) + (S_k - S_m) wherever that does
// not overflow, and it stays finite for log-weights and sums near -1.8e308.
EMDPO_HD double term_difference(const double* S, const double* log_weights, int64_t k,
                                int64_t m) {
  return 2.0 * ((0.5 * log_weights[k] - 0.5 * log_weights[m]) + (0.5 * S[k] - 0.5 * S[m]));
}

// Finish one annotator of the E-step from its per-type sums S_k:
// log g_k = log eta_k + S_k - lse, lse = logsumexp_j (log eta_j + S_j). Returns lse.
//
// Every term is used only through its difference d_k from the largest term m (see
// term_difference): g_k = exp(d_k - log z), z = sum_j exp(d_j), never exp(v_k - lse), since at
// |v| ~ 1e16 and beyond lse = v_m + log z rounds log z (<= log K) away and the row would not
// sum to 1. A type with log-weight -inf or S_k = -inf (log-likelihood below the double range)
// gets g_k = 0. lse is -inf when it lies below the double range. When every type's term is
// -inf there is no posterior: the row is set to NaN and NaN is returned, for the caller to
// report.
template <typename T>
EMDPO_HD double finish_annotator(const double* S, const double* log_weights, int64_t K,
                                 T* resp_row, T* annot_ll_row) {
  int64_t m = -1;
  for (int64_t k = 0; k < K; ++k) {
    annot_ll_row[k] = T(S[k]);
    if (!(log_weights[k] > -INFINITY && S[k] > -INFINITY)) continue;
    if (m < 0 || term_difference(S, log_weights, k, m) > 0.0) m = k;
  }
  if (m < 0) {
    for (int64_t k = 0; k < K; ++k) resp_row[k] = T(NAN);
    return NAN;
  }
  double z = 0.0;
  for (int64_t k = 0; k < K; ++k)
    if (log_weights[k] > -INFINITY && S[k] > -INFINITY)
      z += exp(term_difference(S, log_weights, k, m));
  const double log_z = log(z);  // z in [1, K] (up to rounding)
  for (int64_t k = 0; k < K; ++k)
    resp_row[k] = (log_weights[k] > -INFINITY && S[k] > -INFINITY)
                      ? T(exp(term_difference(S, log_weights, k, m) - log_z))
                      : T(0);
  return 2.0 * (0.5 * log_weights[m] + 0.5 * S[m]) + log_z;
}

}  // namespace EMDPO_ISA_NS
}  // namespace emdpo
