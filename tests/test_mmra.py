"""MinMax Regret Aggregation: regret matrices, the LP, the hedge baseline, exact tabular MMRA,
and the mixture policy. Every test seeds its own generator."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import CUDA_ONLY

import emdpo_core as ec
from emdpo_core.ops import _reference as ref_impl

mmra_mod = sys.modules["emdpo_core.mmra"]  # `ec.mmra` is the function of the same name


# ----------------------------------------------------------------------------------------
# Helpers


def random_sources(rng, K, min_n=1, max_n=40):
    counts = rng.integers(min_n, max_n + 1, size=K)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def random_samples(rng, K, S, dtype=np.float64):
    lp = rng.normal(-40.0, 3.0, size=(K, S)).astype(dtype)
    ref = rng.normal(-40.0, 3.0, size=S).astype(dtype)
    return lp, ref


def random_tabular(rng, K, C, A, concentration=1.0):
    """K policies over A responses in C contexts, strictly positive."""
    return rng.dirichlet(np.full(A, concentration), size=(K, C))


def tabular_samples(P, ref_probs, rho):
    """Every (context, response) pair as a sample of every policy, weighted by its exact
    probability rho_c pi_j(a|c): weighted sample means are then exact expectations."""
    K, C, A = P.shape
    lp = np.tile(np.log(P).reshape(K, C * A), (1, K))  # (K, K*C*A): source j's block j
    ref = np.tile(np.log(ref_probs).reshape(C * A), K)
    weights = np.concatenate([(rho[:, None] * P[j]).reshape(-1) for j in range(K)])
    offsets = np.arange(K + 1, dtype=np.int64) * (C * A)
    return lp, ref, offsets, weights


def kl(p, q):
    return float(np.sum(p * np.log(p / q)))


# ----------------------------------------------------------------------------------------
# Regret matrices


@pytest.mark.parametrize("kind", ["reward", "kl"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_regret_matrix_matches_reference(kind, dtype, weighted, K):
    rng = np.random.default_rng(1000 * K + 10 * weighted + (kind == "kl"))
    so = random_sources(rng, K)
    S = int(so[-1])
    lp, ref = random_samples(rng, K, S, dtype)
    w = rng.uniform(0.1, 2.0, size=S) if weighted else None
    R = ec.regret_matrix(lp, ref, so, beta=0.7, kind=kind, sample_weights=w)
    # The oracle sees exactly the values the kernel sees (float32 weights stay float32).
    w_seen = None if w is None else w.astype(dtype).astype(np.float64)
    expected = ref_impl.regret_matrix(lp.astype(np.float64), ref.astype(np.float64), so,
                                      beta=0.7, kind=kind, sample_weights=w_seen)
    assert R.dtype == np.float64 and R.shape == (K, K)
    # Both sum float64 terms (float32 inputs are widened exactly before subtracting) in
    # different orders: rounding ~ n * eps64 * max|term| ~ 40 * 2.2e-16 * 50 ~ 4e-13.
    np.testing.assert_allclose(R, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.diag(R), 0.0)


def test_regret_matrix_many_chunks_matches_reference():
    # Sources longer than the kernel's 4096-sample chunk exercise the chunked reduction.
    rng = np.random.default_rng(7)
    so = np.array([0, 9000, 9001, 21000], dtype=np.int64)
    lp, ref = random_samples(rng, 3, int(so[-1]))
    w = rng.uniform(0.0, 1.0, size=int(so[-1]))
    for kind in ("reward", "kl"):
        R = ec.regret_matrix(lp, ref, so, beta=2.0, kind=kind, sample_weights=w)
        expected = ref_impl.regret_matrix(lp, ref, so, beta=2.0, kind=kind, sample_weights=w)
        # 12000 terms of magnitude ~10: float64 rounding ~ 12000 * 2.2e-16 * 10 ~ 3e-11.
        np.testing.assert_allclose(R, expected, rtol=1e-9, atol=1e-9)


def test_regret_matrix_equals_definitions_for_tabular_policies():
    # With every response as a sample weighted by its probability, the sample means are exact
    # expectations, so R must equal the definitions computed directly from the probabilities.
    rng = np.random.default_rng(11)
    K, C, A, beta = 4, 3, 5, 1.7
    P = random_tabular(rng, K, C, A)
    ref_probs = random_tabular(rng, 1, C, A)[0]
    rho = rng.dirichlet(np.ones(C))
    lp, refl, so, w = tabular_samples(P, ref_probs, rho)
    R_kl = ec.regret_matrix(lp, refl, so, beta=beta, kind="kl", sample_weights=w)
    R_rw = ec.regret_matrix(lp, refl, so, beta=beta, kind="reward", sample_weights=w)
    for k in range(K):
        for j in range(K):
            kl_jk = sum(rho[c] * kl(P[j, c], P[k, c]) for c in range(C))
            assert R_kl[k, j] == pytest.approx(beta * kl_jk, rel=1e-12, abs=1e-13)
            # Type k's expected implicit reward log(pi_k / pi_ref) under policy j.
            A_kj = sum(rho[c] * np.dot(P[j, c], np.log(P[k, c] / ref_probs[c])) for c in range(C))
            A_kk = sum(rho[c] * np.dot(P[k, c], np.log(P[k, c] / ref_probs[c])) for c in range(C))
            assert R_rw[k, j] == pytest.approx(beta * (A_kk - A_kj), rel=1e-12, abs=1e-13)
    assert np.all(R_kl >= 0)  # KL divergences
    # The two regrets differ by the policies' own KL to the reference:
    # R_kl[k, j] - R_rw[k, j] = beta (KL(pi_j || pi_ref) - KL(pi_k || pi_ref)).
    ent = np.array([sum(rho[c] * kl(P[j, c], ref_probs[c]) for c in range(C)) for j in range(K)])
    np.testing.assert_allclose(R_kl - R_rw, beta * (ent[None, :] - ent[:, None]), atol=1e-12)


def test_regret_matrix_kl_does_not_need_ref():
    rng = np.random.default_rng(12)
    so = random_sources(rng, 3)
    lp, ref = random_samples(rng, 3, int(so[-1]))
    with_ref = ec.regret_matrix(lp, ref, so, beta=1.0, kind="kl")
    without = ec.regret_matrix(lp, None, so, beta=1.0, kind="kl")
    np.testing.assert_array_equal(with_ref, without)


def test_regret_matrix_K1_is_zero():
    rng = np.random.default_rng(13)
    lp, ref = random_samples(rng, 1, 5)
    for kind in ("reward", "kl"):
        R = ec.regret_matrix(lp, ref, [0, 5], beta=3.0, kind=kind)
        np.testing.assert_array_equal(R, np.zeros((1, 1)))


def test_regret_matrix_extreme_log_probabilities():
    # Log-probabilities of -1e4 and beta = 10: terms are differences, no overflow.
    rng = np.random.default_rng(14)
    so = np.array([0, 50, 100], dtype=np.int64)
    lp = rng.uniform(-1e4, -9e3, size=(2, 100))
    ref = rng.uniform(-1e4, -9e3, size=100)
    for kind in ("reward", "kl"):
        R = ec.regret_matrix(lp, ref, so, beta=10.0, kind=kind)
        expected = ref_impl.regret_matrix(lp, ref, so, beta=10.0, kind=kind)
        # Terms ~1e3 times beta 10, 50 per mean: rounding ~ 50 * 2.2e-16 * 1e4 ~ 1e-10.
        np.testing.assert_allclose(R, expected, rtol=1e-10, atol=1e-8)


def _bad_regret_inputs():
    rng = np.random.default_rng(15)
    lp, ref = random_samples(rng, 3, 12)
    so = np.array([0, 4, 8, 12])
    return lp, ref, so


@pytest.mark.parametrize("case, match", [
    ("nan_lp", r"sample_logps: non-finite value nan at \[type 2, sample 5\] \(a sample of policy 1\)"),
    ("neginf_lp", r"sample_logps: non-finite value -inf at \[type 0, sample 9\].*policy 2"),
    ("nan_ref", r"sample_ref_logps: non-finite value nan at sample 3"),
    ("empty_source", r"source_offsets: every policy needs at least one sample.*policy 1"),
    ("short_offsets", r"source_offsets: expected K\+1 = 4 entries"),
    ("last_offset", r"source_offsets: expected source_offsets\[-1\] == S == 12"),
    ("beyond", r"source_offsets: entry 2 is 13, beyond the number of samples S=12"),
    ("first_offset", r"source_offsets: expected source_offsets\[0\] == 0"),
    ("neg_weight", r"sample_weights: expected finite values >= 0, got -1.0 at index 6"),
    ("zero_source_weight", r"sample_weights: the samples of policy 2 .* all have weight 0"),
    ("weight_shape", r"sample_weights: expected shape \(12,\)"),
    ("kind", r"kind: expected one of \('reward', 'kl'\), got 'regret'"),
    ("no_ref", r"sample_ref_logps: required for kind='reward'"),
    ("ref_shape", r"sample_ref_logps: expected shape \(12,\)"),
    ("beta", r"beta: expected a finite number > 0"),
    ("lp_1d", r"sample_logps: expected a 2-D array"),
])
def test_regret_matrix_errors(case, match):
    lp, ref, so = _bad_regret_inputs()
    kw = dict(beta=1.0, kind="reward", sample_weights=None)
    args = [lp, ref, so]
    if case == "nan_lp":
        lp[2, 5] = np.nan
    elif case == "neginf_lp":
        lp[0, 9] = -np.inf
        kw["kind"] = "kl"
    elif case == "nan_ref":
        ref[3] = np.nan
    elif case == "empty_source":
        args[2] = [0, 4, 4, 12]
    elif case == "short_offsets":
        args[2] = [0, 4, 12]
    elif case == "last_offset":
        args[2] = [0, 4, 8, 11]
    elif case == "beyond":
        args[2] = [0, 4, 13, 12]
    elif case == "first_offset":
        args[2] = [1, 4, 8, 12]
    elif case == "neg_weight":
        w = np.ones(12)
        w[6] = -1.0
        kw["sample_weights"] = w
    elif case == "zero_source_weight":
        w = np.ones(12)
        w[8:] = 0.0
        kw["sample_weights"] = w
    elif case == "weight_shape":
        kw["sample_weights"] = np.ones(11)
    elif case == "kind":
        kw["kind"] = "regret"
    elif case == "no_ref":
        args[1] = None
    elif case == "ref_shape":
        args[1] = ref[:-1]
    elif case == "beta":
        kw["beta"] = -1.0
    elif case == "lp_1d":
        args[0] = lp[0]
    with pytest.raises(ValueError, match=match):
        ec.regret_matrix(*args, **kw)


def test_regret_matrix_type_errors():
    lp, ref, so = _bad_regret_inputs()
    with pytest.raises(TypeError, match="sample_ref_logps: dtype float32 does not match"):
        ec.regret_matrix(lp, ref.astype(np.float32), so, beta=1.0)
    with pytest.raises(TypeError, match="source_offsets: expected an integer array"):
        ec.regret_matrix(lp, ref, np.array([0, 4.5, 8, 12]), beta=1.0)
    with pytest.raises(TypeError, match="sample_logps: expected a float32 or float64 array"):
        ec.regret_matrix(lp.astype(np.int64), ref, so, beta=1.0)


def test_regret_matrix_overflow_is_reported():
    lp = np.array([[1e308, 1e308, 0.0, 0.0], [-1e308, -1e308, 0.0, 0.0]])
    with pytest.raises(ValueError, match="overflow float64"):
        ec.regret_matrix(lp, None, [0, 2, 4], beta=1.0, kind="kl")


_DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib, numpy as np, emdpo_core as ec
    rng = np.random.default_rng(5)
    # K * S = 480,004 terms: above the kernel's 2**18 threshold for using the thread team.
    so = np.array([0, 13000, 13001, 70000, 120001], dtype=np.int64)
    S = int(so[-1])
    lp = rng.normal(-40, 3, size=(4, S)); ref = rng.normal(-40, 3, size=S)
    w = rng.uniform(0, 1, size=S)
    h = hashlib.sha256()
    for kind in ("reward", "kl"):
        for weights in (None, w):
            h.update(ec.regret_matrix(lp, ref, so, beta=0.9, kind=kind,
                                      sample_weights=weights).tobytes())
            h.update(ec.regret_matrix(lp.astype(np.float32), ref.astype(np.float32), so,
                                      beta=0.9, kind=kind, sample_weights=weights).tobytes())
    print(ec.build_info()["num_threads"], h.hexdigest())
""")


