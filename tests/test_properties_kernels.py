"""Property tests: every compiled kernel against the float64 reference on generated inputs.

Hypothesis draws the structure (ragged list lengths, top-L depths, K, dtype, beta, weights,
the magnitude of the log-probabilities) and a seed for the values. Runs are derandomized
(the same examples every run, no example database), so a failure reproduces exactly.

Tolerances follow from the arithmetic instead of being tuned: a record's log-likelihood is a
sum of O(m) terms of magnitude up to R = max_j |r_j| (the rewards r = beta (logpi - logpi_ref)),
each rounded once or twice in the kernel's dtype, so its error is bounded by c * eps * m * (R + 1)
with eps the dtype's machine epsilon; c = 16 covers the few roundings per term and the CPU's
polynomial exp/log (a few ulp). Gradients and posteriors inherit that bound through factors
of size <= 1 (softmax probabilities and their differences).
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import emdpo_core as ec  # noqa: E402
from emdpo_core import _core  # noqa: E402

from emdpo_core.ops import _reference as ref  # noqa: E402

# derandomize: the examples are a function of the test alone; database=None: nothing is
# stored between runs, so every run (and CI) checks exactly the same inputs.
PROPERTY = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

C_ROUND = 16  # roundings per term, see the module docstring


@st.composite
def problems(draw, max_records=10, max_len=9):
    """A valid ragged problem: offsets, n_ranked, policy (K, M), ref (M,), beta, dtype."""
    n = draw(st.integers(1, max_records))
    lens = draw(st.lists(st.integers(2, max_len), min_size=n, max_size=n))
    if draw(st.booleans()):
        lens[draw(st.integers(0, n - 1))] = draw(st.integers(20, 300))  # one long list
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    top = draw(st.sampled_from(["full", "top1", "partial"]))
    if top == "full":
        n_ranked = None
    elif top == "top1":
        n_ranked = np.ones(n, dtype=np.int64)
    else:
        n_ranked = np.array([draw(st.integers(1, m - 1)) for m in lens], dtype=np.int64)
    K = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    beta = draw(st.floats(0.05, 10.0))
    center = draw(st.sampled_from([0.0, -40.0, -1e4]))
    spread = draw(st.sampled_from([0.01, 1.0, 5.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    M = int(offsets[-1])
    p = (center + spread * rng.standard_normal((K, M))).astype(dtype)
    r = (center + spread * rng.standard_normal(M)).astype(dtype)
    return dict(offsets=offsets, n_ranked=n_ranked, p=p, r=r, K=K, N=n, M=M, dtype=dtype,
                beta=beta, rng=rng)


def record_bounds(d):
    """(N, K) bound on the absolute error of each record's log-likelihood (docstring)."""
    eps = np.finfo(d["dtype"]).eps
    p, r, off = d["p"].astype(np.float64), d["r"].astype(np.float64), d["offsets"]
    out = np.empty((d["N"], d["K"]))
    for i in range(d["N"]):
        a, b = off[i], off[i + 1]
        # |p| + |r| rather than |p - r|: the difference is itself rounded in the dtype.
        R = d["beta"] * np.max(np.abs(p[:, a:b]) + np.abs(r[a:b]), axis=1)
        out[i] = C_ROUND * eps * (b - a) * (R + 1.0)
    return out


@PROPERTY
@given(problems())
def test_listwise_loglik(d):
    got = ec.listwise_loglik(d["p"], d["r"], d["offsets"], beta=d["beta"],
                             n_ranked=d["n_ranked"])
    want = ref.listwise_loglik(d["p"], d["r"], d["offsets"], beta=d["beta"],
                               n_ranked=d["n_ranked"])
    assert got.dtype == d["dtype"] and got.shape == (d["N"], d["K"])
    assert np.all(np.abs(got - want) <= record_bounds(d))


@st.composite
def e_step_problems(draw):
    d = draw(problems())
    N, K, rng = d["N"], d["K"], d["rng"]
    n_cuts = draw(st.integers(0, N))
    cuts = np.sort(rng.integers(0, N + 1, n_cuts))        # repeated cuts: empty annotators
    d["aoff"] = np.concatenate([[0], cuts, [N]]).astype(np.int64)
    H = len(d["aoff"]) - 1
    eta = rng.dirichlet(np.ones(K))
    if K > 1 and draw(st.booleans()):
        eta[draw(st.integers(0, K - 1))] = 0.0             # a type of weight zero: -inf
    d["lw"] = np.log(eta, where=eta > 0, out=np.full(K, -np.inf))
    if not np.any(np.isfinite(d["lw"])):
        d["lw"][0] = 0.0
    d["cw"] = (rng.uniform(0.0, 2.0, N).astype(d["dtype"]) if draw(st.booleans()) else None)
    d["v"] = rng.uniform(0.0, 3.0, H) if draw(st.booleans()) else None
    return d


@PROPERTY
@given(e_step_problems())
def test_e_step(d):
    N, M, K = d["N"], d["M"], d["K"]
    H = len(d["aoff"]) - 1
    resp = np.empty((H, K), d["dtype"])
    annot = np.empty((H, K), d["dtype"])
    tt = np.empty(K)
    bad, ll = _core.e_step(d["p"], d["r"], d["offsets"], d["n_ranked"], d["cw"], d["aoff"],
                           d["lw"], N, M, K, H, d["beta"], resp, annot, None,
                           annotator_weights=d["v"], type_totals=tt)
    assert bad == -1
    w_resp, w_ll, w_S = ref.e_step(d["p"], d["r"], d["offsets"], d["aoff"], d["lw"],
                                   beta=d["beta"], n_ranked=d["n_ranked"],
                                   record_weights=d["cw"], annotator_weights=d["v"])
    eps = np.finfo(d["dtype"]).eps
    c = np.ones(N) if d["cw"] is None else d["cw"].astype(np.float64)
    rec_err = record_bounds(d)
    # S_hk = sum_i c_i ll_ik: the records' errors add up (plus the rounding of the stored S).
    S_err = np.array([(c[a:b, None] * rec_err[a:b]).sum(axis=0)
                      for a, b in zip(d["aoff"][:-1], d["aoff"][1:])]).reshape(H, K)
    assert np.all(np.abs(annot - w_S) <= S_err + eps * np.abs(w_S))
    # A posterior moves by at most half the largest error of its row's terms (the softmax's
    # Jacobian has rows of absolute sum <= 2 g (1 - g) <= 1/2), plus its own rounding.
    g_err = 0.5 * S_err.max(axis=1, keepdims=True) + 4 * eps
    assert np.all(np.abs(resp - w_resp) <= g_err)
    np.testing.assert_allclose(resp.astype(np.float64).sum(axis=1), 1.0, rtol=0,
                               atol=4 * K * eps)
    v = np.ones(H) if d["v"] is None else d["v"]
    lse_err = S_err.max(axis=1) + 1e-12 * np.abs(w_ll)      # logsumexp is 1-Lipschitz
    assert abs(ll - w_ll) <= (v * lse_err).sum() + 1e-12 * abs(w_ll)
    want_tt = ref.e_step_type_totals(w_resp, d["v"])
    assert np.all(np.abs(tt - want_tt) <= (v[:, None] * g_err).sum(axis=0) + 1e-12)


@st.composite
def loss_problems(draw):
    d = draw(problems())
    K, N, rng = d["K"], d["N"], d["rng"]
    d["reduction"] = draw(st.sampled_from(["sum", "mean", "weighted_mean", "none"]))
    d["one"] = K == 1 and draw(st.booleans())                 # a single policy as (M,)
    kind = draw(st.sampled_from(["none", "uniform", "sparse"]))
    if kind == "none":
        d["w"] = None
    else:
        w = rng.uniform(0.0, 2.0, (K, N))
        if kind == "sparse":
            w[rng.uniform(size=(K, N)) < 0.5] = 0.0
            w[:, 0] = np.maximum(w[:, 0], 0.1)                # a positive sum per type
        d["w"] = w.astype(d["dtype"])
    return d


@PROPERTY
@given(loss_problems())
def test_listwise_dpo_loss_and_grad(d):
    p = d["p"][0] if d["one"] else d["p"]
    w = None if d["w"] is None else (d["w"][0] if d["one"] else d["w"])
    kw = dict(beta=d["beta"], n_ranked=d["n_ranked"], reduction=d["reduction"])
    loss, grad = ec.listwise_dpo_loss_and_grad(p, d["r"], d["offsets"], w, **kw)
    w_loss, w_grad = ref.listwise_dpo_loss_and_grad(p, d["r"], d["offsets"], w, **kw)
    assert grad.shape == p.shape and grad.dtype == d["dtype"]
    K, N, eps = d["K"], d["N"], np.finfo(d["dtype"]).eps
    W = np.ones((K, N)) if d["w"] is None else np.abs(d["w"].astype(np.float64))
    scale = {"sum": np.ones(K), "none": np.ones(K), "mean": np.full(K, 1.0 / N),
             "weighted_mean": 1.0 / W.sum(axis=1)}[d["reduction"]]
    rec_err = record_bounds(d).T * W                          # (K, N) per weighted record
    if d["reduction"] == "none":
        got = np.asarray(loss).reshape(K, N)
        want = np.asarray(w_loss).reshape(K, N)
        assert np.all(np.abs(got - want) <= rec_err + eps * np.abs(want))
    else:
        err = (scale * rec_err.sum(axis=1)).sum()
        assert abs(loss - w_loss) <= err + 1e-12 * abs(w_loss)
    # d ll / d r_j is a difference of softmax sums of size <= L; its error is that of the
    # record's terms (exp is relative-error-stable: |d exp(x)| = exp(x) |dx|), times beta.
    g = np.asarray(grad, np.float64).reshape(K, -1)
    wg = np.asarray(w_grad, np.float64).reshape(K, -1)
    off = d["offsets"]
    for i in range(N):
        a, b = off[i], off[i + 1]
        L = (b - a - 1) if d["n_ranked"] is None else d["n_ranked"][i]
        tol = d["beta"] * scale * W[:, i] * L * (rec_err[:, i] / np.maximum(W[:, i], 1e-300)
                                                 + C_ROUND * eps)
        assert np.all(np.abs(g[:, a:b] - wg[:, a:b]) <= tol[:, None] + 1e-300), i


@st.composite
def regret_problems(draw):
    K = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(1, 6), min_size=K, max_size=K))
    so = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    S = int(so[-1])
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    center = draw(st.sampled_from([0.0, -40.0, -1e4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lp = (center + rng.standard_normal((K, S))).astype(dtype)
    lr = (center + rng.standard_normal(S)).astype(dtype)
    sw = None
    if draw(st.booleans()):
        sw = rng.uniform(0.0, 2.0, S)
        sw[so[:-1]] += 0.1                                   # a positive sum per source
        sw = sw.astype(dtype)
    return dict(lp=lp, lr=lr, so=so, sw=sw, beta=draw(st.floats(0.05, 10.0)),
                kind=draw(st.sampled_from(["reward", "kl"])))


@PROPERTY
@given(regret_problems())
def test_regret_matrix(d):
    kw = dict(beta=d["beta"], kind=d["kind"], sample_weights=d["sw"])
    got = ec.regret_matrix(d["lp"], d["lr"], d["so"], **kw)
    want = ref.regret_matrix(d["lp"], d["lr"], d["so"], **kw)
    # The kernel accumulates float64 terms formed from the inputs: float64 rounding of sums
    # of at most S terms of size max|lp| + max|lr|.
    mag = d["beta"] * (np.abs(d["lp"]).max() + np.abs(d["lr"]).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * np.finfo(np.float64).eps * mag
                               * d["lp"].shape[1])
