"""The compiled kernels against the float64 reference (emdpo_core.ops._reference), through
the public functions, on every device of the one devices list (conftest.DEVICES): "cpu" runs
the NumPy entry points, "cuda" the same calls with torch CUDA tensors (skipped, with the
reason, without a CUDA build or device). Values and gradients on fresh random inputs; under
``poisoned_outputs`` the CUDA dispatch's outputs and workspaces start as NaN / 0xFF bytes, so
an entry a kernel leaves unwritten fails the comparison. Tests of what only CUDA has (streams,
the validation cache, workspaces, mixed devices) are in test_cuda.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (DEVICES, TOL, assert_close, device_of, dtype_of, host, make_annotators,
                      make_records, on, random_layout, random_logps, run_all_kernels,
                      segment_sums)

import emdpo_core as ec
from emdpo_core import _core
from emdpo_core.ops import _reference as ref

DTYPES = [np.float64, np.float32]

# (name, min_len, max_len, partial): the list shapes real data has.
LAYOUTS = [
    ("pairs", 2, 2, False),
    ("best_of_3", 3, 3, "top1"),
    ("full_3", 3, 3, False),
    ("ragged_partial", 2, 12, True),
    ("long_lists", 2, 300, True),
]

# The fast subset run against an installed wheel (`pytest -m smoke`, .ci/wheel_smoke.sh).
pytestmark = pytest.mark.smoke


def make_layout(rng, name, lo, hi, partial, n):
    offsets, n_ranked = random_layout(rng, n, lo, hi, partial=bool(partial))
    if partial == "top1":
        n_ranked = np.ones(n, dtype=np.int64)
    return offsets, n_ranked


# Cases of listwise_loglik: the list shapes above (60 records, K = 3, beta 0.8), and the CUDA
# kernels' launch shapes (make_records: partial rankings with lists up to 300, full rankings,
# hundreds of pairs or best-of-3 lists, K up to 9, a single record) at a random beta in
# [0.1, 10].
LOGLIK_CASES = ([("layout",) + lay for lay in LAYOUTS]
                + [("records", "top_l", 300, 3), ("records", "full", 97, 1),
                   ("records", "pairs", 700, 2), ("records", "best_of_3", 513, 9),
                   ("records", "top_l", 1, 1)])


def _loglik_case(rng, case, dtype):
    """(policy, ref, offsets, n_ranked, beta) for a LOGLIK_CASES entry."""
    if case[0] == "layout":
        offsets, n_ranked = make_layout(rng, *case[1:], n=60)
        p, r = random_logps(rng, 3, offsets[-1], dtype)
        return p, r, offsets, n_ranked, 0.8
    _, layout, N, K = case
    p, r, offsets, n_ranked = make_records(rng, N, K, layout, dtype)
    return p, r, offsets, n_ranked, float(rng.uniform(0.1, 10.0))


def _case_id(case):
    return case[1] if case[0] == "layout" else "-".join(map(str, case[1:]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LOGLIK_CASES, ids=_case_id)
def test_listwise_loglik_matches_reference(poisoned_outputs, rng, device, dtype, case):
    p, r, offsets, n_ranked, beta = _loglik_case(rng, case, dtype)
    got = ec.listwise_loglik(on(device, p), on(device, r), on(device, offsets), beta=beta,
                             n_ranked=on(device, n_ranked))
    want = ref.listwise_loglik(p, r, offsets, beta=beta, n_ranked=n_ranked)
    assert device_of(got) == device and dtype_of(got) == dtype
    assert_close(got, want, dtype, "listwise_loglik")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_listwise_loglik_one_policy_and_extremes(rng, device, dtype):
    # log-probabilities near -1e4 and beta = 10 (stable at the extremes), K = 1 given as (M,)
    p, r, offsets, n_ranked = make_records(rng, 120, 1, "top_l", dtype, shift=-1e4)
    want = ref.listwise_loglik(p, r, offsets, beta=10.0, n_ranked=n_ranked)
    got = ec.listwise_loglik(on(device, p[0]), on(device, r), on(device, offsets), beta=10.0,
                             n_ranked=on(device, n_ranked))
    assert tuple(got.shape) == (120, 1)
    assert_close(got, want, dtype, "listwise_loglik, K=1 given as (M,)")


@pytest.mark.parametrize("device", DEVICES)
def test_single_policy_accepts_1d_and_2d(rng, device):
    offsets, n_ranked = random_layout(rng, 30)
    p, r = random_logps(rng, 1, offsets[-1])
    d = (lambda x: on(device, x))
    a = ec.listwise_loglik(d(p[0]), d(r), d(offsets), beta=1.0, n_ranked=d(n_ranked))
    b = ec.listwise_loglik(d(p), d(r), d(offsets), beta=1.0, n_ranked=d(n_ranked))
    np.testing.assert_array_equal(host(a), host(b))
    assert tuple(a.shape) == (30, 1) and device_of(a) == device


def test_pairs_equal_dpo_sigmoid_loss(rng):
    n = 50
    offsets = np.arange(0, 2 * n + 1, 2)
    p, r = random_logps(rng, 1, 2 * n)
    beta = 0.3
    margin = beta * ((p[0, 0::2] - r[0::2]) - (p[0, 1::2] - r[1::2]))
    want = -np.logaddexp(0.0, -margin)  # log sigmoid(margin)
    np.testing.assert_allclose(ec.listwise_loglik(p, r, offsets, beta=beta)[:, 0], want,
                               rtol=1e-12)


ANNOTATOR_CASES = ["random", "one_annotator", "one_record_each", "with_empty"]

# Cases of the E-step. "grouped": 5000 records (several of the CPU kernel's 2048-record
# reduction chunks, so annotators straddle chunk boundaries) grouped by annotator ids with
# ec.group_by_annotator, K = 4, with or without record weights. "records": annotator layouts
# around the CUDA kernels' 256-record tiles (make_annotators), K up to 9, record weights,
# beta in [0.1, 2], a single record.
E_STEP_CASES = ([("grouped", case, weighted) for case in ANNOTATOR_CASES
                 for weighted in (False, True)]
                + [("records", "one", 600, 3), ("records", "singletons", 300, 2),
                   ("records", "random", 900, 9), ("records", "with_empty", 200, 1),
                   ("records", "one", 1, 1)])


def _e_step_case(rng, case, dtype):
    """dict(p, r, off, nr, ao, log_w, c, beta) for an E_STEP_CASES entry."""
    if case[0] == "grouped":
        _, how, weighted = case
        N, K = 5000, 4
        offsets, n_ranked = random_layout(rng, N, 2, 6)
        if how == "random":
            ann = rng.integers(0, 700, size=N)
        elif how == "one_annotator":
            ann = np.zeros(N, dtype=np.int64)
        elif how == "one_record_each":
            ann = rng.permutation(N)
        else:  # ids with gaps: annotators without records in between and at the end
            ann = 3 * rng.integers(0, 200, size=N)
        n_ann = int(ann.max()) + 1 + (5 if how == "with_empty" else 0)
        order, aoff = ec.group_by_annotator(ann, n_annotators=n_ann)
        slots = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])
        p, r = random_logps(rng, K, offsets[-1], dtype, scale=1.0)
        return dict(p=np.ascontiguousarray(p[:, slots]), r=np.ascontiguousarray(r[slots]),
                    off=np.concatenate([[0], np.cumsum(np.diff(offsets)[order])]),
                    nr=n_ranked[order], ao=aoff, log_w=np.log(rng.dirichlet(np.ones(K))),
                    c=rng.uniform(0.5, 2.0, size=N) if weighted else None, beta=0.5)
    _, annotators, N, K = case
    p, r, off, nr = make_records(rng, N, K, "top_l", dtype, logp_scale=1.0)
    ao = make_annotators(rng, N, annotators)
    beta = float(rng.uniform(0.1, 2.0))
    log_w = np.log(rng.dirichlet(np.ones(K)))
    c = rng.uniform(0.0, 2.0, N).astype(dtype)
    return dict(p=p, r=r, off=off, nr=nr, ao=ao, log_w=log_w, c=c, beta=beta)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", E_STEP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_e_step_matches_reference(poisoned_outputs, rng, device, dtype, case):
    x = _e_step_case(rng, case, dtype)
    p, r, off, nr, ao, log_w, c, beta = (x[k] for k in ("p", "r", "off", "nr", "ao", "log_w",
                                                        "c", "beta"))
    got = ec.e_step(on(device, p), on(device, r), on(device, off), on(device, ao), log_w,
                    beta=beta, n_ranked=on(device, nr), record_weights=on(device, c),
                    return_record_loglik=True)
    resp, ll, S = ref.e_step(p, r, off, ao, log_w, beta=beta, n_ranked=nr, record_weights=c)
    H, K = len(ao) - 1, p.shape[0]
    assert tuple(got.responsibilities.shape) == (H, K)
    assert device_of(got.responsibilities) == device
    assert_close(got.annotator_loglik, S, dtype, "annotator_loglik")
    assert_close(got.responsibilities, resp, dtype, "responsibilities")
    assert_close(np.array([got.loglik]), np.array([ll]), dtype, "loglik")
    assert got.loglik == pytest.approx(ll, rel=TOL[dtype]["rtol"])
    assert_close(got.record_loglik, ref.listwise_loglik(p, r, off, beta=beta, n_ranked=nr),
                 dtype, "record_loglik")
    np.testing.assert_allclose(host(got.responsibilities).sum(axis=1), 1.0, **TOL[dtype])
    # An annotator without records keeps the prior.
    empty = np.flatnonzero(np.diff(ao) == 0)
    if "with_empty" in case:
        assert empty.size > 0
    np.testing.assert_allclose(host(got.responsibilities)[empty],
                               np.exp(log_w)[None].repeat(empty.size, 0), **TOL[dtype])


# Cases of the annotator weights v and type totals through the public entry point:
# (annotator layout, N, H, K). "cuts": H annotators at random cuts (empty ones possible) and
# one annotator of weight 0; "with_empty": make_annotators' empty annotators first, in
# between and last.
WEIGHT_CASES = [("cuts", 400, 37, 3), ("with_empty", 900, None, 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=lambda c: c[0])
def test_e_step_annotator_weights_and_type_totals_match_reference(rng, device, dtype, case):
    """e_step passes annotator weights v to the kernels and returns their type totals
    (CPU: the CPU kernel; CUDA: the CUDA kernel, which weighs and sums on the device) and
    matches the reference. On the CPU it is called with NumPy arrays and with torch CPU
    tensors; on CUDA the log weights and annotator weights are tensors on the device too
    (used there; their checks run there and are read with the result)."""
    how, N, H, K = case
    if how == "cuts":
        offsets, n_ranked = random_layout(rng, N, 2, 7)
        aoff = np.concatenate([[0], np.sort(rng.integers(0, N + 1, size=H - 1)), [N]])
        p, r = random_logps(rng, K, offsets[-1], dtype, scale=1.0)
    else:
        p, r, offsets, n_ranked = make_records(rng, N, K, "top_l", dtype, logp_scale=1.0)
        aoff = make_annotators(rng, N, "with_empty")
        H = len(aoff) - 1
    beta = 0.5 if how == "cuts" else 0.8
    log_w = np.log(rng.dirichlet(np.ones(K)))
    v = rng.uniform(0.0, 3.0, size=H)
    v[rng.integers(0, H)] = 0.0    # an annotator of weight 0 adds nothing
    resp, ll, S = ref.e_step(p, r, offsets, aoff, log_w, beta=beta, n_ranked=n_ranked,
                             annotator_weights=v)
    _, ll1, _ = ref.e_step(p, r, offsets, aoff, log_w, beta=beta, n_ranked=n_ranked)
    tol = TOL[dtype]
    if device == "cpu":
        try:
            import torch
        except ImportError:  # the NumPy entry point alone
            torch = None
        entries = [lambda a: a] + ([torch.from_numpy] if torch is not None else [])
    else:
        import torch

        entries = [lambda a: torch.as_tensor(a, device=device)]
    for t in entries:
        got = ec.e_step(t(p), t(r), t(offsets), t(aoff), t(log_w), beta=beta,
                        n_ranked=t(n_ranked), annotator_weights=t(v))
        assert_close(got.responsibilities, resp, dtype, "responsibilities")
        assert_close(got.annotator_loglik, S, dtype, "annotator_loglik")
        np.testing.assert_allclose(got.loglik, ll, rtol=tol["rtol"])
        totals = got.type_totals
        assert device_of(totals) == device
        assert dtype_of(totals) == np.float64 and tuple(totals.shape) == (K,)
        assert_close(totals, ref.e_step_type_totals(resp, v), dtype, "type_totals")
        # Without weights: the unweighted log-likelihood and plain column sums.
        plain = ec.e_step(t(p), t(r), t(offsets), t(aoff), t(log_w), beta=beta,
                          n_ranked=t(n_ranked))
        np.testing.assert_allclose(plain.loglik, ll1, rtol=tol["rtol"])
        np.testing.assert_allclose(host(plain.type_totals), resp.sum(axis=0), **tol)
        bad = v.copy()
        bad[3] = -1.0
        with pytest.raises(ValueError, match="annotator_weights"):
            ec.e_step(t(p), t(r), t(offsets), t(aoff), t(log_w), beta=beta,
                      annotator_weights=t(bad))
        with pytest.raises(ValueError, match="log_weights"):
            ec.e_step(t(p), t(r), t(offsets), t(aoff), t(np.full(K, np.nan)), beta=beta)
        with pytest.raises(ValueError, match="annotator_weights"):
            ec.e_step(t(p), t(r), t(offsets), t(aoff), log_w, beta=beta,
                      annotator_weights=t(v[:-1]))


@pytest.mark.parametrize("bad, match", [
    (np.ones(5), r"annotator_weights: expected shape \(4,\)"),
    ([1.0, -1.0, 1.0, 1.0], "annotator_weights: expected finite values >= 0, got -1.0 at index 1"),
    ([1.0, 1.0, np.nan, 1.0], "got nan at index 2"),
])
def test_e_step_rejects_bad_annotator_weights(rng, bad, match):
    offsets, _ = random_layout(rng, 10, partial=False)
    p, r = random_logps(rng, 2, offsets[-1])
    with pytest.raises(ValueError, match=match):
        ec.e_step(p, r, offsets, [0, 2, 5, 7, 10], np.log([0.5, 0.5]), beta=1.0,
                  annotator_weights=bad)


@pytest.mark.parametrize("device", DEVICES)
def test_e_step_without_record_table_returns_none(rng, device):
    offsets, _ = random_layout(rng, 10, partial=False)
    p, r = random_logps(rng, 2, offsets[-1])
    res = ec.e_step(on(device, p), on(device, r), on(device, offsets), [0, 4, 10],
                    np.log([0.5, 0.5]), beta=1.0)
    assert res.record_loglik is None
    assert isinstance(res.loglik, float)


def _launch_e_step(device, p, r, off, ao, log_w, beta, nr=None, c=None, v=None, totals=True):
    """The compiled E-step launch itself (_core.e_step on the CPU, _core.cuda_e_step on CUDA
    copies) with the optional annotator weights v and type-total output (None / totals=False:
    not passed; on CUDA the pointer is 0). Outputs start as NaN and the CUDA workspace as 0xFF
    bytes. Returns host arrays (resp, annot_ll, loglik, type_totals or None)."""
    K, M = p.shape
    N, H = len(off) - 1, len(ao) - 1
    lw = np.asarray(log_w, dtype=np.float64)
    v = None if v is None else np.asarray(v, dtype=np.float64)
    if device == "cpu":
        resp = np.full((H, K), np.nan, dtype=p.dtype)
        annot = np.full_like(resp, np.nan)
        tt = np.full(K, np.nan) if totals else None
        bad, loglik = _core.e_step(p, r, off, nr, c, ao, lw, N, M, K, H, beta, resp, annot, None,
                                   annotator_weights=v, type_totals=tt)
        assert bad == -1
        return resp.astype(np.float64), annot.astype(np.float64), float(loglik), tt
    import torch

    t = {k: on(device, x) for k, x in dict(p=p, r=r, off=off, ao=ao, lw=lw).items()}
    nr_t, c_t, v_t = on(device, nr), on(device, c), on(device, v)
    resp = torch.full((H, K), float("nan"), dtype=t["p"].dtype, device=device)
    annot = torch.full_like(resp, float("nan"))
    loglik = torch.full((1,), float("nan"), dtype=torch.float64, device=device)
    tt = torch.full((K,), float("nan"), dtype=torch.float64, device=device) if totals else None
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=device)
    ws_bytes = _core.cuda_e_step_workspace_bytes(N, H, K)
    ws = torch.full((max(ws_bytes, 1),), 255, dtype=torch.uint8, device=device)
    ptr = (lambda x: 0 if x is None else x.data_ptr())
    _core.cuda_e_step(str(p.dtype), t["p"].data_ptr(), t["r"].data_ptr(), t["off"].data_ptr(),
                      ptr(nr_t), ptr(c_t), t["ao"].data_ptr(), t["lw"].data_ptr(), N, M, K, H,
                      beta, resp.data_ptr(), annot.data_ptr(), loglik.data_ptr(), 0,
                      first_bad.data_ptr(), ws.data_ptr(), ws_bytes,
                      torch.cuda.current_stream().cuda_stream, ptr(v_t), ptr(tt))
    torch.cuda.synchronize()
    assert int(first_bad.item()) == -1
    return host(resp), host(annot), float(loglik.item()), None if tt is None else host(tt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("annotators,N,K", [
    ("random", 3000, 8), ("random", 3000, 3), ("with_empty", 700, 8), ("random", 2000, 9),
    ("random", 1500, 64), ("singletons", 1000, 8), ("one", 777, 1), ("with_empty", 0, 8)])
def test_e_step_launch_annotator_weights_and_type_totals(rng, device, dtype, annotators, N, K):
    """The launch with annotator weights v: loglik = sum_h v_h lse_h and type_totals =
    sum_h v_h g_hk, against float64 sums formed here; without the optional arguments the
    log-likelihood is unweighted and nothing else changes. On CUDA this covers the fused
    finishing (K <= 8: annotators inside a tile finished by the tile kernel, crossing ones by
    the cross kernel, empty ones before/between/after) and the finish kernel (K > 8);
    annotators of 255/256/257 records straddle the 256-record tiles. Records-free launches
    (N = 0: five annotators, no records) exist on CUDA only; the CPU binding refuses them."""
    if N == 0:
        p, r = np.zeros((K, 2), dtype), np.zeros(2, dtype)
        off, nr = np.zeros(1, np.int64), None
        ao = np.zeros(6, np.int64)  # five annotators, no records
    else:
        p, r, off, nr = make_records(rng, N, K, "top_l", dtype, logp_scale=1.0)
        ao = make_annotators(rng, N, annotators)
    H = len(ao) - 1
    beta = float(rng.uniform(0.1, 2.0))
    log_w = np.log(rng.dirichlet(np.ones(K)))
    c = rng.uniform(0.0, 2.0, len(off) - 1).astype(dtype)
    v = rng.uniform(0.0, 3.0, H)
    if N == 0 and device == "cpu":
        with pytest.raises(ValueError, match=r"sizes: expected N >= 1"):
            _launch_e_step(device, p, r, off, ao, log_w, beta, nr, c, v)
        return
    resp, annot, loglik, tt = _launch_e_step(device, p, r, off, ao, log_w, beta, nr, c, v)
    if N == 0:
        S = np.zeros((H, K))
    else:
        S = segment_sums(c[:, None].astype(np.float64) * ref.listwise_loglik(
            p, r, off, beta=beta, n_ranked=nr), ao)
    x = log_w + S
    lse = x.max(axis=1) + np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1))
    g = np.exp(x - lse[:, None])
    tol = TOL[dtype]["rtol"]
    assert_close(annot, S, dtype, "annotator_loglik")
    assert_close(resp, g, dtype, "responsibilities")
    assert loglik == pytest.approx(float(v @ lse), rel=tol, abs=tol)
    assert_close(tt, v @ g, dtype, "type_totals")
    # Without the optional arguments: loglik unweighted, nothing else changes.
    resp2, annot2, loglik2, _ = _launch_e_step(device, p, r, off, ao, log_w, beta, nr, c, None,
                                               False)
    assert np.array_equal(resp2, resp) and np.array_equal(annot2, annot)
    assert loglik2 == pytest.approx(float(lse.sum()), rel=tol, abs=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("annotators", ["one", "big_and_small", "singletons"])
def test_e_step_large_skewed(rng, device, annotators):
    """300,000 records, so that annotators span many 256-record tiles and several groups of
    256 tiles (the CUDA kernel's two reduction levels) and many of the CPU kernel's
    2048-record chunks. The per-record values come from the CPU kernel in float64 (itself
    checked against the reference above); the sums and posteriors are formed here in
    float64."""
    N, K = 300_000, 4
    m = rng.integers(2, 4, N)
    off = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    M = int(off[-1])
    base = rng.normal(size=M)
    p, r = base + 0.05 * rng.normal(size=(K, M)), base + 0.05 * rng.normal(size=M)
    if annotators == "one":
        ao = np.array([0, N], dtype=np.int64)
    elif annotators == "singletons":
        ao = np.arange(N + 1, dtype=np.int64)
    else:  # one annotator with 200,000 records among many small ones
        sizes = [50_000, 7, 200_000] + [int(s) for s in rng.integers(1, 100, 2000)]
        ao = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), N)
        ao = np.concatenate([ao[ao < N], [N]]).astype(np.int64)
    log_w = np.log(np.full(K, 1.0 / K))
    res = ec.e_step(on(device, p), on(device, r), on(device, off), on(device, ao), log_w,
                    beta=0.5)
    S = segment_sums(ec.listwise_loglik(p, r, off, beta=0.5), ao)
    v = log_w + S
    lse = v.max(axis=1) + np.log(np.exp(v - v.max(axis=1, keepdims=True)).sum(axis=1))
    assert_close(res.annotator_loglik, S, np.float64, "annotator_loglik")
    assert_close(res.responsibilities, np.exp(v - lse[:, None]), np.float64, "responsibilities")
    assert res.loglik == pytest.approx(float(lse.sum()), rel=1e-10)


REDUCTIONS = ["sum", "mean", "weighted_mean", "none"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("records", ["ragged", "top_l"])
def test_loss_and_grad_match_reference(poisoned_outputs, rng, device, dtype, reduction, K,
                                       records):
    """"ragged": 80 records of 2..40 responses, beta 1.7; "top_l": 400 records with lists up
    to 300 (make_records), beta in [0.1, 10]. Weights in [0, 2); K = 1 is given as (M,) and
    (N,)."""
    if records == "ragged":
        offsets, n_ranked = random_layout(rng, 80, 2, 40)
        p, r = random_logps(rng, K, offsets[-1], dtype)
        beta = 1.7
    else:
        p, r, offsets, n_ranked = make_records(rng, 400, K, "top_l", dtype)
        beta = float(rng.uniform(0.1, 10.0))
    N = len(offsets) - 1
    w = rng.uniform(0, 2, size=(K, N)).astype(dtype)
    policy = p[0] if K == 1 else p
    weights = w[0] if K == 1 else w
    loss, grad = ec.listwise_dpo_loss_and_grad(
        on(device, policy), on(device, r), on(device, offsets), on(device, weights), beta=beta,
        n_ranked=on(device, n_ranked), reduction=reduction)
    loss_ref, grad_ref = ref.listwise_dpo_loss_and_grad(policy, r, offsets, weights, beta=beta,
                                                        n_ranked=n_ranked, reduction=reduction)
    assert tuple(grad.shape) == policy.shape and dtype_of(grad) == dtype
    assert device_of(grad) == device
    # Gradients are O(beta * w / scale) per slot: assert_close compares them relative to
    # their largest magnitude as well as elementwise.
    assert_close(grad, grad_ref, dtype, "grad")
    if reduction == "none":
        assert device_of(loss) == device
        assert_close(loss, loss_ref, dtype, "per-record loss")
    else:
        assert isinstance(loss, float)
        assert_close(np.array([loss]), np.array([loss_ref]), dtype, "loss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_without_weights_long_lists_and_return_tensors(rng, device, dtype):
    torch = pytest.importorskip("torch")  # return_tensors is the torch entry point's option
    from emdpo_core.ops import _torch as _torch_dispatch

    p, r, off, _ = make_records(rng, 60, 2, "full", dtype)
    t = (lambda a: torch.as_tensor(a, device=device))
    loss, grad = _torch_dispatch.listwise_dpo_loss_and_grad(
        t(p), t(r), t(off), beta=2.0, reduction="mean", return_tensors=True)
    want_loss, want_grad = ref.listwise_dpo_loss_and_grad(p, r, off, beta=2.0, reduction="mean")
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.device.type == device
    assert_close(loss.reshape(1), np.array([want_loss]), dtype, "loss")
    assert_close(grad, want_grad, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_loss_default_weights_are_ones(rng, device):
    offsets, n_ranked = random_layout(rng, 40)
    p, r = random_logps(rng, 1, offsets[-1])
    d = (lambda x: on(device, x))
    a = ec.listwise_dpo_loss_and_grad(d(p[0]), d(r), d(offsets), beta=1.0, n_ranked=d(n_ranked))
    b = ec.listwise_dpo_loss_and_grad(d(p[0]), d(r), d(offsets), d(np.ones(40)), beta=1.0,
                                      n_ranked=d(n_ranked))
    assert a[0] == b[0]
    np.testing.assert_array_equal(host(a[1]), host(b[1]))


def test_gradient_matches_finite_differences(rng):
    offsets, n_ranked = random_layout(rng, 6, 2, 7)
    p, r = random_logps(rng, 1, offsets[-1], scale=1.0)
    w = rng.uniform(0.5, 1.5, size=6)
    f = lambda x: ec.listwise_dpo_loss_and_grad(x, r, offsets, w, beta=0.9, n_ranked=n_ranked)[0]
    _, grad = ec.listwise_dpo_loss_and_grad(p[0], r, offsets, w, beta=0.9, n_ranked=n_ranked)
    h = 1e-6
    for j in range(offsets[-1]):
        e = np.zeros(offsets[-1])
        e[j] = h
        fd = (f(p[0] + e) - f(p[0] - e)) / (2 * h)
        # central differences in float64: truncation O(h^2), rounding O(eps * |f| / h) ~ 1e-8
        assert abs(fd - grad[j]) < 1e-6, (j, fd, grad[j])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extremes_are_stable(rng, device, dtype):
    """Sequence log-probabilities near -1e4, beta = 10, lists of hundreds, huge reward gaps."""
    offsets, n_ranked = random_layout(rng, 20, 2, 300)
    M = offsets[-1]
    p = (-1e4 + rng.normal(0, 5, size=(2, M))).astype(dtype)
    r = (-1e4 + rng.normal(0, 5, size=M)).astype(dtype)
    p[1, ::7] -= 3000.0  # rewards spread over 3e4: exp() of raw rewards would overflow
    args = (on(device, p), on(device, r), on(device, offsets))
    ll = host(ec.listwise_loglik(*args, beta=10.0, n_ranked=on(device, n_ranked)))
    want = ref.listwise_loglik(p, r, offsets, beta=10.0, n_ranked=n_ranked)
    assert np.all(np.isfinite(ll))
    np.testing.assert_allclose(ll, want, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * np.abs(want).max())
    loss, grad = ec.listwise_dpo_loss_and_grad(*args, on(device, np.ones((2, 20)), dtype),
                                               beta=10.0, n_ranked=on(device, n_ranked))
    grad = host(grad)
    loss_ref, grad_ref = ref.listwise_dpo_loss_and_grad(p, r, offsets, np.ones((2, 20)),
                                                        beta=10.0, n_ranked=n_ranked)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, loss_ref, rtol=TOL[dtype]["rtol"])
    np.testing.assert_allclose(grad, grad_ref, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * np.abs(grad_ref).max())


def test_group_by_annotator_matches_reference(rng):
    ids = rng.integers(0, 50, size=1000)
    order, aoff = ec.group_by_annotator(ids)
    order_ref, aoff_ref = ref.group_by_annotator(ids)
    np.testing.assert_array_equal(order, order_ref)
    np.testing.assert_array_equal(aoff, aoff_ref)
    assert order.dtype == np.int64 and aoff.dtype == np.int64


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices_are_accepted(rng, device):
    offsets, n_ranked = random_layout(rng, 20)
    p, r = random_logps(rng, 2, offsets[-1])
    d = (lambda x: on(device, x))
    a = ec.listwise_loglik(d(p), d(r), d(offsets.astype(np.int32)), beta=1.0,
                           n_ranked=d(n_ranked.astype(np.int32)))
    b = ec.listwise_loglik(d(p), d(r), d(offsets), beta=1.0, n_ranked=d(n_ranked))
    np.testing.assert_array_equal(host(a), host(b))


def test_torch_cpu_tensors_round_trip(rng):
    torch = pytest.importorskip("torch")
    offsets, n_ranked = random_layout(rng, 30)
    p, r = random_logps(rng, 2, offsets[-1])
    got = ec.listwise_loglik(torch.from_numpy(p), torch.from_numpy(r), torch.from_numpy(offsets),
                             beta=1.0, n_ranked=torch.from_numpy(n_ranked))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), ec.listwise_loglik(p, r, offsets, beta=1.0,
                                                                  n_ranked=n_ranked))
    res = ec.e_step(torch.from_numpy(p), torch.from_numpy(r), torch.from_numpy(offsets),
                    torch.tensor([0, 10, 30]), torch.log(torch.tensor([0.3, 0.7], dtype=torch.float64)), beta=1.0,
                    n_ranked=torch.from_numpy(n_ranked))
    want = ec.e_step(p, r, offsets, [0, 10, 30], np.log([0.3, 0.7]), beta=1.0,
                     n_ranked=n_ranked)
    np.testing.assert_allclose(res.responsibilities.numpy(), want.responsibilities, rtol=1e-12)
    assert res.loglik == want.loglik


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_and_scalar_paths_agree_bitwise(rng, dtype):
    """Records are computed 16 at a time in SIMD lanes, or one by one when their block holds
    a list longer than the lanes take (256); a record's results must not depend on which."""
    n = 32
    offsets, n_ranked = random_layout(rng, n, 2, 10)
    p, r = random_logps(rng, 2, offsets[-1], dtype)
    w = rng.uniform(0.5, 1.5, size=(2, n)).astype(dtype)
    ll_a = ec.listwise_loglik(p, r, offsets, beta=0.7, n_ranked=n_ranked)
    loss_a, grad_a = ec.listwise_dpo_loss_and_grad(p, r, offsets, w, beta=0.7,
                                                   n_ranked=n_ranked, reduction="none")
    # Append one list of 300 responses to record 5's block: that block goes scalar.
    long_m = 300
    lens = np.diff(offsets)
    lens_b = np.insert(lens, 6, long_m)
    offsets_b = np.concatenate([[0], np.cumsum(lens_b)])
    n_ranked_b = np.insert(n_ranked, 6, long_m - 1)
    extra_p, extra_r = random_logps(rng, 2, long_m, dtype)
    cut = offsets[6]
    p_b = np.concatenate([p[:, :cut], extra_p, p[:, cut:]], axis=1)
    r_b = np.concatenate([r[:cut], extra_r, r[cut:]])
    w_b = np.insert(w, 6, 1.0, axis=1)
    ll_b = ec.listwise_loglik(p_b, r_b, offsets_b, beta=0.7, n_ranked=n_ranked_b)
    loss_b, grad_b = ec.listwise_dpo_loss_and_grad(p_b, r_b, offsets_b, w_b, beta=0.7,
                                                   n_ranked=n_ranked_b, reduction="none")
    keep = np.arange(n + 1) != 6
    keep_slots = np.ones(offsets_b[-1], dtype=bool)
    keep_slots[cut:cut + long_m] = False
    np.testing.assert_array_equal(ll_b[keep], ll_a)
    np.testing.assert_array_equal(loss_b[:, keep], loss_a)
    np.testing.assert_array_equal(grad_b[:, keep_slots], grad_a)


# ----------------------------------------------------------------------------------------
# Run-to-run determinism and input errors, on every device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic_run_to_run(rng, device, dtype):
    run = run_all_kernels(rng, device, dtype)
    first = run()
    for _ in range(3):
        again = run()
        for a, b in zip(first, again):
            # float64 holds every float32 exactly, so equality on the host is bitwise.
            assert np.array_equal(a, b), "results differ between runs"


def _non_finite_case(rng, dtype):
    N, K = 700, 3
    p, r, off, nr = make_records(rng, N, K, "top_l", dtype)
    first, later = 301, 650
    p[2, off[later]] = np.nan
    r[off[first] + 1] = np.inf
    return p, r, off, nr, first, K, N


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs_raise_with_first_record(rng, device, dtype):
    p, r, off, nr, first, K, N = _non_finite_case(rng, dtype)
    d = (lambda x: on(device, x))
    msg = rf"ref_logps: non-finite value inf at slot {off[first] + 1} \(record {first}\)"
    with pytest.raises(ValueError, match=msg):
        ec.listwise_loglik(d(p), d(r), d(off), beta=1.0, n_ranked=d(nr))
    with pytest.raises(ValueError, match=msg):
        ec.e_step(d(p), d(r), d(off), [0, 100, N], np.log(np.full(K, 1 / K)), beta=1.0,
                  n_ranked=d(nr))
    with pytest.raises(ValueError, match=msg):
        ec.listwise_dpo_loss_and_grad(d(p), d(r), d(off), beta=1.0, n_ranked=d(nr))
    r[off[first] + 1] = 0.0
    p[0, 5] = -np.inf  # record 0 or 1 now comes first
    rec0 = int(np.searchsorted(off, 5, side="right") - 1)
    with pytest.raises(ValueError, match=rf"policy_logps: non-finite value -inf at \[type 0, "
                                         rf"slot 5\] \(record {rec0}\)"):
        ec.listwise_dpo_loss_and_grad(d(p), d(r), d(off), beta=1.0, n_ranked=d(nr))


@pytest.mark.parametrize("device", DEVICES)
def test_reward_overflow_raises(device):
    p = np.array([3e38, 0.0, 1.0, 0.0], dtype=np.float32)
    r = np.array([-3e38, 0.0, 0.0, 0.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"overflows in record 0"):
        ec.listwise_loglik(on(device, p), on(device, r), on(device, np.array([0, 2, 4])),
                           beta=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_weights_raise(rng, device):
    p, r, off, _ = make_records(rng, 50, 2, "pairs", "float32")
    d = (lambda x: on(device, x))
    w = np.ones((2, 50), np.float32)
    w[1, 7] = np.nan
    with pytest.raises(ValueError, match=r"weights: expected finite values, got nan at index "
                                         r"\(1, 7\)"):
        ec.listwise_dpo_loss_and_grad(d(p), d(r), d(off), d(w), beta=1.0)
    with pytest.raises(ValueError, match="record_weights: expected finite values >= 0"):
        ec.e_step(d(p), d(r), d(off), [0, 50], [0.0, 0.0], beta=1.0,
                  record_weights=d(-np.ones(50)))