def test_regret_matrix_bitwise_identical_across_thread_counts(tmp_path):
    digests = {}
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT], env=env, check=True,
                             capture_output=True, text=True, cwd=tmp_path)
        n, digest = out.stdout.split()
        assert int(n) == threads
        digests[threads] = digest
    assert digests[1] == digests[2]


def test_regret_matrix_torch_cpu_tensors():
    torch = pytest.importorskip("torch", reason="torch not installed")
    rng = np.random.default_rng(16)
    so = random_sources(rng, 3)
    lp, ref = random_samples(rng, 3, int(so[-1]))
    w = rng.uniform(0.5, 1.0, size=int(so[-1]))
    R = ec.regret_matrix(torch.from_numpy(lp), torch.from_numpy(ref), torch.from_numpy(so),
                         beta=1.0, kind="reward", sample_weights=torch.from_numpy(w))
    assert isinstance(R, torch.Tensor) and R.dtype == torch.float64
    np.testing.assert_array_equal(
        R.numpy(), ec.regret_matrix(lp, ref, so, beta=1.0, kind="reward", sample_weights=w))


def test_regret_matrix_torch_tensors_off_cpu_go_through_the_device_check():
    # The non-CPU path checks the device and the build first (it once called the check
    # without the device: a TypeError instead of this message).
    torch = pytest.importorskip("torch", reason="torch not installed")
    lp = torch.zeros((2, 4), dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="tensors on meta are not supported"):
        ec.regret_matrix(lp, torch.zeros(4, dtype=torch.float64, device="meta"), [0, 2, 4],
                         beta=1.0)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_regret_matrix_cuda_matches_cpu(device, dtype):
    import torch

    rng = np.random.default_rng(17)
    so = np.array([0, 3, 20000, 20001, 45000], dtype=np.int64)
    lp, ref = random_samples(rng, 4, int(so[-1]), dtype)
    w = rng.uniform(0.0, 1.0, size=int(so[-1])).astype(dtype)
    dev = torch.device(device)
    for kind in ("reward", "kl"):
        for weights in (None, w):
            cpu = ec.regret_matrix(lp, ref, so, beta=1.3, kind=kind, sample_weights=weights)
            args = [torch.from_numpy(lp).to(dev), torch.from_numpy(ref).to(dev),
                    torch.from_numpy(so).to(dev)]
            wt = None if weights is None else torch.from_numpy(weights).to(dev)
            gpu = ec.regret_matrix(*args, beta=1.3, kind=kind, sample_weights=wt)
            again = ec.regret_matrix(*args, beta=1.3, kind=kind, sample_weights=wt)
            assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
            # Same float64 terms summed in another order: ~ n eps64 max|term|.
            np.testing.assert_allclose(gpu.cpu().numpy(), cpu, rtol=1e-9, atol=1e-9)
            assert torch.equal(gpu, again)  # no float atomics: bitwise reproducible
    bad = torch.from_numpy(lp).to(dev)
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite value nan at \[type 1, sample 7\]"):
        ec.regret_matrix(bad, torch.from_numpy(ref).to(dev), torch.from_numpy(so).to(dev),
                         beta=1.0)


