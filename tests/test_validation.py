"""Every bad input raises a clear ValueError/TypeError naming the argument; none crashes."""

from __future__ import annotations

import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core import _core

# The fast subset run against an installed wheel (`pytest -m smoke`, .ci/wheel_smoke.sh).
pytestmark = pytest.mark.smoke

OFFSETS = np.array([0, 2, 5, 9])  # 3 records of 2, 3, 4 responses
M, N = 9, 3


@pytest.fixture
def good():
    rng = np.random.default_rng(7)
    return dict(p=rng.normal(-5, 1, (2, M)), r=rng.normal(-5, 1, M))


def ll(good, **kw):
    args = dict(policy_logps=good["p"], ref_logps=good["r"], offsets=OFFSETS, beta=1.0)
    args.update(kw)
    return ec.listwise_loglik(args.pop("policy_logps"), args.pop("ref_logps"),
                              args.pop("offsets"), **args)


@pytest.mark.parametrize("beta, exc, match", [
    (0.0, ValueError, "beta: expected a finite number > 0, got 0.0"),
    (-1.0, ValueError, "beta"),
    (float("nan"), ValueError, "beta"),
    (float("inf"), ValueError, "beta"),
    ("1", TypeError, "beta: expected a positive real number, got str"),
    (True, TypeError, "beta"),
])
def test_beta(good, beta, exc, match):
    with pytest.raises(exc, match=match):
        ll(good, beta=beta)


def test_policy_dtype_and_shape(good):
    with pytest.raises(TypeError, match="policy_logps: expected a float32 or float64 array, got dtype int64"):
        ll(good, policy_logps=np.zeros((2, M), dtype=np.int64))
    with pytest.raises(ValueError, match=r"policy_logps: expected a 1-D or 2-D array, got shape \(1, 2, 9\)"):
        ll(good, policy_logps=good["p"][None])
    with pytest.raises(ValueError, match=r"ref_logps: expected shape \(9,\)"):
        ll(good, ref_logps=good["r"][:-1])
    with pytest.raises(TypeError, match="ref_logps: dtype float32 does not match policy_logps' dtype float64"):
        ll(good, ref_logps=good["r"].astype(np.float32))
    with pytest.raises(TypeError, match="policy_logps"):
        ll(good, policy_logps=np.array([["a"] * M]))


@pytest.mark.parametrize("offsets, match", [
    ([0], "offsets: expected at least 2 entries"),
    ([], "offsets: expected at least 2 entries"),
    ([1, 3, 5, 9], r"offsets: expected offsets\[0\] == 0, got 1"),
    ([0, 2, 5, 8], r"offsets: expected offsets\[-1\] == M == 9"),
    ([0, 2, 3, 9], r"record 1 spans offsets\[1\]=2 to offsets\[2\]=3"),
    ([0, 5, 2, 9], r"must be non-decreasing; offsets\[2\] = 2 < offsets\[1\] = 5"),
    ([0, 2, 5, 12], r"offsets: entry 3 is 12, beyond the number of slots M=9"),
    ([0, -4, 5, 9], r"must be non-decreasing; offsets\[1\] = -4 < offsets\[0\] = 0"),
    ([0, 2, 2**62, 9], r"entry 2 is 4611686018427387904, beyond"),
])
def test_offsets(good, offsets, match):
    with pytest.raises(ValueError, match=match):
        ll(good, offsets=np.array(offsets, dtype=np.int64))


def test_offsets_type(good):
    with pytest.raises(TypeError, match="offsets: expected an integer array"):
        ll(good, offsets=np.array([0, 2.5, 5, 9]))
    with pytest.raises(ValueError, match="offsets: expected a 1-D integer array"):
        ll(good, offsets=OFFSETS[None])


@pytest.mark.parametrize("n_ranked, match", [
    ([1, 1], r"n_ranked: expected 3 entries \(one per record\), got 2"),
    ([1, 0, 1], r"record 1 has m=3 candidates and n_ranked=0"),
    ([2, 1, 1], r"record 0 has m=2 candidates and n_ranked=2"),
    ([1, 2, 4], r"record 2 has m=4 candidates and n_ranked=4"),
    ([1, -3, 1], r"record 1 has m=3"),
])
def test_n_ranked(good, n_ranked, match):
    with pytest.raises(ValueError, match=match):
        ll(good, n_ranked=np.array(n_ranked))


@pytest.mark.parametrize("which, value, match", [
    ("p", np.nan, r"policy_logps: non-finite value nan at \[type 1, slot 6\] \(record 2\)"),
    ("p", np.inf, r"policy_logps: non-finite value inf at \[type 1, slot 6\]"),
    ("r", -np.inf, r"ref_logps: non-finite value -inf at slot 6 \(record 2\)"),
])
def test_non_finite_log_probabilities(good, which, value, match):
    arr = good[which].copy()
    if which == "p":
        arr[1, 6] = value
        kw = dict(policy_logps=arr)
    else:
        arr[6] = value
        kw = dict(ref_logps=arr)
    with pytest.raises(ValueError, match=match):
        ll(good, **kw)
    # the same check guards the E-step and the loss
    with pytest.raises(ValueError, match=match.split(":")[0]):
        ec.e_step(kw.get("policy_logps", good["p"]), kw.get("ref_logps", good["r"]), OFFSETS,
                  [0, 3], np.log([0.5, 0.5]), beta=1.0)
    with pytest.raises(ValueError, match=match.split(":")[0]):
        ec.listwise_dpo_loss_and_grad(kw.get("policy_logps", good["p"]),
                                      kw.get("ref_logps", good["r"]), OFFSETS,
                                      np.ones((2, N)), beta=1.0)


