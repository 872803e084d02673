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

// One step of the backward pass: fold reward r into the running pair (mx, z) with
// sum_{s>=t} exp(r_s) = exp(mx) * z. Branch-free so that vectorized callers can use it;
// z stays >= 1, so log(z) is always safe.
template <typename A>
EMDPO_HD void push_reward(A r, A& mx, A& z) {
  const A d = r - mx;
  const A e = exp_(-abs_(d));
  const bool up = d > A(0);
  z = up ? z * e + A(1) : z + e;
  mx = up ? r : mx;
}

// Products of the running sums z (each in [1, m]) are flushed into a log once they pass
// this bound, so a record costs about one log instead of one per ranked position while the
// product stays far from overflow in float.
template <typename A> EMDPO_HD A prod_flush_bound() { return A(1.8e19); }

// Log-likelihood of one record under one type: a backward pass over the slots keeping a
// running (max, scaled sum) pair, one exp per slot; ll = sum_{t<L} (r_t - mx_t) -
// log(prod_{t<L} z_t), with LSE_t = mx_t + log z_t. `p` and `ref` point at the record's
// first slot. Sets `finite` to false when any reward is NaN or infinite (the result is
// then meaningless and the caller raises).
template <typename A, typename T>
EMDPO_HD A record_loglik(const T* p, const T* ref, int64_t m, int64_t L, A beta, bool& finite) {
  A mx = beta * (A(p[m - 1]) - A(ref[m - 1]));
  bool ok = finite_(mx);
  A z = A(1);
  A sum_r = A(0), log_sum = A(0), prod_z = A(1);
  for (int64_t t = m - 2; t >= 0; --t) {
    const A r = beta * (A(p[t]) - A(ref[t]));
    ok = ok && finite_(r);
    push_reward(r, mx, z);
    if (t < L) {
      sum_r += r - mx;
      prod_z *= z;
    }
    if (prod_z > prod_flush_bound<A>()) {
      log_sum += log_(prod_z);
      prod_z = A(1);
    }
  }
  finite = finite && ok;
  return sum_r - (log_sum + log_(prod_z));
}

// Log-likelihood and its gradient for one record under one type. Writes
// g[j] = coef * d ll / d logpi(y_j) for every slot j of the record and returns ll.
// g[0..L-1] doubles as scratch for LSE_t between the two passes, so the kernel needs no
// temporary beyond the output it writes anyway.
template <typename A, typename T, typename G>
EMDPO_HD A record_loglik_grad(const T* p, const T* ref, int64_t m, int64_t L, A beta, A coef,
                              G* g, bool& finite) {
  // Backward pass: LSE_t for t < L into g[t], and ll.
  A mx = beta * (A(p[m - 1]) - A(ref[m - 1]));
  bool ok = finite_(mx);
  A z = A(1);
  A ll = A(0);
  for (int64_t t = m - 2; t >= 0; --t) {
    const A r = beta * (A(p[t]) - A(ref[t]));
    ok = ok && finite_(r);
    push_reward(r, mx, z);
    if (t < L) {
      const A lse = mx + log_(z);
      ll += r - lse;
      g[t] = G(lse);
    }
  }
  finite = finite && ok;
  // Forward pass: prefix sums Q_T and the gradient.
  const A scale = coef * beta;
  A q = A(0);
  A lse_prev = A(0);
  for (int64_t j = 0; j < m; ++j) {
    const A r = beta * (A(p[j]) - A(ref[j]));
    A ranked = A(0);
    if (j < L) {
      const A lse = A(g[j]);
      // LSE is non-increasing, so the exponent is <= 0 except at j = 0, where q = 0 and the
      // clamp keeps 0 * exp(.) finite: q becomes 1 there without a special case.
      q = q * exp_(min_zero(lse - lse_prev)) + A(1);
      lse_prev = lse;
      ranked = A(1);
    }
    g[j] = G(scale * (ranked - exp_(r - lse_prev) * q));
  }
  return ll;
}

// Longest list record_loglik_grad_short handles (it keeps three values per slot on the stack).
constexpr int kShortList = 256;

// Log-likelihood and gradient for a record of at most kShortList slots, with no exponential
// in the forward pass: the backward pass keeps, per slot t,
//     a_t = exp(r_t - mx_t),  b_t = exp(mx_{t+1} - mx_t)  (both 1 or the step's e),  z_t,
// and then, with T = min(j, L-1),
//     exp(LSE_T - LSE_{T-1}) = b_{T-1} z_T / z_{T-1},
//     d ll / d r_j = 1 - (a_j / z_j) Q_j                       for j < L,
//                  = -(a_j P_j / z_{L-1}) Q_{L-1},  P_j = prod_{t=L-1}^{j-1} b_t   for j >= L.
// Every factor is in [0, 1] or is z >= 1. Per record: m - 1 exponentials, one log (products
// of z, as in record_loglik, whose ll this returns bit for bit) and m divisions, instead of
// about 3m exponentials. Writes g[j] = coef * beta * d ll / d r_j. The CPU kernels' lanes
// (cpu/listwise_lanes.h) perform the same operations in the same order.
template <typename A, typename T, typename G>
EMDPO_HD A record_loglik_grad_short(const T* p, const T* ref, int64_t m, int64_t L, A beta,
                                    A coef, G* g, bool& finite) {
  A a[kShortList], b[kShortList], z_at[kShortList];
  A mx = beta * (A(p[m - 1]) - A(ref[m - 1]));
  bool ok = finite_(mx);
  A z = A(1);
  a[m - 1] = A(1);
  b[m - 1] = A(1);
  z_at[m - 1] = A(1);
  A sum_r = A(0), log_sum = A(0), prod_z = A(1);
  for (int64_t t = m - 2; t >= 0; --t) {
    const A r = beta * (A(p[t]) - A(ref[t]));
    ok = ok && finite_(r);
    const A d = r - mx;
    const A e = exp_(-abs_(d));
    const bool up = d > A(0);
    z = up ? z * e + A(1) : z + e;
    mx = up ? r : mx;
    a[t] = up ? A(1) : e;
    b[t] = up ? e : A(1);
    z_at[t] = z;
    if (t < L) {
      sum_r += r - mx;
      prod_z *= z;
    }
    if (prod_z > prod_flush_bound<A>()) {
      log_sum += log_(prod_z);
      prod_z = A(1);
    }
  }
  finite = finite && ok;
  const A scale = coef * beta;
  A q = A(0), inv_z_prev = A(1), P = A(1);
  for (int64_t j = 0; j < m; ++j) {
    const A inv_z = A(1) / z_at[j];
    if (j < L) {
      q = (j == 0) ? A(1) : q * b[j - 1] * z_at[j] * inv_z_prev + A(1);
      g[j] = G(scale * (A(1) - a[j] * inv_z * q));
      inv_z_prev = inv_z;
    } else {
      P = (j == L) ? b[j - 1] : P * b[j - 1];
      g[j] = G(scale * -(a[j] * P * inv_z_prev * q));
    }
  }
  return sum_r - (log_sum + log_(prod_z));
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