def test_import_does_not_import_cvxpy(tmp_path):
    code = "import sys, emdpo_core; print('cvxpy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------
# MixturePolicy (no cvxpy needed)


def test_mixture_policy_samples_by_weight_and_is_seeded():
    calls = []

    def make(j):
        def policy(prompt, *, temperature=1.0):
            calls.append(j)
            return f"{j}:{prompt}:{temperature}"
        return policy

    w = np.array([0.2, 0.0, 0.5, 0.3])
    mix = ec.MixturePolicy(w, [make(j) for j in range(4)], random_state=123)
    out = mix("x", temperature=0.5)
    assert out == f"{mix.last_component}:x:0.5" and calls == [mix.last_component]
    draws = mix.sample_components(40_000)
    freq = np.bincount(draws, minlength=4) / draws.size
    assert freq[1] == 0.0  # weight 0 is never drawn
    # Binomial standard error sqrt(w(1-w)/n) <= 0.0025; 5 sigma keeps this from flaking.
    np.testing.assert_allclose(freq, w, atol=5 * 0.0025)
    a = ec.MixturePolicy(w, [make(j) for j in range(4)], random_state=9).sample_components(50)
    b = ec.MixturePolicy(w, [make(j) for j in range(4)], random_state=9).sample_components(50)
    np.testing.assert_array_equal(a, b)
    single = ec.MixturePolicy([1.0], [lambda: "only"], random_state=0)
    assert single() == "only" and single.last_component == 0