def test_reward_overflow_is_reported(good):
    p = good["p"].copy()
    p[0, 3] = 3e307
    with pytest.raises(ValueError, match="overflows in record 1"):
        ll(good, policy_logps=p, beta=10.0)


def e_step(good, **kw):
    args = dict(annotator_offsets=[0, 1, 3], log_weights=np.log([0.4, 0.6]))
    args.update(kw)
    return ec.e_step(good["p"], good["r"], OFFSETS, args.pop("annotator_offsets"),
                     args.pop("log_weights"), beta=1.0, **args)


@pytest.mark.parametrize("aoff, match", [
    ([0], r"annotator_offsets: expected H\+1 >= 2 entries, got 1"),
    ([1, 3], r"annotator_offsets: expected annotator_offsets\[0\] == 0, got 1"),
    ([0, 2, 1, 3], r"must be non-decreasing; entry 2 is 1 < entry 1 = 2"),
    ([0, 1, 2], r"must cover the records 0..N with N=3; entry 2 is 2"),
    ([0, 1, 4], r"must cover the records 0..N with N=3; entry 2 is 4"),
])
def test_annotator_offsets(good, aoff, match):
    with pytest.raises(ValueError, match=match):
        e_step(good, annotator_offsets=np.array(aoff))


@pytest.mark.parametrize("lw, match", [
    ([0.0], r"log_weights: expected shape \(2,\) \(one per type\), got \(1,\)"),
    ([np.nan, 0.0], "log_weights: expected finite values or -inf, got nan at index 0"),
    ([0.0, np.inf], "got inf at index 1"),
    ([-np.inf, -np.inf], "every type has weight zero"),
])
def test_log_weights(good, lw, match):
    with pytest.raises(ValueError, match=match):
        e_step(good, log_weights=np.array(lw))


def test_log_weights_may_contain_minus_inf(good):
    res = e_step(good, log_weights=np.array([0.0, -np.inf]))
    np.testing.assert_array_equal(res.responsibilities[:, 1], 0.0)


@pytest.mark.parametrize("w, exc, match", [
    ([1.0, 1.0], ValueError, r"record_weights: expected shape \(3,\)"),
    ([1.0, -1.0, 1.0], ValueError, "record_weights: expected finite values >= 0, got -1.0 at index 1"),
    ([1.0, 1.0, np.nan], ValueError, "got nan at index 2"),
    (["a", "b", "c"], TypeError, "record_weights: expected real numbers"),
])
def test_record_weights(good, w, exc, match):
    with pytest.raises(exc, match=match):
        e_step(good, record_weights=np.array(w))


def test_loss_arguments(good):
    f = ec.listwise_dpo_loss_and_grad
    with pytest.raises(ValueError, match=r"weights: expected shape \(2, 3\)"):
        f(good["p"], good["r"], OFFSETS, np.ones(3), beta=1.0)
    with pytest.raises(ValueError, match=r"weights: expected shape \(3,\) or \(1, 3\)"):
        f(good["p"][0], good["r"], OFFSETS, np.ones(4), beta=1.0)
    with pytest.raises(ValueError, match=r"weights: expected finite values, got nan at index 1"):
        f(good["p"][0], good["r"], OFFSETS, np.array([1.0, np.nan, 1.0]), beta=1.0)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        f(good["p"][0], good["r"], OFFSETS, beta=1.0, reduction="avg")
    with pytest.raises(ValueError, match="type 1 sums to 0.0"):
        f(good["p"], good["r"], OFFSETS, np.vstack([np.ones(3), np.zeros(3)]), beta=1.0,
          reduction="weighted_mean")


def test_group_by_annotator_errors():
    with pytest.raises(ValueError, match="annotator_ids: expected ids >= 0, got -1 at index 2"):
        ec.group_by_annotator([0, 1, -1])
    with pytest.raises(TypeError, match="annotator_ids: expected integer ids, got dtype float64"):
        ec.group_by_annotator([0.0, 1.0])
    with pytest.raises(ValueError, match="annotator_ids: expected at least one record"):
        ec.group_by_annotator(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match=r"annotator_ids: expected a 1-D integer array, got shape \(1, 2\)"):
        ec.group_by_annotator([[0, 1]])
    with pytest.raises(ValueError, match="id 5 at index 1 is out of range for n_annotators=3"):
        ec.group_by_annotator([0, 5], n_annotators=3)


def test_direct_core_calls_cannot_crash(good):
    """The bindings re-check what memory safety rests on, for callers bypassing kernels.py."""
    out = np.empty((N, 2))
    bad_offsets = np.array([0, 2, 50, 9], dtype=np.int64)
    with pytest.raises(ValueError, match="offsets"):
        _core.listwise_loglik(good["p"], good["r"], bad_offsets, None, N, M, 2, 1.0, out)
    with pytest.raises(ValueError, match="policy_logps: expected 27 elements, got 18"):
        _core.listwise_loglik(good["p"], good["r"], OFFSETS.astype(np.int64), None, N, M, 3,
                              1.0, np.empty((N, 3)))
    with pytest.raises(TypeError, match="offsets"):
        _core.listwise_loglik(good["p"], good["r"], OFFSETS.astype(np.int32), None, N, M, 2, 1.0,
                              out)
    with pytest.raises(ValueError, match="n_ranked"):
        _core.listwise_loglik(good["p"], good["r"], OFFSETS.astype(np.int64),
                              np.array([1, 5, 1], dtype=np.int64), N, M, 2, 1.0, out)
    with pytest.raises(ValueError, match="annotator_offsets"):
        _core.e_step(good["p"], good["r"], OFFSETS.astype(np.int64), None, None,
                     np.array([0, 7], dtype=np.int64), np.zeros(2), N, M, 2, 1, 1.0,
                     np.empty((1, 2)), np.empty((1, 2)), None)
