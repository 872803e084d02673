"""The compiled CPU kernels against the float64 reference (emdpo_core.ops._reference)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, random_layout, random_logps

import emdpo_core as ec
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_listwise_loglik_matches_reference(rng, dtype, layout):
    offsets, n_ranked = make_layout(rng, *layout, n=60)
    p, r = random_logps(rng, 3, offsets[-1], dtype)
    got = ec.listwise_loglik(p, r, offsets, beta=0.8, n_ranked=n_ranked)
    want = ref.listwise_loglik(p, r, offsets, beta=0.8, n_ranked=n_ranked)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL[dtype])


def test_single_policy_accepts_1d_and_2d(rng):
    offsets, n_ranked = random_layout(rng, 30)
    p, r = random_logps(rng, 1, offsets[-1])
    a = ec.listwise_loglik(p[0], r, offsets, beta=1.0, n_ranked=n_ranked)
    b = ec.listwise_loglik(p, r, offsets, beta=1.0, n_ranked=n_ranked)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (30, 1)


def test_pairs_equal_dpo_sigmoid_loss(rng):
    n = 50
    offsets = np.arange(0, 2 * n + 1, 2)
    p, r = random_logps(rng, 1, 2 * n)
    beta = 0.3
    margin = beta * ((p[0, 0::2] - r[0::2]) - (p[0, 1::2] - r[1::2]))
    want = -np.logaddexp(0.0, -margin)  # log sigmoid(margin)
    np.testing.assert_allclose(ec.listwise_loglik(p, r, offsets, beta=beta)[:, 0], want,
                               rtol=1e-12)


def group_records(rng, offsets, n_ranked, annotator_of_record):
    """Reorder records so they are grouped by annotator, as the E-step expects."""
    order, aoff = ec.group_by_annotator(annotator_of_record)
    m = np.diff(offsets)[order]
    slots = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])
    new_offsets = np.concatenate([[0], np.cumsum(m)])
    return slots, new_offsets, (None if n_ranked is None else n_ranked[order]), aoff, order


ANNOTATOR_CASES = ["random", "one_annotator", "one_record_each", "with_empty"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ANNOTATOR_CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_e_step_matches_reference(rng, dtype, case, weighted):
    # 5000 records cross several of the kernel's 2048-record reduction chunks, so annotators
    # that straddle chunk boundaries are exercised.
    N = 5000
    offsets, n_ranked = random_layout(rng, N, 2, 6)
    if case == "random":
        ann = rng.integers(0, 700, size=N)
    elif case == "one_annotator":
        ann = np.zeros(N, dtype=np.int64)
    elif case == "one_record_each":
        ann = rng.permutation(N)
    else:  # ids with gaps: annotators without records in between and at the end
        ann = 3 * rng.integers(0, 200, size=N)
    n_ann = int(ann.max()) + 1 + (5 if case == "with_empty" else 0)
    order, aoff = ec.group_by_annotator(ann, n_annotators=n_ann)
    slots = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])
    offsets_g = np.concatenate([[0], np.cumsum(np.diff(offsets)[order])])
    n_ranked_g = n_ranked[order]
    K = 4
    p, r = random_logps(rng, K, offsets[-1], dtype, scale=1.0)
    p, r = np.ascontiguousarray(p[:, slots]), np.ascontiguousarray(r[slots])
    log_w = np.log(rng.dirichlet(np.ones(K)))
    cw = rng.uniform(0.5, 2.0, size=N) if weighted else None
    got = ec.e_step(p, r, offsets_g, aoff, log_w, beta=0.5, n_ranked=n_ranked_g,
                    record_weights=cw, return_record_loglik=True)
    resp, ll, S = ref.e_step(p, r, offsets_g, aoff, log_w, beta=0.5, n_ranked=n_ranked_g,
                             record_weights=cw)
    tol = TOL[dtype]
    np.testing.assert_allclose(got.annotator_loglik, S, **tol)
    np.testing.assert_allclose(got.responsibilities, resp, **tol)
    np.testing.assert_allclose(got.loglik, ll, rtol=tol["rtol"])
    np.testing.assert_allclose(got.responsibilities.sum(axis=1), 1.0, **tol)
    np.testing.assert_allclose(
        got.record_loglik,
        ref.listwise_loglik(p, r, offsets_g, beta=0.5, n_ranked=n_ranked_g), **tol)
    if case == "with_empty":
        empty = np.flatnonzero(np.diff(aoff) == 0)
        assert empty.size > 0
        np.testing.assert_allclose(got.responsibilities[empty], np.exp(log_w)[None].repeat(
            empty.size, 0), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("as_torch", [False, True])
def test_e_step_annotator_weights_and_type_totals_match_reference(rng, dtype, as_torch):
    N, H, K = 400, 37, 3
    offsets, n_ranked = random_layout(rng, N, 2, 7)
    aoff = np.concatenate([[0], np.sort(rng.integers(0, N + 1, size=H - 1)), [N]])
    p, r = random_logps(rng, K, offsets[-1], dtype, scale=1.0)
    log_w = np.log(rng.dirichlet(np.ones(K)))
    v = rng.uniform(0.0, 3.0, size=H)
    v[rng.integers(0, H)] = 0.0    # an annotator of weight 0 adds nothing
    args = (p, r, offsets, aoff)
    if as_torch:
        torch = pytest.importorskip("torch")
        args = tuple(torch.from_numpy(a) for a in args)
    got = ec.e_step(*args, log_w, beta=0.5, n_ranked=n_ranked, annotator_weights=v)
    resp, ll, _ = ref.e_step(p, r, offsets, aoff, log_w, beta=0.5, n_ranked=n_ranked,
                             annotator_weights=v)
    tol = TOL[dtype]
    got_resp = got.responsibilities.numpy() if as_torch else got.responsibilities
    np.testing.assert_allclose(got_resp, resp, **tol)
    np.testing.assert_allclose(got.loglik, ll, rtol=tol["rtol"])
    totals = got.type_totals.numpy() if as_torch else got.type_totals
    assert totals.dtype == np.float64 and totals.shape == (K,)
    np.testing.assert_allclose(totals, ref.e_step_type_totals(resp, v), **tol)
    # Without weights: the unweighted log-likelihood and plain column sums.
    plain = ec.e_step(*args, log_w, beta=0.5, n_ranked=n_ranked)
    _, ll1, _ = ref.e_step(p, r, offsets, aoff, log_w, beta=0.5, n_ranked=n_ranked)
    np.testing.assert_allclose(plain.loglik, ll1, rtol=tol["rtol"])
    np.testing.assert_allclose(np.asarray(plain.type_totals), resp.sum(axis=0), **tol)


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


def test_e_step_without_record_table_returns_none(rng):
    offsets, _ = random_layout(rng, 10, partial=False)
    p, r = random_logps(rng, 2, offsets[-1])
    res = ec.e_step(p, r, offsets, [0, 4, 10], np.log([0.5, 0.5]), beta=1.0)
    assert res.record_loglik is None
    assert isinstance(res.loglik, float)


REDUCTIONS = ["sum", "mean", "weighted_mean", "none"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("K", [1, 3])
def test_loss_and_grad_match_reference(rng, dtype, reduction, K):
    offsets, n_ranked = random_layout(rng, 80, 2, 40)
    p, r = random_logps(rng, K, offsets[-1], dtype)
    N = len(offsets) - 1
    w = rng.uniform(0, 2, size=(K, N)).astype(dtype)
    policy = p[0] if K == 1 else p
    weights = w[0] if K == 1 else w
    loss, grad = ec.listwise_dpo_loss_and_grad(policy, r, offsets, weights, beta=1.7,
                                               n_ranked=n_ranked, reduction=reduction)
    loss_ref, grad_ref = ref.listwise_dpo_loss_and_grad(policy, r, offsets, weights, beta=1.7,
                                                        n_ranked=n_ranked, reduction=reduction)
    tol = TOL[dtype]
    assert grad.shape == policy.shape and grad.dtype == dtype
    np.testing.assert_allclose(loss, loss_ref, **tol)
    # Gradients are O(beta * w / scale) per slot; compare relative to their scale.
    np.testing.assert_allclose(grad, grad_ref, rtol=tol["rtol"],
                               atol=tol["atol"] * np.abs(grad_ref).max())


def test_loss_default_weights_are_ones(rng):
    offsets, n_ranked = random_layout(rng, 40)
    p, r = random_logps(rng, 1, offsets[-1])
    a = ec.listwise_dpo_loss_and_grad(p[0], r, offsets, beta=1.0, n_ranked=n_ranked)
    b = ec.listwise_dpo_loss_and_grad(p[0], r, offsets, np.ones(40), beta=1.0, n_ranked=n_ranked)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_extremes_are_stable(rng, dtype):
    """Sequence log-probabilities near -1e4, beta = 10, lists of hundreds, huge reward gaps."""
    offsets, n_ranked = random_layout(rng, 20, 2, 300)
    M = offsets[-1]
    p = (-1e4 + rng.normal(0, 5, size=(2, M))).astype(dtype)
    r = (-1e4 + rng.normal(0, 5, size=M)).astype(dtype)
    p[1, ::7] -= 3000.0  # rewards spread over 3e4: exp() of raw rewards would overflow
    ll = ec.listwise_loglik(p, r, offsets, beta=10.0, n_ranked=n_ranked)
    want = ref.listwise_loglik(p, r, offsets, beta=10.0, n_ranked=n_ranked)
    assert np.all(np.isfinite(ll))
    np.testing.assert_allclose(ll, want, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * np.abs(want).max())
    loss, grad = ec.listwise_dpo_loss_and_grad(p, r, offsets, np.ones((2, 20)), beta=10.0,
                                               n_ranked=n_ranked)
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


def test_int32_indices_are_accepted(rng):
    offsets, n_ranked = random_layout(rng, 20)
    p, r = random_logps(rng, 2, offsets[-1])
    a = ec.listwise_loglik(p, r, offsets.astype(np.int32), beta=1.0,
                           n_ranked=n_ranked.astype(np.int32))
    b = ec.listwise_loglik(p, r, offsets, beta=1.0, n_ranked=n_ranked)
    np.testing.assert_array_equal(a, b)


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