def test_mixture_policy_errors():
    f = lambda: None  # noqa: E731
    with pytest.raises(ValueError, match="weights: expected probabilities summing to 1"):
        ec.MixturePolicy([0.5, 0.6], [f, f])
    with pytest.raises(ValueError, match=r"weights: expected shape \(3,\)"):
        ec.MixturePolicy([0.5, 0.5], [f, f, f])
    with pytest.raises(ValueError, match="weights: expected finite values >= 0, got -0.5 at index 1"):
        ec.MixturePolicy([1.5, -0.5], [f, f])
    with pytest.raises(TypeError, match="policies: entry 1 is a str, not callable"):
        ec.MixturePolicy([0.5, 0.5], [f, "policy"])
    with pytest.raises(ValueError, match="policies: expected at least one callable"):
        ec.MixturePolicy([], [])


# ----------------------------------------------------------------------------------------
# The LP (cvxpy) and the hedge baseline


def linprog_value(M):
    """min_w max_k (M w)_k over the simplex with SciPy's HiGHS: the independent oracle."""
    from scipy.optimize import linprog

    K = M.shape[0]
    res = linprog(np.r_[np.zeros(K), 1.0], A_ub=np.c_[M, -np.ones(K)], b_ub=np.zeros(K),
                  A_eq=np.r_[np.ones(K), 0.0][None], b_eq=[1.0],
                  bounds=[(0, None)] * K + [(None, None)], method="highs")
    assert res.status == 0, res.message
    return res.fun


