"""The E-step at the edges of float64: posteriors from finite inputs of huge magnitude.

The float64 reference evaluates the same formulas, so these expectations are derived by hand
(each comment gives the derivation): rewards r = beta (logpi - logpi_ref) are chosen exactly
representable, so the per-type sums S_hk are exact and the posterior is a closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import emdpo_core as ec

A = 2.0 ** 1023          # about 9e307: twice this overflows float64
T53 = 2.0 ** 53          # integers up to 2^54 are exact, but log(1 + e^-2) = 0.127 is below
                         # the spacing (2) of doubles at this magnitude


def pairs(policy_rows, ref):
    p = np.array(policy_rows, dtype=np.float64)
    return p, np.array(ref, dtype=np.float64), np.arange(0, p.shape[1] + 1, 2)


def test_sums_near_1e16_give_rows_that_sum_to_one():
    # One pair, loser's reference log-prob -2^53: rewards (0, 2^53) under type 0, (2, 2^53)
    # under type 1 (policy 2 on the winner). ll = r_0 - logaddexp(r_0, r_1) = r_0 - 2^53
    # exactly (e^(r_0 - 2^53) is far below the rounding of 2^53), so S = (-2^53, 2 - 2^53) and
    # with equal weights g = (sigmoid(-2), sigmoid(2)).
    p, ref, off = pairs([[0.0, 0.0], [2.0, 0.0]], [0.0, -T53])
    res = ec.e_step(p, ref, off, [0, 1], np.log([0.5, 0.5]), beta=1.0)
    np.testing.assert_array_equal(res.annotator_loglik, [[-T53, 2.0 - T53]])
    want = [1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-2.0))]
    np.testing.assert_allclose(res.responsibilities[0], want, rtol=1e-15)
    # loglik = log 0.5 + 2 - 2^53 + log(1 + e^-2) = -(2^53 - 1.434...): doubles below 2^53
    # are 1 apart, so the correctly rounded value is 1 - 2^53.
    assert res.loglik == 1.0 - T53


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_log_probs_near_minus_1e16(dtype):
    # Many annotators, every reward of size 1e16: each row still sums to 1 within rounding.
    rng = np.random.default_rng(3)
    n = 40
    p = rng.normal(0, 1, (3, 2 * n)).astype(dtype)
    ref = np.zeros(2 * n, dtype)
    ref[1::2] = -1e16
    res = ec.e_step(p, ref, np.arange(0, 2 * n + 1, 2), np.arange(0, n + 1, 4),
                    np.log([0.2, 0.3, 0.5]), beta=1.0)
    assert np.all(np.isfinite(res.responsibilities))
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(res.responsibilities.astype(np.float64).sum(axis=1), 1.0,
                               rtol=0, atol=8 * eps)


def test_log_weights_and_sums_near_minus_1e308_tie():
    # Two identical types: S = (-A, -A) (ll = 0 - logaddexp(0, A) = -A), log-weights (-A, -A):
    # log eta_k + S_k = -2A overflows float64, but the types tie, so g = (1/2, 1/2).
    p, ref, off = pairs([[0.0, 0.0], [0.0, 0.0]], [0.0, -A])
    res = ec.e_step(p, ref, off, [0, 1], [-A, -A], beta=1.0)
    np.testing.assert_array_equal(res.annotator_loglik, [[-A, -A]])
    np.testing.assert_array_equal(res.responsibilities, [[0.5, 0.5]])
    # The true log-likelihood, log 2 - 2A, is below the float64 range.
    assert res.loglik == -np.inf


def test_one_term_overflowing_leaves_the_other_type():
    # Type 1's loser has policy -A/2: S = (-A, -A/2), log-weights (-A, -A). Type 0's term
    # -2A overflows, type 1's is -1.5 A; the difference A/2 makes g = (e^(-A/2), 1) = (0, 1).
    p, ref, off = pairs([[0.0, 0.0], [0.0, -A / 2]], [0.0, -A])
    res = ec.e_step(p, ref, off, [0, 1], [-A, -A], beta=1.0)
    np.testing.assert_array_equal(res.responsibilities, [[0.0, 1.0]])
    assert res.loglik == -1.5 * A


def test_policy_values_near_1e308():
    # Rewards (-A, A) under type 0: ll = -A - logaddexp(-A, A) = -2A, below the range (-inf);
    # type 1 ranks its winner first with rewards (A, -A): ll = 0. So g = (0, 1) exactly.
    p, ref, off = pairs([[-A, A], [A, -A]], [0.0, 0.0])
    res = ec.e_step(p, ref, off, [0, 1], np.log([0.5, 0.5]), beta=1.0)
    np.testing.assert_array_equal(res.responsibilities, [[0.0, 1.0]])
    assert res.loglik == math.log(0.5)


def test_zero_weight_record_with_log_likelihood_below_range_is_ignored():
    # Record 0 has ll = -2A = -inf under type 0 (as above) but record weight 0: it contributes
    # nothing (0 * ll = 0, not NaN). Record 1 (rewards 0, 0: ll = -log 2 under both types)
    # leaves the prior: g = (0.3, 0.7).
    p, ref, off = pairs([[-A, A, 0.0, 0.0], [A, -A, 0.0, 0.0]], [0.0, 0.0, 0.0, 0.0])
    res = ec.e_step(p, ref, off, [0, 2], np.log([0.3, 0.7]), beta=1.0,
                    record_weights=[0.0, 1.0])
    np.testing.assert_allclose(res.responsibilities, [[0.3, 0.7]], rtol=1e-15)
    np.testing.assert_allclose(res.annotator_loglik, [[-math.log(2)] * 2], rtol=1e-15)


def test_every_type_below_range_raises_naming_the_annotator():
    # Annotator 1 has two records with ll = -A under both types: S = -2A overflows for each
    # type, so the posterior cannot be formed in float64.
    p, ref, off = pairs([[0.0] * 6] * 2, [0.0, -1.0, 0.0, -A, 0.0, -A])
    with pytest.raises(ValueError, match=r"annotator 1\b.*out of range"):
        ec.e_step(p, ref, off, [0, 1, 3], np.log([0.5, 0.5]), beta=1.0)
