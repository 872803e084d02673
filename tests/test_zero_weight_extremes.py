"""A weight of 0 means the record contributes exactly nothing, also when its log-likelihood is
-inf.

Finite inputs can give ll = -inf: a pair with rewards (-R, R) has ll = -R - logaddexp(-R, R)
= -2R, below the range of the computation dtype once R is past half its largest value (rewards
+-2e38 in float32, +-1e308 in float64; beta = 10 times log-probability gaps of 2e37 / 1e307).
R stays below the largest value / log2(e), so that the rewards are finite also in the base-2
units of the CUDA kernels (R log2 e: 2.9e38 and 1.4e308).
Such a record with weight 0 must leave the loss, its gradient, the per-record losses and the
E-step's posteriors exactly as a record of ordinary values with weight 0 does (0 * -inf would
make them NaN). The expectations are therefore the same call with the extreme record replaced
by an ordinary one: equal bit for bit on one device, and close to the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES, host, on, random_layout, random_logps

import emdpo_core as ec
from emdpo_core.ops import _reference as ref_ops

REDUCTIONS = ["sum", "mean", "weighted_mean", "none"]
# Half-gaps of log-probability whose rewards (beta = 10) are finite but whose ll = -2R is not.
EXTREME = {np.float32: 2e37, np.float64: 1e307}
BETA = 10.0


def problem(rng, dtype, K=2, N=7):
    """(p (K, M), ref, offsets, n_ranked, weights (K, N)) with record 0 a pair whose policy
    gap is ordinary; extreme(p) gives the same problem with type 0's record 0 at ll = -inf."""
    offsets, n_ranked = random_layout(rng, N - 1)
    offsets = np.concatenate([[0], offsets + 2])      # record 0: a pair in slots 0, 1
    n_ranked = np.concatenate([[1], n_ranked])
    p, r = random_logps(rng, K, int(offsets[-1]), dtype, center=-4.0, scale=0.3)
    r[:2] = 0.0
    w = rng.uniform(0.5, 2.0, (K, N)).astype(dtype)
    w[0, 0] = 0.0
    return p, r, offsets, n_ranked, w


def extreme(p):
    q = p.copy()
    a = EXTREME[q.dtype.type]
    q[0, :2] = (-a, a)       # rewards (-10a, 10a): finite, ll = -20a overflows
    return q


def test_the_extreme_record_has_ll_minus_inf_with_finite_rewards():
    # The premise of every test below, in both dtypes: the kernel accepts the inputs (finite
    # rewards) and the record's log-likelihood is -inf under type 0 only.
    for dtype in (np.float32, np.float64):
        p, r, offsets, n_ranked, _ = problem(np.random.default_rng(0), dtype)
        ll = ec.listwise_loglik(extreme(p), r, offsets, beta=BETA, n_ranked=n_ranked)
        assert ll[0, 0] == -np.inf
        assert np.all(np.isfinite(ll[1:])) and np.isfinite(ll[0, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_loss_and_grad_ignore_a_zero_weight_record_at_minus_inf(rng, device, dtype, reduction):
    p, r, offsets, n_ranked, w = problem(rng, dtype)
    out = {}
    for name, q in (("ordinary", p), ("extreme", extreme(p))):
        loss, grad = ec.listwise_dpo_loss_and_grad(
            on(device, q), on(device, r), on(device, offsets), on(device, w), beta=BETA,
            n_ranked=on(device, n_ranked), reduction=reduction)
        out[name] = (host(loss), host(grad))
    loss, grad = out["extreme"]
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(loss, out["ordinary"][0])
    np.testing.assert_array_equal(grad, out["ordinary"][1])
    np.testing.assert_array_equal(grad[0, :2], 0.0)
    if reduction == "none":
        assert loss[0, 0] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_ignores_a_zero_weight_record_at_minus_inf(rng, dtype, reduction):
    # The float64 oracle: the same values as with an ordinary record there (its own ll of the
    # float64 extreme is -inf too), and the kernel agrees with it.
    p, r, offsets, n_ranked, w = problem(rng, dtype)
    kw = dict(beta=BETA, n_ranked=n_ranked, reduction=reduction)
    with np.errstate(over="ignore", invalid="ignore"):
        loss, grad = ref_ops.listwise_dpo_loss_and_grad(extreme(p), r, offsets, w, **kw)
    want_loss, want_grad = ref_ops.listwise_dpo_loss_and_grad(p, r, offsets, w, **kw)
    np.testing.assert_array_equal(loss, want_loss)
    np.testing.assert_array_equal(grad, want_grad)
    got_loss, got_grad = ec.listwise_dpo_loss_and_grad(extreme(p), r, offsets, w, **kw)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_loss, loss, **tol)
    np.testing.assert_allclose(got_grad, grad, **tol)


torch = pytest.importorskip("torch")
import emdpo_core.torch as et  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("one_type", [True, False], ids=["K1", "K2"])
def test_torch_loss_ignores_a_zero_weight_record_at_minus_inf(rng, device, dtype, reduction,
                                                              one_type):
    # K1: one (M,) policy (on the CPU the small-batch path), K2: (K, M) policies.
    p, r, offsets, n_ranked, w = problem(rng, dtype)
    out = {}
    for name, q in (("ordinary", p), ("extreme", extreme(p))):
        q, wt = (q[0], w[0]) if one_type else (q, w)
        policy = torch.tensor(q, device=device, requires_grad=True)
        loss = et.listwise_dpo_loss(policy, torch.tensor(r, device=device),
                                    torch.tensor(offsets, device=device),
                                    torch.tensor(wt, device=device), beta=BETA,
                                    n_ranked=torch.tensor(n_ranked, device=device),
                                    reduction=reduction)
        loss.sum().backward()
        out[name] = (host(loss), host(policy.grad))
    loss, grad = out["extreme"]
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(loss, out["ordinary"][0])
    np.testing.assert_array_equal(grad, out["ordinary"][1])
    np.testing.assert_array_equal(grad[..., :2] if one_type else grad[0, :2], 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_e_step_ignores_a_zero_weight_record_at_minus_inf(rng, device, dtype):
    # The E-step's record weights c_i follow the same rule (S_hk = sum_i c_i ll_ik): record 0
    # (annotator 0, with records 1 and 2) has weight 0, so the posteriors and sums are those
    # of an ordinary record 0.
    p, r, offsets, n_ranked, w = problem(rng, dtype)
    ao = np.array([0, 3, 5, 7])
    c = w[1].copy()
    c[0] = 0.0
    out = {}
    for name, q in (("ordinary", p), ("extreme", extreme(p))):
        res = ec.e_step(on(device, q), on(device, r), on(device, offsets), on(device, ao),
                        np.log([0.4, 0.6]), beta=BETA, n_ranked=on(device, n_ranked),
                        record_weights=on(device, c))
        out[name] = [host(x) for x in (res.responsibilities, res.annotator_loglik, res.loglik)]
    for got, want in zip(out["extreme"], out["ordinary"]):
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, want)
    with np.errstate(over="ignore", invalid="ignore"):
        resp, loglik, S = ref_ops.e_step(extreme(p), r, offsets, ao, np.log([0.4, 0.6]),
                                         beta=BETA, n_ranked=n_ranked, record_weights=c)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["extreme"][0], resp, **tol)
    np.testing.assert_allclose(out["extreme"][1], S, **tol)
    np.testing.assert_allclose(out["extreme"][2], loglik, **tol)