def random_regret(rng, K, family):
    if family == "uniform":
        return rng.uniform(0.0, 1.0, size=(K, K))
    if family == "kl":  # non-negative with a zero diagonal, like KL regrets
        R = rng.exponential(1.0, size=(K, K))
        np.fill_diagonal(R, 0.0)
        return R
    # "reward": signed, zero diagonal, large scale (regrets in nats times beta)
    R = rng.normal(0.0, 50.0, size=(K, K))
    np.fill_diagonal(R, 0.0)
    return R


@pytest.mark.parametrize("K", [1, 2, 3, 7, 16, 64])
@pytest.mark.parametrize("family", ["uniform", "kl", "reward"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mmra_lp_matches_highs(K, family, weighted):
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    pytest.importorskip("scipy", reason="scipy not installed")
    rng = np.random.default_rng(100 * K + 7 * weighted + len(family))
    for _ in range(3):
        R = random_regret(rng, K, family)
        c = rng.uniform(0.2, 5.0, size=K) if weighted else None
        res = ec.mmra(R, group_weights=c)
        cc = np.ones(K) if c is None else c
        opt = linprog_value(cc[:, None] * R)
        # Acceptance: 1e-6 relative. The floor 1e-12 * max|cR| covers optima near 0 (the LP is
        # solved on cR / max|cR|, whose rounding is ~1e-16 of that scale).
        assert abs(res.max_regret - opt) <= 1e-6 * abs(opt) + 1e-12 * np.max(np.abs(cc[:, None] * R))
        assert res.status == "optimal"
        w = res.weights
        assert w.shape == (K,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(res.regrets, R @ w, rtol=0, atol=0)  # same product
        assert res.max_regret == np.max(cc * (R @ w))


def test_mmra_dpp_resolve_equals_fresh_build():
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    rng = np.random.default_rng(21)
    K = 12
    lp = mmra_mod._cached_lp(K)
    assert mmra_mod._cached_lp(K) is lp  # built once per K
    assert lp.problem.is_dpp()
    for family in ("uniform", "kl", "reward"):
        R = random_regret(rng, K, family)
        c = rng.uniform(0.5, 2.0, size=K)
        cached = ec.mmra(R, group_weights=c)
        fresh_w, status = mmra_mod._solve_lp(mmra_mod._build_lp(K), c[:, None] * R, "HIGHS")
        assert status == "optimal"
        fresh_max = np.max(c * (R @ fresh_w))
        assert cached.max_regret == pytest.approx(fresh_max, rel=1e-12, abs=1e-12)
        # HiGHS returns a vertex; the same problem data gives the same vertex.
        np.testing.assert_allclose(cached.weights, fresh_w, atol=1e-12)


@pytest.mark.parametrize("K, family", [(1, "kl"), (2, "uniform"), (5, "kl"), (16, "reward"),
                                       (64, "uniform")])
def test_hedge_within_theoretical_gap_of_lp(K, family):
    pytest.importorskip("scipy", reason="scipy not installed")
    rng = np.random.default_rng(31 + K)
    R = random_regret(rng, K, family)
    T = ec.mmra.__kwdefaults__["hedge_iterations"]
    assert T == 100_000  # the authors' iteration count
    res = ec.mmra(R, solver="hedge")
    opt = linprog_value(R)
    L = np.max(np.abs(R))
    # Optimistic Hedge with step 1/(2L) has the RVU property (Syrgkanis et al. 2015) with
    # alpha = ln K / step, so the two players' regrets sum to <= 4 L ln K, and the averaged
    # strategies are a (4 L ln K / T)-equilibrium. Measured gaps are 3-6x below it (about
    # 3e-5 L against a bound of 1.7e-4 L for K = 64), so the bound is a real test.
    bound = 4 * L * math.log(K) / T
    assert res.status.startswith("approximate (hedge, 100000 iterations")
    assert res.max_regret - opt <= bound + 1e-12 * max(L, 1.0)
    assert res.max_regret >= opt - 1e-9 * max(L, 1.0)  # nothing beats the optimum
    # The reported certificate is a valid upper bound on the gap to the optimum.
    w, p = mmra_mod._hedge(R, T)
    certificate = np.max(R @ w) - np.min(p @ R)
    assert certificate >= res.max_regret - opt - 1e-12 * max(L, 1.0)
    assert certificate <= bound + 1e-12 * max(L, 1.0)
    np.testing.assert_allclose(res.regrets, R @ res.weights, rtol=0, atol=0)


def test_mmra_degenerate_inputs():
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    # K = 1: the only policy.
    for solver in (None, "hedge"):
        r = ec.mmra([[2.5]], solver=solver)
        np.testing.assert_array_equal(r.weights, [1.0])
        assert r.max_regret == 2.5 and r.regrets.tolist() == [2.5]
    # All-zero regret: every mixture is optimal with regret 0.
    r = ec.mmra(np.zeros((4, 4)))
    assert r.max_regret == 0.0 and np.all(r.regrets == 0.0)
    assert r.weights.sum() == pytest.approx(1.0) and np.all(r.weights >= 0)
    # A strictly dominated policy (worse for every type than policy 0) gets no weight: moving
    # its mass to policy 0 lowers every type's regret.
    rng = np.random.default_rng(41)
    R = rng.uniform(0.0, 1.0, size=(5, 5))
    R[:, 3] = R[:, 0] + 0.3
    assert ec.mmra(R).weights[3] <= 1e-12  # HiGHS: an exact vertex
    # Hedge: policy 3's loss exceeds policy 0's by 0.3 every round, so w_3 / w_0 <=
    # exp(-0.3 step t) and its time average is at most 1 / (0.3 step T), step = 1 / (2 max R).
    T = 100_000
    step = 0.5 / np.max(np.abs(R))
    assert ec.mmra(R, solver="hedge", hedge_iterations=T).weights[3] <= 1.0 / (0.3 * step * T)


@pytest.mark.parametrize("bad, match", [
    (np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [1.0, np.nan, 0.0]]),
     r"regret: non-finite value nan at \[type 2, policy 1\]"),
    (np.array([[0.0, np.inf], [1.0, 0.0]]), r"regret: non-finite value inf at \[type 0, policy 1\]"),
    (np.ones((2, 3)), r"regret: expected a square \(K, K\) array"),
    (np.ones(3), r"regret: expected a square \(K, K\) array"),
    (np.ones((0, 0)), r"regret: expected a square \(K, K\) array with K >= 1"),
])
def test_mmra_bad_regret(bad, match):
    with pytest.raises(ValueError, match=match):
        ec.mmra(bad)
    with pytest.raises(ValueError, match=match):
        ec.mmra(bad, solver="hedge")


def test_mmra_bad_arguments():
    R = np.eye(3)
    with pytest.raises(ValueError, match=r"group_weights: expected finite values > 0, got 0.0 at index 1"):
        ec.mmra(R, group_weights=[1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match=r"group_weights: expected finite values > 0, got nan at index 2"):
        ec.mmra(R, group_weights=[1.0, 1.0, np.nan])
    with pytest.raises(ValueError, match=r"group_weights: expected shape \(3,\)"):
        ec.mmra(R, group_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="hedge_iterations: expected an int >= 1, got 0"):
        ec.mmra(R, solver="hedge", hedge_iterations=0)
    with pytest.raises(TypeError, match="regret: expected a real"):
        ec.mmra(np.array([["a"]]))
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    with pytest.raises(ValueError, match="solver: 'NOT_A_SOLVER' is not an installed cvxpy solver"):
        ec.mmra(R, solver="NOT_A_SOLVER")


def test_mmra_solver_failure_raises_with_message(monkeypatch):
    cp = pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")

    def failing_solve(self, *args, **kwargs):
        raise cp.error.SolverError("numerical trouble in the test")

    monkeypatch.setattr(cp.Problem, "solve", failing_solve)
    with pytest.raises(RuntimeError, match="mmra: the solver HIGHS failed: numerical trouble"):
        ec.mmra(np.eye(3), solver="HIGHS")


def test_mmra_solver_output_is_silent(tmp_path):
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    # A fresh process: HiGHS prints its banner the first time it is used in a process.
    code = ("import numpy as np, emdpo_core as ec; "
            "r = ec.mmra(np.array([[0.0, 2.0], [1.0, 0.0]])); "
            "e = ec.mmra_exact(np.array([[0.9, 0.1], [0.2, 0.8]]), beta=1.0)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.stdout == "" and out.stderr == ""


def test_mmra_other_cvxpy_solver_agrees():
    cp = pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    if "CLARABEL" not in cp.installed_solvers():
        pytest.skip("CLARABEL not installed")
    rng = np.random.default_rng(51)
    R = random_regret(rng, 8, "kl")
    a = ec.mmra(R)
    b = ec.mmra(R, solver="clarabel")
    # Clarabel is an interior-point method with gap tolerances 1e-8 on the scaled problem.
    assert b.max_regret == pytest.approx(a.max_regret, rel=1e-6)


# ----------------------------------------------------------------------------------------
# Exact tabular MMRA


def simplex_grid(n):
    """All (i, j, n-i-j)/n: the simplex of 3 weights at resolution 1/n."""
    pts = [(i, j, n - i - j) for i in range(n + 1) for j in range(n + 1 - i)]
    return np.array(pts, dtype=np.float64) / n


def grid_regrets(P, rho, beta, grid):
    """(G, K) exact mixture regrets, vectorized over grid points."""
    q = np.einsum("gj,jca->gca", grid, P)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q[:, None] > 0, q[:, None] * (np.log(q[:, None]) - np.log(P[None])), 0.0)
    return beta * np.einsum("c,gkca->gk", rho, terms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmra_exact_beats_fine_simplex_grid(seed):
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    rng = np.random.default_rng(60 + seed)
    K, C, A, beta = 3, 2, 4, 0.8
    P = random_tabular(rng, K, C, A, concentration=0.7)
    rho = rng.dirichlet(np.ones(C))
    res = ec.mmra_exact(P, beta=beta, context_weights=rho)
    assert res.status == "optimal"
    grid = simplex_grid(300)  # 45,451 points, spacing 1/300
    best = grid_regrets(P, rho, beta, grid).max(axis=1).min()
    # The returned weights' regret is recomputed exactly; it may exceed the true optimum by
    # the solver's tolerance (CLARABEL: gap and feasibility tolerances 1e-8), so allow 1e-7
    # relative. The optimum itself is <= every grid point.
    assert res.max_regret <= best + 1e-7 * max(1.0, best)
    # Regrets are the exact KL regrets of the returned mixture.
    np.testing.assert_allclose(res.regrets, grid_regrets(P, rho, beta, res.weights[None])[0],
                               rtol=1e-12, atol=1e-15)
    assert res.max_regret == np.max(res.regrets)
    # The LP over the exact KL matrix bounds the exact optimum from above (KL is convex in
    # its first argument, so KL(sum_j w_j pi_j || pi_k) <= sum_j w_j KL(pi_j || pi_k)).
    lp, refl, so, w = tabular_samples(P, np.full((C, A), 1.0 / A), rho)
    R_kl = ec.regret_matrix(lp, refl, so, beta=beta, kind="kl", sample_weights=w)
    lin = ec.mmra(R_kl)
    assert res.max_regret <= lin.max_regret + 1e-7 * max(1.0, lin.max_regret)


def test_mmra_exact_larger_instance_beats_random_mixtures():
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    rng = np.random.default_rng(70)
    K, C, A, beta = 8, 10, 30, 2.0
    P = random_tabular(rng, K, C, A, concentration=0.5)
    res = ec.mmra_exact(P, beta=beta)
    assert res.status == "optimal"
    # 3000 random mixtures, half of them sparse (few policies), plus every pure policy.
    cands = np.concatenate([rng.dirichlet(np.ones(K), size=1500),
                            rng.dirichlet(np.full(K, 0.1), size=1500), np.eye(K)])
    rho = np.full(C, 1.0 / C)
    best = grid_regrets(P, rho, beta, cands).max(axis=1).min()
    assert res.max_regret <= best + 1e-7 * max(1.0, best)  # CLARABEL tolerance, as above
    np.testing.assert_allclose(res.regrets,
                               mmra_mod.exact_mixture_regret(res.weights, P, beta=beta),
                               rtol=1e-12)


def test_mmra_exact_group_weights_and_support():
    pytest.importorskip("cvxpy", reason="cvxpy not installed (pip install cvxpy)")
    # Policy 2 gives mass to response 3, which type 0's policy never produces: any weight on
    # policy 2 makes type 0's regret infinite, so it must get weight 0.
    P = np.array([[[0.5, 0.3, 0.2, 0.0]],
                  [[0.1, 0.3, 0.6, 0.0]],
                  [[0.05, 0.05, 0.1, 0.8]]])
    res = ec.mmra_exact(P, beta=1.0)
    assert res.weights[2] == 0.0 and np.all(np.isfinite(res.regrets))
    c = np.array([1.0, 3.0, 1.0])
    weighted = ec.mmra_exact(P, beta=1.0, group_weights=c)
    assert weighted.max_regret == pytest.approx(np.max(c * weighted.regrets), rel=1e-12)
    grid = simplex_grid(200)
    grid = grid[grid[:, 2] == 0.0]
    best = (c * grid_regrets(P, np.ones(1), 1.0, grid)).max(axis=1).min()
    assert weighted.max_regret <= best + 1e-7 * max(1.0, best)  # CLARABEL tolerance, as above
    # K = 1: the only policy, zero regret.
    one = ec.mmra_exact(P[:1], beta=2.0)
    np.testing.assert_array_equal(one.weights, [1.0])
    assert one.max_regret == 0.0


def test_mmra_exact_errors():
    P = np.array([[[0.5, 0.5]], [[0.2, 0.8]]])
    with pytest.raises(ValueError, match=r"policy_probs: each policy's distribution .* \[policy 1, context 0\] sums to 0.8999"):
        ec.mmra_exact(np.array([[[0.5, 0.5]], [[0.2, 0.7]]]), beta=1.0)
    with pytest.raises(ValueError, match=r"policy_probs: expected finite probabilities >= 0, got nan at \[policy 0, context 0, response 1\]"):
        ec.mmra_exact(np.array([[[0.5, np.nan]], [[0.2, 0.8]]]), beta=1.0)
    with pytest.raises(ValueError, match=r"context_weights: expected shape \(1,\)"):
        ec.mmra_exact(P, beta=1.0, context_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="beta: expected a finite number > 0"):
        ec.mmra_exact(P, beta=0.0)
    with pytest.raises(ValueError, match="every mixture has infinite regret"):
        ec.mmra_exact(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]), beta=1.0)
