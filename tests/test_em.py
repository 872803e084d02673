"""EM engine and PlackettLuceMixture: monotone objective, agreement with the float64
reference and with choix, weights = row expansion, invariances, planted-type recovery,
checkpoint/resume, save/load, warm starts, collapsed types, warnings, parameter errors."""

import itertools
import shutil
import warnings

import numba
import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core.em import _plackett_luce_mm as bk
from emdpo_core.ops import _reference as ref
from emdpo_core import PlackettLuceMixture, RankingData

# Short fits (small max_iter) are the point of several tests here; the tests about the
# warning itself use pytest.warns, which records it regardless of this filter.
pytestmark = pytest.mark.filterwarnings("ignore::emdpo_core.ConvergenceWarning")


def planted(seed, K=3, n_items=8, H=300, records=3, candidate_size=4, n_ranked=None,
            scale=1.5, weights=None):
    """A planted mixture and data drawn from it: (truth model, data, types)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(scale=scale, size=(K, n_items))
    w = np.full(K, 1.0 / K) if weights is None else np.asarray(weights)
    truth = PlackettLuceMixture.from_parameters(theta, w)
    data, types = truth.sample(H, records_per_annotator=records, candidate_size=candidate_size,
                               n_ranked=n_ranked, random_state=seed + 1)
    return truth, data, types


def assert_monotone(trace, what=""):
    """Each objective value >= the previous one, up to float64 rounding of sums of about
    1e3-1e4 terms (relative 1e-12 of the value; a decrease of a real step is far larger)."""
    trace = np.asarray(trace)
    steps = np.diff(trace)
    slack = 1e-12 * np.maximum(1.0, np.abs(trace[1:]))
    bad = np.flatnonzero(steps < -slack)
    assert bad.size == 0, f"{what}: objective decreased at iteration {bad[0] + 1}: {steps[bad[0]]}"


def reference_objective(model, data):
    """Observed-data log-likelihood with the fitted parameters, from the float64 reference."""
    g = data.grouped()
    theta = model.family_.log_worths
    resp, _, S = ref.e_step(theta[:, g.items], np.zeros(g.items.shape[0]), g.offsets,
                            g.annotator_offsets, np.log(model.weights_), beta=1.0,
                            n_ranked=g.n_ranked, record_weights=g.record_weight)
    v = np.log(model.weights_)[None, :] + S
    lse = np.log(np.exp(v - v.max(1, keepdims=True)).sum(1)) + v.max(1)
    return resp, float(np.dot(g.annotator_weight, lse))


# ----------------------------------------------------------------------------------------
# The objective


@pytest.mark.parametrize("config", [
    dict(K=3, n_ranked=None, pseudo_count=0.01, alpha=1.0, mm_iter=1),
    dict(K=3, n_ranked=1, pseudo_count=0.0, alpha=1.0, mm_iter=1),       # best-of-4 choices
    dict(K=2, n_ranked=2, pseudo_count=0.5, alpha=3.0, mm_iter=3),
    dict(K=4, n_ranked=None, pseudo_count=0.01, alpha=1.0, mm_iter=1, init="dirichlet"),
    dict(K=3, n_ranked=2, pseudo_count=0.0, alpha=1.0, mm_iter=1, newton=False),   # MM only
])
def test_objective_never_decreases(config):
    _, data, _ = planted(10 + config["K"], K=config["K"], n_ranked=config["n_ranked"], H=200,
                         scale=0.7)
    m = PlackettLuceMixture(config["K"], max_iter=60, tol=0.0, random_state=0,
                            pseudo_count=config["pseudo_count"], alpha=config["alpha"],
                            mm_iter=config["mm_iter"], min_weight=0.0,
                            init_params=config.get("init", "kmeans"),
                            newton=config.get("newton", "auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ec.ConvergenceWarning)
        m.fit(data)
    assert m.n_iter_ == 60 and len(m.lower_bounds_) == 61
    assert_monotone(m.lower_bounds_, str(config))
    assert m.lower_bounds_[-1] > m.lower_bounds_[0]


def test_objective_matches_the_float64_reference():
    _, data, _ = planted(3, K=2, H=60, n_ranked=2)
    data = RankingData(data.items, data.offsets, data.n_ranked, annotator=data.annotator,
                       sample_weight=np.random.default_rng(0).integers(1, 4, data.n_records))
    m = PlackettLuceMixture(2, random_state=0, pseudo_count=0.3, alpha=2.0).fit(data)
    resp, loglik = reference_objective(m, data)
    np.testing.assert_allclose(m.loglik_, loglik, rtol=1e-12)
    np.testing.assert_allclose(m.responsibilities_, resp, rtol=1e-9, atol=1e-12)
    prior = 1.0 * np.log(m.weights_).sum() + 0.3 * np.sum(
        m.family_.log_worths - 2 * np.logaddexp(0, m.family_.log_worths))
    np.testing.assert_allclose(m.objective_, loglik + prior, rtol=1e-12)
    np.testing.assert_allclose(m.lower_bound_, m.objective_ / data.grouped().total_weight)


def test_mm_step_is_monotone_on_the_weighted_objective():
    _, data, _ = planted(4, K=3, H=50, n_ranked=2)
    g = data.grouped()
    rng = np.random.default_rng(5)
    W = rng.random((3, g.n_records))
    theta = rng.normal(size=(3, g.n_items)) * 3
    for c in (0.0, 0.2):
        t = theta.copy()
        wins = bk.pl_wins(g.items, g.offsets, g.n_ranked, W, g.n_items)
        prev = -np.inf
        for _ in range(30):
            ll = bk.pl_weighted_loglik(g.items, g.offsets, g.n_ranked, W, t, g.m_max)
            want = [np.dot(W[k], ref.listwise_loglik(t[k][g.items], np.zeros(g.items.size),
                                                     g.offsets, beta=1.0,
                                                     n_ranked=g.n_ranked)[:, 0])
                    for k in range(3)]
            np.testing.assert_allclose(ll, want, rtol=1e-12)
            obj = ll.sum() + c * np.sum(t - 2 * np.logaddexp(0, t))
            assert obj >= prev - 1e-10 * abs(obj)
            prev = obj
            t = bk.pl_mm_step(g.items, g.offsets, g.n_ranked, W, wins, t, c, g.m_max)


def test_one_type_is_the_plackett_luce_mle_of_choix():
    choix = pytest.importorskip("choix")
    rng = np.random.default_rng(1)
    theta = rng.normal(size=8)
    truth = PlackettLuceMixture.from_parameters([theta], [1.0])
    data, _ = truth.sample(300, random_state=2)
    rankings = [data.items[data.offsets[i]:data.offsets[i + 1]].tolist()
                for i in range(data.n_records)]
    mle = choix.ilsr_rankings(8, rankings, tol=1e-12, max_iter=1000)
    mle -= mle.mean()
    m = PlackettLuceMixture(1, pseudo_count=0.0, tol=1e-14, max_iter=5000).fit(data)
    # ILSR stops at an L1 change of 1e-12; the MM at a change of 1e-14 per record.
    np.testing.assert_allclose(m.log_worths_[0], mle, atol=1e-6)
    ll_choix = ref.listwise_loglik(mle[data.items][None], np.zeros(data.items.size),
                                   data.offsets, beta=1.0).sum()
    assert m.loglik_ >= ll_choix - 1e-9
    # The EM loop alone (from all-equal worths, no initial MM fit) reaches it too, with MM
    # steps only and with MM + Newton steps (the default; about 4 iterations instead of 15).
    for newton in (False, True):
        start = PlackettLuceMixture.from_parameters(np.zeros((1, 8)), [1.0], pseudo_count=0.0,
                                                    tol=1e-14, max_iter=5000, warm_start=True,
                                                    newton=newton)
        start.fit(data)
        assert start.n_iter_ > (1 if newton else 5)
        np.testing.assert_allclose(start.log_worths_[0], mle, atol=1e-6)


def test_newton_pieces_match_the_reference():
    # Value, gradient and Hessian of the weighted Plackett-Luce log-likelihood (the Newton
    # step of the tabular M-step) against the float64 reference and central differences.
    _, data, _ = planted(6, K=2, n_items=6, H=40, n_ranked=2)
    g = data.grouped()
    rng = np.random.default_rng(7)
    W = rng.random((2, g.n_records))
    theta = rng.normal(size=(2, g.n_items)) * 2

    def q(k, t):
        return np.dot(W[k], ref.listwise_loglik(t[g.items], np.zeros(g.items.size), g.offsets,
                                                beta=1.0, n_ranked=g.n_ranked)[:, 0])

    def grad_at(k, t):
        return bk.pl_grad_hess(g.items, g.offsets, g.n_ranked, W[k:k + 1], t[None],
                               g.m_max)[1][0]

    value, grad, hess = bk.pl_grad_hess(g.items, g.offsets, g.n_ranked, W, theta, g.m_max)
    scaled = bk.pl_scaled_loglik(g.items, g.offsets, g.n_ranked, W, theta, g.m_max)
    e = np.eye(g.n_items)
    for k in range(2):
        # Same sums in another order: rounding of ~100 terms, far below 1e-12 relative.
        np.testing.assert_allclose([value[k], scaled[k]], q(k, theta[k]), rtol=1e-12)
        # Central differences, h = 1e-5: truncation ~h^2 = 1e-10 times the third
        # derivative, rounding ~eps |Q| / h ~ 1e-9 for |Q| ~ 100; 1e-6 leaves margin.
        fd = [(q(k, theta[k] + 1e-5 * e[i]) - q(k, theta[k] - 1e-5 * e[i])) / 2e-5
              for i in range(g.n_items)]
        np.testing.assert_allclose(grad[k], fd, atol=1e-6)
        np.testing.assert_array_equal(hess[k], hess[k].T)
        # Central differences of the exact gradient, h = 1e-4 (truncation ~1e-8).
        fd = [(grad_at(k, theta[k] + 1e-4 * e[i]) - grad_at(k, theta[k] - 1e-4 * e[i])) / 2e-4
              for i in range(g.n_items)]
        np.testing.assert_allclose(hess[k], fd, atol=1e-6)
        # Q is concave: the Hessian is negative semi-definite (up to rounding).
        assert np.all(np.linalg.eigvalsh(hess[k]) <= 1e-9 * np.abs(hess[k]).max())


def test_newton_step_never_decreases_the_weighted_objective():
    _, data, _ = planted(8, K=3, H=50, n_ranked=2)
    g = data.grouped()
    rng = np.random.default_rng(9)
    W = rng.random((3, g.n_records))
    for c in (0.0, 0.2):
        fam = ec.TabularPolicies(pseudo_count=c, newton=True)
        t = fam._anchor(rng.normal(size=(3, g.n_items)) * 3)
        q = fam._m_objective(g, W, t)
        moved = 0
        for _ in range(10):
            new = fam._newton(g, W, t)
            q_new = fam._m_objective(g, W, new)
            assert np.all(q_new >= q)
            moved += int(np.sum(q_new > q + 1e-9))
            t, q = new, q_new
        assert moved > 0


# ----------------------------------------------------------------------------------------
# Weights and invariances


def _same_fit(a, b, rtol=1e-9, atol=1e-10):
    np.testing.assert_allclose(a.loglik_, b.loglik_, rtol=rtol)
    np.testing.assert_allclose(a.weights_, b.weights_, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.log_worths_, b.log_worths_, rtol=rtol, atol=atol)


def test_sample_weight_equals_row_expansion_without_annotators():
    _, data, _ = planted(6, K=2, H=80, records=1, n_ranked=2)
    counts = np.random.default_rng(7).integers(0, 4, data.n_records)
    counts[0] = 2
    weighted = RankingData(data.items, data.offsets, data.n_ranked, sample_weight=counts)
    rows = np.repeat(np.arange(data.n_records), counts)
    lengths = np.diff(data.offsets)[rows]
    items = np.concatenate([data.items[data.offsets[i]:data.offsets[i + 1]] for i in rows])
    expanded = RankingData(items, np.concatenate([[0], np.cumsum(lengths)]),
                           data.n_ranked[rows])
    init = np.random.default_rng(8).dirichlet([1, 1], size=data.n_records)
    a = PlackettLuceMixture(2, init_params=init, tol=1e-10, pseudo_count=0.1).fit(weighted)
    b = PlackettLuceMixture(2, init_params=init[rows], tol=1e-10, pseudo_count=0.1).fit(expanded)
    _same_fit(a, b)
    np.testing.assert_allclose(a.responsibilities_[rows], b.responsibilities_, atol=1e-9)
    np.testing.assert_allclose(a.bic(), b.bic(), rtol=1e-9)


def test_sample_weight_equals_row_expansion_within_annotators():
    _, data, _ = planted(9, K=2, H=40, records=3)
    counts = np.random.default_rng(10).integers(1, 4, data.n_records)
    weighted = RankingData(data.items, data.offsets, data.n_ranked, annotator=data.annotator,
                           sample_weight=counts)
    rows = np.repeat(np.arange(data.n_records), counts)
    items = np.concatenate([data.items[data.offsets[i]:data.offsets[i + 1]] for i in rows])
    lengths = np.diff(data.offsets)[rows]
    expanded = RankingData(items, np.concatenate([[0], np.cumsum(lengths)]),
                           data.n_ranked[rows], annotator=data.annotator[rows])
    init = np.random.default_rng(11).dirichlet([1, 1], size=40)
    a = PlackettLuceMixture(2, init_params=init, tol=1e-10).fit(weighted)
    b = PlackettLuceMixture(2, init_params=init, tol=1e-10).fit(expanded)
    _same_fit(a, b)
    np.testing.assert_allclose(a.responsibilities_, b.responsibilities_, atol=1e-9)


def test_invariant_to_annotator_order_and_record_order():
    _, data, _ = planted(12, K=3, H=60, records=3)
    rng = np.random.default_rng(13)
    relabel = rng.permutation(60)                     # new annotator ids
    perm = rng.permutation(data.n_records)            # new record order
    items = np.concatenate([data.items[data.offsets[i]:data.offsets[i + 1]] for i in perm])
    shuffled = RankingData(items, np.concatenate([[0], np.cumsum(np.diff(data.offsets)[perm])]),
                           data.n_ranked[perm], annotator=relabel[data.annotator[perm]])
    init = rng.dirichlet(np.ones(3), size=60)
    a = PlackettLuceMixture(3, init_params=init, tol=1e-10).fit(data)
    b = PlackettLuceMixture(3, init_params=init[np.argsort(relabel)], tol=1e-10).fit(shuffled)
    _same_fit(a, b, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(a.responsibilities_, b.responsibilities_[relabel], atol=1e-7)


def test_invariant_to_item_relabelling():
    _, data, _ = planted(14, K=2, H=150, records=2)
    perm = np.random.default_rng(15).permutation(data.n_items)   # item i becomes perm[i]
    relabelled = RankingData(perm[data.items], data.offsets, data.n_ranked,
                             annotator=data.annotator)
    a = PlackettLuceMixture(2, random_state=3, tol=1e-10).fit(data)
    b = PlackettLuceMixture(2, random_state=3, tol=1e-10).fit(relabelled)
    np.testing.assert_allclose(a.loglik_, b.loglik_, rtol=1e-9)
    np.testing.assert_allclose(a.log_worths_, b.log_worths_[:, perm], atol=1e-7)


def test_same_result_for_any_thread_count():
    _, data, _ = planted(16, K=3, H=100)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = PlackettLuceMixture(3, random_state=0, max_iter=30, tol=0).fit(data)
        numba.set_num_threads(max(2, before))
        b = PlackettLuceMixture(3, random_state=0, max_iter=30, tol=0).fit(data)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(a.lower_bounds_, b.lower_bounds_)
    assert np.array_equal(a.log_worths_, b.log_worths_)


# ----------------------------------------------------------------------------------------
# Recovery of planted types


def _matched_accuracy(pred, types, K):
    return max(np.mean(np.asarray(p)[pred] == types) for p in itertools.permutations(range(K)))


def test_planted_types_recovered_about_as_well_as_the_true_parameter_classifier():
    truth, data, types = planted(20, K=3, n_items=10, H=600, records=4, candidate_size=5,
                                 scale=1.2, weights=[0.5, 0.3, 0.2])
    m = PlackettLuceMixture(3, n_init=3, random_state=0).fit(data)
    oracle = np.mean(truth.predict(data) == types)
    fitted = _matched_accuracy(m.predict(), types, 3)
    assert 0.75 < oracle < 0.99            # a problem where the types are not trivially apart
    # A fit on 600 annotators pays a few percent for estimating 29 parameters.
    assert fitted >= oracle - 0.03, (fitted, oracle)
    k = np.argsort(-m.weights_)
    np.testing.assert_allclose(m.weights_[k], [0.5, 0.3, 0.2], atol=0.06)


def test_fit_predict_agrees_with_fit_then_predict_and_predict_proba_on_data():
    _, data, _ = planted(21, K=2, H=100)
    m = PlackettLuceMixture(2, random_state=1)
    labels = m.fit_predict(data)
    assert np.array_equal(labels, m.predict())
    np.testing.assert_allclose(m.predict_proba(data), m.responsibilities_, rtol=1e-12)
    per = m.score_samples(data)
    assert per.shape == (100,)
    np.testing.assert_allclose(per.sum(), m.loglik_, rtol=1e-12)
    np.testing.assert_allclose(m.score(data), m.loglik_ / data.n_records, rtol=1e-12)
    p = m.n_parameters()
    assert p == 2 * (8 - 1) + 1
    np.testing.assert_allclose(m.bic(), -2 * m.loglik_ + p * np.log(100))
    np.testing.assert_allclose(m.aic(), -2 * m.loglik_ + 2 * p)
    np.testing.assert_allclose(m.bic(data), m.bic(), rtol=1e-12)


def test_select_n_components_finds_the_planted_number():
    _, data, _ = planted(22, K=2, n_items=6, H=300, records=2, scale=2.0)
    sel = ec.select_n_components(data, [1, 2, 3], random_state=0)
    assert [r["n_components"] for r in sel.rows] == [1, 2, 3]
    assert sel.best_n_components == 2
    assert sel.rows[1]["bic"] < sel.rows[0]["bic"] and sel.rows[1]["bic"] < sel.rows[2]["bic"]
    assert "BIC" in str(sel) and sel.best_model is sel.models[2]
    with pytest.raises(ValueError, match="criterion"):
        ec.select_n_components(data, [1], criterion="bad")


def test_sample_shapes_and_frequencies():
    truth = PlackettLuceMixture.from_parameters([[2.0, 0, -2]], [1.0])
    data, types = truth.sample(4000, random_state=0)
    top = data.items[data.offsets[:-1]]
    p = np.exp([2.0, 0, -2]) / np.exp([2.0, 0, -2]).sum()
    # 4000 draws: the standard error of a frequency is below 0.008, so 0.03 is ~4 sigma.
    np.testing.assert_allclose(np.bincount(top, minlength=3) / 4000, p, atol=0.03)
    d2, t2 = truth.sample(10, records_per_annotator=3, candidate_size=2, random_state=1)
    assert d2.n_records == 30 and d2.n_annotators == 10 and np.all(np.diff(d2.offsets) == 2)
    with pytest.raises(ValueError, match="candidate_size"):
        truth.sample(5, candidate_size=4)
    with pytest.raises(ValueError, match="n_ranked"):
        truth.sample(5, n_ranked=3)


# ----------------------------------------------------------------------------------------
# Checkpoints, save/load, warm start


class _Stop(Exception):
    pass


def _interrupt_at(restart, iteration, exc=KeyboardInterrupt):
    def cb(info):
        if info["restart"] == restart and info["iteration"] == iteration:
            raise exc()
    return cb


def _assert_identical(a, b):
    assert np.array_equal(a.lower_bounds_, b.lower_bounds_)
    assert np.array_equal(a.log_worths_, b.log_worths_)
    assert np.array_equal(a.weights_, b.weights_)
    assert np.array_equal(a.responsibilities_, b.responsibilities_)
    assert a.loglik_ == b.loglik_ and a.n_iter_ == b.n_iter_ and a.restarts_ == b.restarts_


@pytest.mark.parametrize("exc", [KeyboardInterrupt, _Stop])
def test_interrupted_fit_resumes_to_the_same_result(tmp_path, exc):
    _, data, _ = planted(30, K=3, H=150)
    params = dict(n_init=3, random_state=5, tol=1e-8, max_iter=40)
    full = PlackettLuceMixture(3, **params).fit(data)
    ck = tmp_path / "ck.npz"
    with pytest.raises(exc):
        PlackettLuceMixture(3, checkpoint=ck, checkpoint_every=100, **params).fit(
            data, callback=_interrupt_at(1, 7, exc))
    resumed = PlackettLuceMixture.load(ck)
    assert resumed._pending["next_restart"] == 1 and resumed._pending["run"].n_iter == 7
    resumed.fit(data)
    _assert_identical(full, resumed)


def test_resume_from_a_periodic_checkpoint_after_a_hard_stop(tmp_path):
    _, data, _ = planted(31, K=2, H=150)
    params = dict(n_init=2, random_state=6, tol=1e-9, max_iter=50)
    full = PlackettLuceMixture(2, **params).fit(data)
    ck, copy = tmp_path / "ck.npz", tmp_path / "copy.npz"

    def keep_file(info):      # what a killed process would leave: the iteration-6 write
        if info["restart"] == 0 and info["iteration"] == 6:
            shutil.copy(ck, copy)

    PlackettLuceMixture(2, checkpoint=ck, checkpoint_every=3, **params).fit(
        data, callback=keep_file)
    resumed = PlackettLuceMixture.load(copy)
    assert resumed._pending["run"].n_iter == 6
    resumed.fit(data)
    _assert_identical(full, resumed)
    # the finished checkpoint is a fitted model
    done = PlackettLuceMixture.load(ck)
    _assert_identical(full, done)


def test_resume_refuses_other_data(tmp_path):
    _, data, _ = planted(32, K=2, H=60)
    _, other, _ = planted(33, K=2, H=60)
    ck = tmp_path / "ck.npz"
    with pytest.raises(KeyboardInterrupt):
        PlackettLuceMixture(2, checkpoint=ck, random_state=0).fit(
            data, callback=_interrupt_at(0, 2))
    with pytest.raises(ValueError, match="checkpoint was written for different data"):
        PlackettLuceMixture.load(ck).fit(other)


def test_save_and_load_round_trip(tmp_path):
    _, data, _ = planted(34, K=2, H=80)
    m = PlackettLuceMixture(2, random_state=0, alpha=1.5, pseudo_count=0.2).fit(data)
    m.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:   # no pickled objects inside
        assert "__meta__" in z.files
    back = PlackettLuceMixture.load(tmp_path / "m.npz")
    _assert_identical(m, back)
    assert back.alpha == 1.5 and back.pseudo_count == 0.2
    np.testing.assert_array_equal(back.predict_proba(data), m.predict_proba(data))
    np.testing.assert_allclose(back.bic(), m.bic())
    with pytest.raises(ValueError, match="not an emdpo_core model"):
        np.savez(tmp_path / "x.npz", a=np.zeros(2))
        PlackettLuceMixture.load(tmp_path / "x.npz")


def test_user_responsibilities_are_saved_as_an_array(tmp_path):
    _, data, _ = planted(35, K=2, H=30)
    init = np.random.default_rng(0).dirichlet([1, 1], size=30)
    m = PlackettLuceMixture(2, init_params=init).fit(data)
    m.save(tmp_path / "m.npz")
    assert np.array_equal(PlackettLuceMixture.load(tmp_path / "m.npz").init_params, init)


def test_warm_start_continues_the_same_trajectory():
    _, data, _ = planted(36, K=2, H=120)
    long = PlackettLuceMixture(2, random_state=0, tol=1e-9, max_iter=40).fit(data)
    short = PlackettLuceMixture(2, random_state=0, tol=1e-9, max_iter=5)
    with pytest.warns(ec.ConvergenceWarning, match="did not converge in max_iter=5"):
        short.fit(data)
    short.set_params(warm_start=True, max_iter=35)
    short.fit(data)
    np.testing.assert_array_equal(short.lower_bounds_, long.lower_bounds_[5:])
    np.testing.assert_array_equal(short.log_worths_, long.log_worths_)


# ----------------------------------------------------------------------------------------
# Collapsed types and warnings


def test_a_collapsing_type_is_dropped():
    _, data, _ = planted(40, K=1, H=100)
    init = np.tile([0.5, 0.49, 0.01], (100, 1))
    m = PlackettLuceMixture(3, init_params=init, min_weight=0.05)
    with pytest.warns(ec.CollapsedComponentWarning, match="type 2 collapsed"):
        m.fit(data)
    assert m.n_components_ == 2 and m.weights_.shape == (2,) and m.log_worths_.shape == (2, 8)
    assert m.dropped_components_ == [[0, 2]]      # dropped at the start (iteration 0)
    assert m.responsibilities_.shape == (100, 2)
    np.testing.assert_allclose(m.responsibilities_.sum(1), 1.0)


def test_types_that_collapse_during_em_are_dropped_and_each_segment_is_monotone():
    _, data, _ = planted(41, K=2, H=200, scale=2.0)
    m = PlackettLuceMixture(4, init_params="dirichlet", random_state=0, min_weight=0.1)
    with pytest.warns(ec.CollapsedComponentWarning):
        m.fit(data)
    drops = [it for it, _ in m.dropped_components_]
    assert m.n_components_ == 4 - len(drops) and len(drops) >= 1 and min(drops) > 0
    assert np.all(m.weights_ >= 0.1)
    bounds = [0] + drops + [len(m.lower_bounds_)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):   # a drop may move the objective either way
        assert_monotone(m.lower_bounds_[lo:hi], f"segment {lo}..{hi}")


def test_identifiability_warnings_are_emitted_by_fit():
    def messages(data):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PlackettLuceMixture(2, random_state=0, max_iter=5).fit(data)
        return [str(w.message) for w in caught if w.category is ec.IdentifiabilityWarning]

    pairs = RankingData.from_rankings([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]] * 10)
    found = messages(pairs)
    assert any("binary comparisons cannot identify" in m for m in found)
    assert any("6 degrees of freedom" in m for m in found)        # 6 pairs < 7 parameters
    triple = RankingData.from_rankings([[0]] * 30 + [[1]] * 20 + [[2]] * 10, [[0, 1, 2]] * 60)
    found = messages(triple)
    assert any("2 degrees of freedom" in m for m in found)
    assert any("over 3 items is not identifiable" in m for m in found)
    _, rich, _ = planted(61, K=2, H=50)
    assert messages(rich) == []


# ----------------------------------------------------------------------------------------
# Parameter and data errors


@pytest.mark.parametrize("params, err, match", [
    (dict(n_components=0), ValueError, r"n_components: expected an int >= 1, got 0"),
    (dict(n_components=2.0), TypeError, r"n_components: expected an int"),
    (dict(max_iter=0), ValueError, r"max_iter"),
    (dict(tol=-1.0), ValueError, r"tol: expected a finite number >= 0"),
    (dict(n_init=0), ValueError, r"n_init"),
    (dict(init_params="kmeans++"), ValueError, r"init_params: expected one of"),
    (dict(init_params=np.ones((3, 2))), ValueError, r"init_params: expected an \(H, K\) = \(20, 2\)"),
    (dict(init_params=-np.ones((20, 2))), ValueError, r"init_params: row 0 must be finite"),
    (dict(alpha=0.5), ValueError, r"alpha: expected a finite number >= 1"),
    (dict(min_weight=1.0), ValueError, r"min_weight: expected 'auto' or a number in \[0, 1\)"),
    (dict(min_weight="big"), TypeError, r"min_weight: expected a real number"),
    (dict(random_state=-1), TypeError, r"random_state"),
    (dict(pseudo_count=-0.1), ValueError, r"pseudo_count"),
    (dict(mm_iter=0), ValueError, r"mm_iter"),
    (dict(newton="yes"), ValueError, r"newton: expected True, False or 'auto', got 'yes'"),
    (dict(n_components=21), ValueError, r"n_components=21 exceeds the number of annotators H=20"),
    (dict(verbose=-1), ValueError, r"verbose"),
    (dict(checkpoint_every=0), ValueError, r"checkpoint_every"),
])
def test_parameter_errors(params, err, match):
    _, data, _ = planted(50, K=2, H=20, records=1)
    params = {"n_components": 2, **params}
    with pytest.raises(err, match=match):
        PlackettLuceMixture(**params).fit(data)


def test_data_errors():
    m = PlackettLuceMixture(2)
    with pytest.raises(TypeError, match="data: expected a RankingData"):
        m.fit([[0, 1]])
    never = RankingData.from_rankings([[0, 1], [1, 0]], [[0, 1, 2], [1, 0, 2]])
    with pytest.raises(ValueError, match=r"item 2 .* is never ranked above another"):
        PlackettLuceMixture(1, pseudo_count=0.0).fit(never)
    assert PlackettLuceMixture(1).fit(never).log_worths_[0, 2] < -1.0   # pseudo-count: finite
    with pytest.raises(RuntimeError, match="not fitted"):
        PlackettLuceMixture(2).predict()
    small = PlackettLuceMixture(1).fit(never)
    with pytest.raises(ValueError, match="n_items=5 but the model was fitted on 3 items"):
        small.predict_proba(RankingData.from_rankings([[4, 0]]))


def test_verbose_progress_lines(capsys):
    _, data, _ = planted(60, K=2, H=40)
    PlackettLuceMixture(2, random_state=0, max_iter=3, verbose=2).fit(data)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "restart 0 iteration 1: lower bound" in text
    assert "restart 0 iteration 3: lower bound" in text


def test_the_numpy_path_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, emdpo_core as ec\n"
            "d = ec.RankingData.from_rankings([[0, 1, 2], [2, 1, 0], [1, 0, 2]] * 5)\n"
            "ec.PlackettLuceMixture(2, random_state=0, max_iter=3).fit(d)\n"
            "ec.select_n_components(d, [1, 2], max_iter=3)\n"
            "import emdpo_core.cli\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    from conftest import SUBPROCESS_CWD
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                       text=True, timeout=120, cwd=SUBPROCESS_CWD)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------
# The plug-in interface: a family with a gradient M-step on the compiled DPO loss


class SoftmaxPolicies(ec.PolicyFamily):
    """Tabular softmax policies pi_k = softmax(logits_k) against a uniform reference, with a
    DPO temperature beta; M-step: gradient steps with backtracking on the weighted listwise
    DPO loss of the compiled kernel (monotone: a step is taken only if the loss drops)."""

    def __init__(self, n_items, beta=2.0, steps=20):
        self.n_items, self.beta, self.steps = n_items, beta, steps
        self.logits = None
        self.lr = None

    @property
    def n_components(self):
        return self.logits.shape[0]

    def initialize(self, data, weights, rng):
        self.logits = rng.normal(scale=0.01, size=(weights.shape[0], self.n_items))
        self.lr = np.full(weights.shape[0], 1.0)
        self.m_step(data, weights)

    def _policy(self, data, logits):
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        return np.ascontiguousarray(logp[:, data.items])

    def logps(self, data):
        M = data.items.shape[0]
        return ec.PolicyLogps(self._policy(data, self.logits),
                              np.full(M, -np.log(self.n_items)), self.beta)

    def _loss_grad(self, data, weights, logits):
        ref = np.full(data.items.shape[0], -np.log(self.n_items))
        K = logits.shape[0]
        losses, grad = ec.listwise_dpo_loss_and_grad(
            self._policy(data, logits), ref, data.offsets, weights, beta=self.beta,
            n_ranked=data.n_ranked, reduction="none")
        g_logp = np.zeros_like(logits)
        for k in range(K):
            g_logp[k] = np.bincount(data.items, weights=grad[k], minlength=self.n_items)
        soft = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
        g_logits = g_logp - soft * g_logp.sum(axis=1, keepdims=True)
        return losses.sum(axis=1), g_logits

    def m_step(self, data, weights):
        loss, grad = self._loss_grad(data, weights, self.logits)
        scale = weights.sum(axis=1)[:, None]
        for _ in range(self.steps):
            trial = self.logits - self.lr[:, None] * grad / scale
            new_loss, new_grad = self._loss_grad(data, weights, trial)
            better = new_loss <= loss
            self.logits = np.where(better[:, None], trial, self.logits)
            loss = np.where(better, new_loss, loss)
            grad = np.where(better[:, None], new_grad, grad)
            self.lr = np.where(better, self.lr * 1.5, self.lr * 0.5)

    def n_parameters(self):
        return self.logits.shape[0] * (self.n_items - 1)

    def keep_components(self, keep):
        self.logits, self.lr = self.logits[keep], self.lr[keep]

    def state_dict(self):
        return {"logits": self.logits.copy(), "lr": self.lr.copy()}

    def load_state_dict(self, state):
        self.logits, self.lr = state["logits"].copy(), state["lr"].copy()


class GenericEM(ec.EMEstimator):
    _SKIP_PARAMS = ("family",)

    def __init__(self, n_components=1, *, family=None, **kwargs):
        super().__init__(n_components, **kwargs)
        self.family = family

    def _make_family(self):
        return self.family

    def _as_data(self, data):
        return data


def test_a_gradient_family_plugs_into_the_engine_and_reaches_the_tabular_solution(tmp_path):
    _, data, _ = planted(70, K=2, n_items=6, H=150, records=2, scale=1.5)
    init = np.random.default_rng(71).dirichlet([1, 1], size=150)
    tab = PlackettLuceMixture(2, init_params=init, pseudo_count=0.0, tol=1e-10,
                              max_iter=2000).fit(data)
    fam = SoftmaxPolicies(data.n_items, beta=2.0)
    em = GenericEM(2, family=fam, init_params=init, tol=1e-10, max_iter=300,
                   random_state=0).fit(data)
    assert_monotone(em.lower_bounds_, "gradient family")
    # rewards beta * (log pi_k - log pi_ref) = beta * logits_k + const are the log-worths
    worths = em.family_.logits * 2.0
    worths -= worths.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(em.loglik_, tab.loglik_, rtol=1e-6)
    np.testing.assert_allclose(worths, tab.log_worths_, atol=2e-3)
    np.testing.assert_allclose(em.weights_, tab.weights_, atol=1e-4)
    # save/load of a family the file cannot rebuild: it is given again
    em.save(tmp_path / "g.npz")
    back = GenericEM.load(tmp_path / "g.npz", family=SoftmaxPolicies(data.n_items))
    np.testing.assert_array_equal(back.family_.logits, em.family_.logits)
    np.testing.assert_allclose(back.predict_proba(data), em.predict_proba(data))


def test_a_model_made_from_parameters_saves_and_loads(tmp_path):
    truth = PlackettLuceMixture.from_parameters([[1.0, 0, -1], [-1.0, 0, 1]], [0.7, 0.3])
    truth.save(tmp_path / "t.npz")
    back = PlackettLuceMixture.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.log_worths_, truth.log_worths_)
    np.testing.assert_array_equal(back.weights_, truth.weights_)
    data, _ = truth.sample(20, random_state=0)
    np.testing.assert_array_equal(back.predict_proba(data), truth.predict_proba(data))
