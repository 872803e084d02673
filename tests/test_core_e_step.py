"""The compiled E-step's annotator weights and type totals (`_core.e_step`), against the
float64 reference, at sizes that cross the kernels' 2,048-record reduction pieces."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SUBPROCESS_CWD, TOL, random_layout, random_logps

from emdpo_core import _core
from emdpo_core.ops import _reference as ref

DTYPES = [np.float64, np.float32]


def _inputs(rng, dtype, N=5000, H=700, K=3):
    offsets, n_ranked = random_layout(rng, N, 2, 6)
    p, r = random_logps(rng, K, int(offsets[-1]), dtype)
    # Annotators of very different sizes: an empty one first, one more empty in the middle,
    # small ones, and a last one holding the last fifth of the records (for N = 5000: records
    # 4000..5000, across the reduction-piece boundary at 4096).
    last = N * 4 // 5
    cuts = np.sort(rng.choice(np.arange(1, last), H - 3, replace=False))
    aoff = np.concatenate([[0, 0], cuts[:H // 10], cuts[H // 10 - 1:], [last, N]]).astype(np.int64)
    H = len(aoff) - 1
    lw = np.log(rng.dirichlet(np.ones(K)))
    cw = rng.uniform(0.2, 2.0, N).astype(dtype)
    v = rng.uniform(0.0, 3.0, H)
    v[rng.integers(0, H, 20)] = 0.0
    return dict(p=p, r=r, offsets=offsets, n_ranked=n_ranked, aoff=aoff, lw=lw, cw=cw, v=v,
                N=N, M=int(offsets[-1]), K=K, H=H)


def _call(d, beta=0.7, annotator_weights=None, type_totals=None, **kw):
    resp = np.empty((d["H"], d["K"]), d["p"].dtype)
    annot = np.empty((d["H"], d["K"]), d["p"].dtype)
    bad, ll = _core.e_step(d["p"], d["r"], d["offsets"], d["n_ranked"], d["cw"], d["aoff"],
                           d["lw"], d["N"], d["M"], d["K"], d["H"], beta, resp, annot, None,
                           annotator_weights=annotator_weights, type_totals=type_totals, **kw)
    assert bad == -1
    return resp, ll, annot


@pytest.mark.parametrize("dtype", DTYPES)
def test_annotator_weights_and_type_totals_match_reference(rng, dtype):
    d = _inputs(rng, dtype)
    tt = np.full(d["K"], np.nan)
    resp, ll, annot = _call(d, annotator_weights=d["v"], type_totals=tt)
    w_resp, w_ll, w_annot = ref.e_step(d["p"], d["r"], d["offsets"], d["aoff"], d["lw"],
                                       beta=0.7, n_ranked=d["n_ranked"], record_weights=d["cw"],
                                       annotator_weights=d["v"])
    np.testing.assert_allclose(resp, w_resp, **TOL[dtype])
    np.testing.assert_allclose(annot, w_annot, **TOL[dtype])
    # The total log-likelihood is a sum of ~700 terms of size ~1e2-1e4: relative tolerance.
    np.testing.assert_allclose(ll, w_ll, rtol=TOL[dtype]["rtol"])
    np.testing.assert_allclose(tt, ref.e_step_type_totals(w_resp, d["v"]),
                               rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])
    # Exactly the documented sum over the returned posteriors, in annotator order.
    want_tt = np.zeros(d["K"])
    for h in range(d["H"]):
        want_tt += d["v"][h] * resp[h].astype(np.float64)
    np.testing.assert_array_equal(tt, want_tt)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_leave_posteriors_unchanged_and_default_to_one(rng, dtype):
    d = _inputs(rng, dtype, N=3000, H=300)
    plain = _call(d)
    ones = _call(d, annotator_weights=np.ones(d["H"]))
    weighted = _call(d, annotator_weights=d["v"])
    np.testing.assert_array_equal(plain[0], weighted[0])
    np.testing.assert_array_equal(plain[2], weighted[2])
    assert plain[1] == ones[1]
    assert weighted[1] != plain[1]
    # Without annotator weights the type totals are the column sums of the posteriors.
    tt = np.empty(d["K"])
    resp, _, _ = _call(d, type_totals=tt)
    np.testing.assert_allclose(tt, resp.astype(np.float64).sum(axis=0), rtol=1e-12)


def test_zero_weight_annotator_drops_out_of_loglik(rng):
    d = _inputs(rng, np.float64, N=400, H=40)
    v = np.ones(d["H"])
    v[5] = 0.0
    _, ll, _ = _call(d, annotator_weights=v)
    _, ll_all, annot = _call(d)
    lse5 = np.logaddexp.reduce(d["lw"] + annot[5])
    np.testing.assert_allclose(ll, ll_all - lse5, rtol=1e-13)


@pytest.mark.parametrize("bad, exc, match", [
    (np.array([1.0, -1.0]), ValueError, "annotator_weights: expected finite values >= 0, got "
                                        "-1.0* at index 1"),
    (np.array([np.nan, 1.0]), ValueError, "annotator_weights: .* at index 0"),
    (np.array([1.0, np.inf]), ValueError, "annotator_weights: .* at index 1"),
    (np.ones(3), ValueError, "annotator_weights: expected 2 elements, got 3"),
    (np.ones(2, np.float32), TypeError, "annotator_weights: expected a C-contiguous array"),
    (np.ones(4)[::2], TypeError, "annotator_weights"),
])
def test_bad_annotator_weights_raise(bad, exc, match):
    p = np.zeros((2, 6)); r = np.zeros(6)
    off = np.array([0, 3, 6], np.int64); ao = np.array([0, 1, 2], np.int64)
    with pytest.raises(exc, match=match):
        _core.e_step(p, r, off, None, None, ao, np.log([0.5, 0.5]), 2, 6, 2, 2, 1.0,
                     np.empty((2, 2)), np.empty((2, 2)), None, annotator_weights=bad)


@pytest.mark.parametrize("tt, exc, match", [
    (np.empty(3), ValueError, "type_totals: expected 2 elements, got 3"),
    (np.empty(2, np.float32), TypeError, "type_totals"),
    (np.empty(2)[None, :].repeat(2, 0)[:, 0], TypeError, "type_totals"),
])
def test_bad_type_totals_raise(tt, exc, match):
    p = np.zeros((2, 6)); r = np.zeros(6)
    off = np.array([0, 3, 6], np.int64); ao = np.array([0, 2], np.int64)
    with pytest.raises(exc, match=match):
        _core.e_step(p, r, off, None, None, ao, np.log([0.5, 0.5]), 2, 6, 2, 1, 1.0,
                     np.empty((1, 2)), np.empty((1, 2)), None, type_totals=tt)


def test_read_only_type_totals_raise():
    p = np.zeros((2, 6)); r = np.zeros(6)
    off = np.array([0, 3, 6], np.int64); ao = np.array([0, 2], np.int64)
    tt = np.empty(2); tt.flags.writeable = False
    with pytest.raises(ValueError, match="type_totals: output array is read-only"):
        _core.e_step(p, r, off, None, None, ao, np.log([0.5, 0.5]), 2, 6, 2, 1, 1.0,
                     np.empty((1, 2)), np.empty((1, 2)), None, type_totals=tt)


SCRIPT = r"""
import hashlib, numpy as np
from emdpo_core import _core
rng = np.random.default_rng(99)
N, K = 20000, 4
m = rng.integers(2, 7, size=N)
off = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
M = int(off[-1])
p = rng.normal(-30, 2, (K, M)).astype(np.float32)
r = rng.normal(-30, 2, M).astype(np.float32)
ao = np.concatenate([[0], np.sort(rng.choice(np.arange(1, N), 1500, replace=False)), [N]])
H = len(ao) - 1
v = rng.uniform(0, 2, H)
resp = np.empty((H, K), np.float32); annot = np.empty((H, K), np.float32); tt = np.empty(K)
bad, ll = _core.e_step(p, r, off, None, None, ao.astype(np.int64), np.log(np.full(K, 1 / K)),
                       N, M, K, H, 1.5, resp, annot, None, annotator_weights=v, type_totals=tt)
print(hashlib.sha256(tt.tobytes() + np.float64(ll).tobytes() + resp.tobytes()).hexdigest())
"""


def test_type_totals_bitwise_identical_across_thread_counts():
    digests = set()
    for threads in (1, 2, 3):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=SUBPROCESS_CWD, env=env,
                             capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests
