"""Real ranking data (PrefLib): the EM fit of PlackettLuceMixture reaches the maximum
likelihood, for K = 1, 2, 3, and its objective never decreases.

Data (tests/data, see tests/data/README.md): movie rankings (Netflix Prize, 3 movies, 391
full rankings) and election ballots (Debian 2002 project leader election, 4 candidates: the
15 most frequent ballot types, 397 voters, full and top-k ballots).

The maximum-likelihood values are not written down here: every expectation is computed in
this file by methods that share nothing with the package:
  * a minimal PrefLib reader (so a bug in RankingData.from_preflib would show as a
    mismatch), which turns every ballot into its Plackett-Luce choice stages: the
    alternative listed at position t is chosen from itself and every alternative not listed
    before it (unlisted ones included: a top-k ballot is a top-k ranking of all candidates);
  * K = 1: choix (ILSR on the choice stages, and its own log-likelihood) and a direct
    L-BFGS maximization of the Plackett-Luce likelihood written here with NumPy/SciPy;
  * K = 2, 3: a direct L-BFGS maximization of the mixture likelihood over log-worths and
    softmax-parametrized mixture weights, from many random starts, keeping the best;
  * upper bounds no model can beat: the largest likelihood of ANY distribution over the
    rankings (the saturated model).

Mixtures of 2 or 3 Plackett-Luce models over 3 items, and of 3 over 4 items, are not
identifiable (Zhao, Piech and Xia 2016: m <= 2k - 1 items), and several maxima here lie at
infinity (a type that never ranks some items above the others: their worths go to 0). So
only likelihood VALUES are compared, never parameters, except for K = 1 (a unique MLE).

``benchmarks/real_data_values.py`` prints the table of these values (tests/data/README.md).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

from emdpo_core import (ConvergenceWarning, IdentifiabilityWarning, PlackettLuceMixture,
                        RankingData)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = {
    "netflix": "00004-00000050.soc",        # movie rankings: 3 movies, 391 full rankings
    "debian": "00002-00000001-top15.soi",   # election ballots: 4 candidates, 397 ballots
}
N_COMPONENTS = (1, 2, 3)

# The EM fit: exact maximum likelihood (no pseudo-count), a tight tolerance, restarts.
# tol is on the change of the log-likelihood per record between iterations; 1e-14 per
# record is ~4e-12 in total for ~400 records, a few times the rounding of these sums (~1e-13).
EM_PARAMS = dict(pseudo_count=0.0, tol=1e-14, max_iter=20_000, n_init=3, random_state=0)

# How close EM must come to the independent maximum (absolute, in log-likelihood units).
# EM stops when an iteration gains less than tol * N = 4e-12. Near these maxima it converges
# linearly with rate r, so what is left is about (last gain) * r / (1 - r). The slowest case
# is netflix K = 2 (a type whose worth of one movie goes to 0), with r = 0.991 measured from
# its trace: about 110 * 4e-12 = 4.4e-10 left (measured gap 4e-10). The independent L-BFGS
# optimum is reproducible across starts to ~1e-12. 1e-8 leaves a 20x margin over both.
VALUE_TOL = 1e-8

# The objective trace may "decrease" by rounding only: successive values are float64 sums of
# ~15 weighted terms of size ~1e2 computed in one fixed order; once converged, their true
# change is below 1e-16 relative and the computed one is rounding (~1e-15 relative). A real
# EM step that lowered the likelihood would show far above 1e-12 relative.
MONOTONE_RTOL = 1e-12

# Random starts of the independent optimizer; the best is kept.
N_STARTS = 12


# ----------------------------------------------------------------------------------------
# Independent reading of the files: PrefLib orders -> Plackett-Luce choice stages


def read_orders(path):
    """(n_alternatives, [(count, [alternatives 0-based, best first])]) from a PrefLib .soc /
    .soi file with '# NUMBER ALTERNATIVES: n' header lines and 'count: a,b,c' data lines
    (no ties). Deliberately minimal and separate from RankingData.from_preflib."""
    n_alt, orders = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                key, _, value = line[1:].partition(":")
                if key.strip() == "NUMBER ALTERNATIVES":
                    n_alt = int(value)
                continue
            count, _, order = line.partition(":")
            orders.append((int(count), [int(a) - 1 for a in order.split(",")]))
    return n_alt, orders


def choice_stages(n_alt, order):
    """[(winner, losers)] of a ballot: stage t chooses order[t] from itself and every
    alternative not yet chosen; a ballot listing n or n - 1 alternatives is a full ranking
    (n - 1 stages), one listing k < n - 1 a top-k ranking (k stages)."""
    stages, chosen = [], set()
    for a in order[:n_alt - 1]:
        chosen.add(a)
        stages.append((a, tuple(b for b in range(n_alt) if b not in chosen)))
    return stages


class MixtureLikelihood:
    """Log-likelihood of a mixture of K Plackett-Luce models (one type per voter) and its
    gradient, written directly with NumPy over the choice stages of the distinct ballots.

    Parameters x = (theta (K, n) log-worths, a (K,) logits); weights eta = softmax(a):
        L(x) = sum_b n_b log sum_k eta_k prod_{stages (w, S) of b} exp(theta_kw) /
               sum_{j in S + w} exp(theta_kj)
    """

    def __init__(self, n_alt, orders, K):
        self.n, self.K = n_alt, K
        self.counts = np.array([c for c, _ in orders], dtype=np.float64)
        ballot, winner, in_play = [], [], []
        for b, (_, order) in enumerate(orders):
            for w, losers in choice_stages(n_alt, order):
                mask = np.zeros(n_alt, dtype=bool)
                mask[[w, *losers]] = True
                ballot.append(b)
                winner.append(w)
                in_play.append(mask)
        self.ballot = np.array(ballot)
        self.winner = np.array(winner)
        self.in_play = np.array(in_play)                        # (stages, n)
        self.onehot = np.eye(n_alt)[self.winner]                # (stages, n)
        # (ballots, stages) 0/1 matrix summing stage terms into ballots
        self.to_ballot = np.zeros((len(orders), len(ballot)))
        self.to_ballot[self.ballot, np.arange(len(ballot))] = 1.0

    def split(self, x):
        theta = x[:self.K * self.n].reshape(self.K, self.n)
        a = x[self.K * self.n:]
        return theta, a - np.logaddexp.reduce(a)

    def value_and_grad(self, x):
        theta, log_eta = self.split(x)
        z = np.where(self.in_play[None], theta[:, None, :], -np.inf)   # (K, stages, n)
        top = z.max(axis=2, keepdims=True)
        lse = (top + np.log(np.exp(z - top).sum(axis=2, keepdims=True)))[..., 0]
        prob = np.exp(z - lse[..., None])                               # choice probabilities
        stage_ll = theta[:, self.winner] - lse                          # (K, stages)
        ballot_ll = stage_ll @ self.to_ballot.T                         # (K, ballots)
        joint = log_eta[:, None] + ballot_ll
        mx = joint.max(axis=0)
        log_mix = mx + np.log(np.exp(joint - mx).sum(axis=0))           # (ballots,)
        value = float(np.dot(self.counts, log_mix))
        post = np.exp(joint - log_mix) * self.counts                    # (K, ballots)
        stage_w = post @ self.to_ballot                                 # (K, stages)
        g_theta = np.einsum("ks,ksn->kn", stage_w, self.onehot[None] - prob)
        g_a = post.sum(axis=1) - self.counts.sum() * np.exp(log_eta)
        return value, np.concatenate([g_theta.ravel(), g_a])


def independent_max(n_alt, orders, K, n_starts, seed):
    """Best log-likelihood (and its parameters) of L-BFGS-B from n_starts random starts."""
    from scipy.optimize import minimize

    lik = MixtureLikelihood(n_alt, orders, K)
    rng = np.random.default_rng(seed)

    def neg(x):
        v, g = lik.value_and_grad(x)
        return -v, -g

    best = None
    for _ in range(n_starts):
        x0 = np.concatenate([rng.normal(scale=2.0, size=K * n_alt), rng.normal(size=K)])
        res = minimize(neg, x0, jac=True, method="L-BFGS-B",
                       options=dict(maxiter=5000, ftol=1e-15, gtol=1e-10))
        if best is None or res.fun < best.fun:
            best = res
    theta, log_eta = lik.split(best.x)
    return -best.fun, theta, np.exp(log_eta)


def choix_max(n_alt, orders):
    """K = 1 with choix: (log-likelihood, centered log-worths), ILSR on the expanded
    choice stages (top-1 data: a winner and the alternatives it was chosen over)."""
    import choix

    data = [stage for count, order in orders for stage in choice_stages(n_alt, order) * count]
    params = choix.ilsr_top1(n_alt, data, alpha=0.0, tol=1e-13, max_iter=10_000)
    return float(choix.log_likelihood_top1(data, params)), params - params.mean()


def saturated_bound(n_alt, orders, n_iter=20_000):
    """An upper bound on the log-likelihood of ANY distribution p over the n! rankings (so of
    every Plackett-Luce mixture): f(p) = sum_b n_b log P_p(ballot b), P_p(b) = the mass of
    the rankings that begin with b's listed alternatives. f is concave on the simplex, so
    for any p, f(q) <= f(p) + grad f(p).(q - p) <= f(p) + max_j grad_j f(p) - sum_b n_b
    (as grad f(p).p = sum_b n_b): a certified bound whatever the accuracy of p, which is
    improved by the self-consistency (EM) iteration p_j <- p_j grad_j f(p) / N.

    For full rankings of distinct ballots this is the multinomial sum_b n_b log(n_b / N)."""
    import itertools

    rankings = list(itertools.permutations(range(n_alt)))
    counts = np.array([c for c, _ in orders], dtype=np.float64)
    depth = [min(len(o), n_alt - 1) for _, o in orders]           # stages observed
    consistent = np.array([[list(r[:d]) == o[:d] for r in rankings]
                           for d, (_, o) in zip(depth, orders)], dtype=np.float64)  # (b, n!)
    N = counts.sum()
    p = np.full(len(rankings), 1.0 / len(rankings))
    for _ in range(n_iter):
        grad = consistent.T @ (counts / (consistent @ p))
        p = p * grad / N
    value = float(np.dot(counts, np.log(consistent @ p)))
    grad = consistent.T @ (counts / (consistent @ p))
    return value + max(float(grad.max()) - N, 0.0)


# ----------------------------------------------------------------------------------------
# The EM fit


def fit_em(name, K):
    """(fitted model, traces of every restart, warnings, seconds)."""
    data = RankingData.from_preflib(os.path.join(DATA_DIR, DATASETS[name]))
    traces = {}

    def record(info):
        traces.setdefault(info["restart"], []).append(info["objective"])

    model = PlackettLuceMixture(K, **EM_PARAMS)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(data, callback=record)
    return model, traces, [w.category for w in caught], time.perf_counter() - t0


@pytest.fixture(scope="module")
def expected():
    """Independent values per (dataset, K), computed once for the module."""
    out = {}
    for name, file in DATASETS.items():
        n_alt, orders = read_orders(os.path.join(DATA_DIR, file))
        bound = saturated_bound(n_alt, orders)
        for K in N_COMPONENTS:
            # One seed per case, fixed: reproducible, not shared between cases.
            value, theta, weights = independent_max(n_alt, orders, K, N_STARTS,
                                                    seed=100 * K + len(name))
            out[name, K] = dict(value=value, theta=theta, weights=weights, bound=bound,
                                n_alt=n_alt, orders=orders)
    return out


def test_the_reader_here_agrees_with_from_preflib():
    # The two readers must describe the same records, or the comparison below would be moot:
    # a partial ballot's unlisted candidates are its unranked rest in both.
    for file in DATASETS.values():
        path = os.path.join(DATA_DIR, file)
        n_alt, orders = read_orders(path)
        data = RankingData.from_preflib(path)
        assert data.n_items == n_alt and data.n_records == len(orders)
        np.testing.assert_array_equal(data.sample_weight, [c for c, _ in orders])
        for i, (_, order) in enumerate(orders):
            ranked, rest = data.record(i)
            stages = choice_stages(n_alt, order)
            assert ranked == [w for w, _ in stages]
            assert sorted(ranked + rest) == list(range(n_alt))


@pytest.mark.parametrize("K", N_COMPONENTS)
@pytest.mark.parametrize("name", list(DATASETS))
def test_em_reaches_the_maximum_likelihood(name, K, expected):
    case = expected[name, K]
    model, traces, caught, seconds = fit_em(name, K)
    print(f"\n{name} K={K}: EM loglik {model.loglik_:.10f} ({model.n_iter_} iterations, "
          f"{seconds:.2f} s), independent {case['value']:.10f}, difference "
          f"{model.loglik_ - case['value']:+.2e}, saturated bound {case['bound']:.10f}; "
          f"weights {np.round(model.weights_, 4).tolist()}")

    assert ConvergenceWarning not in caught and model.converged_
    # Mixtures of k PL models over m <= 2k - 1 items are not identifiable: fit says so.
    assert (IdentifiabilityWarning in caught) == (case["n_alt"] <= 2 * K - 1)

    # EM reaches the independent maximum, and finds nothing above it either.
    assert model.loglik_ >= case["value"] - VALUE_TOL
    assert model.loglik_ <= case["value"] + VALUE_TOL
    # No model beats the saturated one (the bound is certified; 1e-9 is rounding of sums of
    # ~400 terms of size ~1).
    assert model.loglik_ <= case["bound"] + 1e-9
    assert case["value"] <= case["bound"] + 1e-9
    # The restarts agree on the maximum (none is stuck far below it).
    assert all(r["loglik"] >= case["value"] - 1e-6 for r in model.restarts_), model.restarts_

    # The objective never decreases, in every restart, at every iteration.
    assert len(traces) == EM_PARAMS["n_init"]
    for restart, trace in traces.items():
        trace = np.asarray(trace)
        steps = np.diff(trace)
        bad = np.flatnonzero(steps < -MONOTONE_RTOL * np.abs(trace[1:]))
        assert bad.size == 0, f"restart {restart}: decrease {steps[bad[0]]} at step {bad[0]}"
    steps = np.diff(model.lower_bounds_)
    assert np.all(steps >= -MONOTONE_RTOL * np.abs(model.lower_bounds_[1:]))


@pytest.mark.parametrize("name", list(DATASETS))
def test_one_type_is_the_unique_plackett_luce_mle(name, expected):
    # K = 1: the log-likelihood is concave in the log-worths with a unique, finite maximum
    # (the graph of "ranked above" is strongly connected in both datasets, Hunter 2004's
    # condition), so values AND worths agree.
    pytest.importorskip("choix")
    case = expected[name, 1]
    value_choix, worths_choix = choix_max(case["n_alt"], case["orders"])
    model, _, _, _ = fit_em(name, 1)
    worths_scipy = case["theta"][0] - case["theta"][0].mean()
    print(f"\n{name} K=1: EM {model.loglik_:.10f}, choix {value_choix:.10f}, "
          f"scipy {case['value']:.10f}")
    # Three methods, three stopping rules (EM: gain < 4e-12; ILSR: parameter change < 1e-13;
    # L-BFGS: relative reduction < 1e-15); at a non-degenerate maximum all are within ~1e-10.
    np.testing.assert_allclose([value_choix, case["value"]], model.loglik_, rtol=0,
                               atol=VALUE_TOL)
    # Worths: the curvature at the maximum is O(N) = O(400), so a value gap of 1e-10 allows
    # parameter errors of ~sqrt(2e-10 / 400) ~ 1e-6.
    np.testing.assert_allclose(model.log_worths_[0], worths_choix, atol=1e-5)
    np.testing.assert_allclose(model.log_worths_[0], worths_scipy, atol=1e-5)


def test_saturated_bound_of_full_rankings_is_the_multinomial():
    # For distinct full rankings the bound is the multinomial maximum sum n log(n / N):
    # checks the bound itself on the movie rankings (all ballots are full rankings).
    n_alt, orders = read_orders(os.path.join(DATA_DIR, DATASETS["netflix"]))
    n = np.array([c for c, _ in orders], dtype=np.float64)
    multinomial = float(np.dot(n, np.log(n / n.sum())))
    assert multinomial <= saturated_bound(n_alt, orders) <= multinomial + 1e-9
