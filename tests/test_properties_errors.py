"""Generated malformed inputs to every public entry point raise ValueError or TypeError: never
another exception, never a crash or a hang.

Each test starts from a valid call and corrupts one argument with a value drawn from a list of
values that are wrong for that kind of argument (wrong type, dtype, shape, length, order,
range, non-finite, beyond int64), so every generated call is malformed and must be refused.
The junk-file tests (JSON Lines, PrefLib, model files) generate arbitrary text or bytes, which
may by chance be valid: there the property is "ValueError, TypeError or a valid result".

Deterministic (``derandomize=True``, no example database) and small: the whole file runs in
well under a minute on two cores.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emdpo_core as ec
from emdpo_core import PlackettLuceMixture, RankingData

SETTINGS = settings(max_examples=60, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
REFUSED = (ValueError, TypeError)

# ----------------------------------------------------------------------------------------
# Bad values by kind of argument

I64 = np.iinfo(np.int64)
NOT_ARRAYS = [None, "abc", b"xy", {"a": 1}, object(), 1 + 2j, [[1, 2], [3]]]
BAD_SCALARS = [None, "0.1", float("nan"), float("inf"), -float("inf"), 0.0, -1.0, True, 1j,
               [0.1], np.array([0.1, 0.2])]


def bad_index_arrays(M: int):
    """(N+1,) record offsets over M slots that are wrong in some way."""
    return st.sampled_from([
        *NOT_ARRAYS,
        np.array([], dtype=np.int64),                       # no records
        np.array([0], dtype=np.int64),
        np.array([[0, M]], dtype=np.int64),                 # 2-D
        np.array([1, M], dtype=np.int64),                   # does not start at 0
        np.array([0, M - 1], dtype=np.int64),               # does not end at M
        np.array([0, M + 1], dtype=np.int64),               # beyond M
        np.array([0, 1, M], dtype=np.int64),                # a list of one
        np.array([0, M, M], dtype=np.int64),                # an empty list
        np.array([0, 4, 2, M], dtype=np.int64),             # decreasing
        np.array([0, -2, M], dtype=np.int64),
        np.array([0, I64.max, M], dtype=np.int64),
        np.array([0, 2 ** 64 - 1, M], dtype=np.uint64),     # beyond int64
        np.array([0.0, 1e19, M]),
        np.array([0.0, 2.5, M]),                            # not integral
        np.array([0.0, np.nan, M]),
        np.array([0, M], dtype=object),
        np.array(["0", str(M)]),
        np.array([0, M], dtype=np.complex128),
        np.array([False, True]),
    ])


def bad_float_arrays(shape):
    n = shape[-1]
    return st.sampled_from([
        *NOT_ARRAYS,
        np.zeros(shape + (1,)),                             # one dimension too many
        np.zeros(n + 1),                                    # wrong length
        np.zeros(max(n - 1, 0)),
        np.full(shape, np.nan),
        np.full(shape, np.inf),
        np.zeros(shape, dtype=np.complex128),
        np.zeros(shape, dtype=object),
        np.full(shape, "x"),
        np.zeros(shape, dtype=np.int64),
        np.zeros(shape, dtype=bool),
        np.zeros((0,) + shape[1:]),
    ])


def _valid_kernel_call(rng, K=2):
    offsets = np.array([0, 3, 5, 9])
    return dict(policy=rng.normal(-40, 3, size=(K, 9)), ref=rng.normal(-40, 3, size=9),
                offsets=offsets, annotator_offsets=np.array([0, 2, 3]),
                log_weights=np.log(np.full(K, 1.0 / K)), n_ranked=np.array([2, 1, 3]),
                record_weights=np.ones(3), beta=0.5)


def _expect_refused(fn, *args, **kwargs):
    with pytest.raises(REFUSED):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------
# Kernels (NumPy)

ARGS = ["policy", "ref", "offsets", "n_ranked", "beta"]


@SETTINGS
@given(data=st.data(), which=st.sampled_from(ARGS + ["annotator_offsets", "log_weights",
                                                     "record_weights"]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_e_step_refuses_malformed_arguments(data, which, seed):
    c = _valid_kernel_call(np.random.default_rng(seed))
    c[which] = data.draw(_bad_for(which, c))
    _expect_refused(ec.e_step, c["policy"], c["ref"], c["offsets"], c["annotator_offsets"],
                    c["log_weights"], beta=c["beta"], n_ranked=c["n_ranked"],
                    record_weights=c["record_weights"])


@SETTINGS
@given(data=st.data(), which=st.sampled_from(ARGS), seed=st.integers(0, 2 ** 32 - 1))
def test_listwise_loglik_refuses_malformed_arguments(data, which, seed):
    c = _valid_kernel_call(np.random.default_rng(seed))
    c[which] = data.draw(_bad_for(which, c))
    _expect_refused(ec.listwise_loglik, c["policy"], c["ref"], c["offsets"], beta=c["beta"],
                    n_ranked=c["n_ranked"])


@SETTINGS
@given(data=st.data(), which=st.sampled_from(ARGS + ["weights", "reduction"]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_loss_and_grad_refuses_malformed_arguments(data, which, seed):
    c = _valid_kernel_call(np.random.default_rng(seed), K=1)
    c["policy"] = c["policy"][0]
    c["weights"] = np.ones(3)
    c["reduction"] = "mean"
    c[which] = data.draw(_bad_for(which, c))
    _expect_refused(ec.listwise_dpo_loss_and_grad, c["policy"], c["ref"], c["offsets"],
                    c["weights"], beta=c["beta"], n_ranked=c["n_ranked"],
                    reduction=c["reduction"])


def _bad_for(which, c):
    if which in ("policy", "ref"):
        return bad_float_arrays(np.shape(c[which]))
    if which == "offsets":
        return bad_index_arrays(9)
    if which == "annotator_offsets":
        return bad_index_arrays(3).filter(
            lambda a: not (isinstance(a, np.ndarray) and a.dtype.kind in "iu" and a.ndim == 1
                           and a.size >= 2 and a[0] == 0 and np.all(np.diff(a.astype(float))
                                                                    >= 0) and a[-1] == 3))
    if which == "n_ranked":
        return st.sampled_from([np.array([0, 1, 1]), np.array([3, 1, 1]), np.array([1, 1]),
                                np.array([1, 1, 1, 1]), np.array([1.5, 1, 1]),
                                np.array(["1", "1", "1"]), np.array([-1, 1, 1]),
                                np.array([2 ** 64 - 1, 1, 1], dtype=np.uint64), "1", 3.0])
    if which == "beta":
        return st.sampled_from(BAD_SCALARS)
    if which == "log_weights":
        K = np.shape(c["policy"])[0]
        return st.sampled_from([None, "ab", ["a", "b"], {"a": 1}, np.full(K, np.nan),
                                np.full(K, np.inf), np.full(K, -np.inf), np.zeros(K + 1),
                                np.zeros((K, 1, 1)), np.zeros(K, dtype=np.complex128),
                                np.zeros(K, dtype=object)])
    if which in ("record_weights", "weights"):
        # (negative loss weights are allowed: only record_weights must be >= 0)
        neg = [np.full(3, -1.0)] if which == "record_weights" else []
        return st.sampled_from([*neg, np.full(3, np.nan), np.full(3, np.inf),
                                np.ones(4), np.ones(2), np.full(3, "x"),
                                np.ones(3, dtype=np.complex128), "abc", {"a": 1}])
    if which == "reduction":
        return st.sampled_from(["avg", "", None, 1, "MEAN", ["mean"]])
    raise AssertionError(which)


# ----------------------------------------------------------------------------------------
# Grouping, regret, MMRA


@SETTINGS
@given(ids=st.sampled_from([
    None, "abc", np.array([]), np.zeros((2, 2), dtype=np.int64), np.array([-1, 0]),
    np.array([0.5, 1.0]), np.array([0, 2 ** 40]), np.array([0, 2 ** 63 - 1]),
    np.array([0, 2 ** 64 - 1], dtype=np.uint64), np.array(["a", "b"]),
    np.array([0, 1], dtype=object), np.array([0, 1], dtype=np.complex128)]))
def test_group_by_annotator_refuses_malformed_ids(ids):
    _expect_refused(ec.group_by_annotator, ids)


@SETTINGS
@given(regret=st.one_of(
    st.sampled_from([None, "abc", np.zeros((2, 3)), np.zeros((0, 0)), np.zeros(3),
                     np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([[0.0, np.inf], [1.0, 0.0]]),
                     np.zeros((2, 2), dtype=object), np.zeros((2, 2), dtype=np.complex128),
                     np.zeros((2, 2, 2))])),
    solver=st.sampled_from(["hedge", "bogus", 3]))
def test_mmra_refuses_malformed_regret(regret, solver):
    _expect_refused(ec.mmra, regret, solver=solver)


@SETTINGS
@given(R=st.lists(st.floats(-1e308, 1e308), min_size=4, max_size=4))
def test_hedge_gives_a_distribution_for_any_finite_regret(R):
    """Valid but extreme input: finite regrets of any magnitude give finite weights that sum
    to 1 (no overflow inside the multiplicative weights)."""
    res = ec.mmra(np.array(R).reshape(2, 2), solver="hedge", hedge_iterations=200)
    assert np.all(np.isfinite(res.weights)) and np.all(res.weights >= 0)
    assert abs(res.weights.sum() - 1.0) < 1e-9
    assert np.isfinite(res.max_regret)


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["logps", "ref", "source_offsets", "beta",
                                              "kind"]))
def test_regret_matrix_refuses_malformed_arguments(data, which):
    c = dict(logps=np.zeros((2, 6)), ref=np.zeros(6), source_offsets=np.array([0, 3, 6]),
             beta=0.5, kind="reward")
    bad = {"logps": bad_float_arrays((2, 6)), "ref": bad_float_arrays((6,)),
           "source_offsets": st.sampled_from([None, np.array([0, 6]), np.array([0, 3, 7]),
                                              np.array([0, 4, 2, 6]), np.array([1, 3, 6]),
                                              np.array([0.5, 3, 6]), "x",
                                              np.array([0, 2 ** 64 - 1, 6], dtype=np.uint64)]),
           "beta": st.sampled_from(BAD_SCALARS),
           "kind": st.sampled_from(["regret", None, 1, ""])}[which]
    c[which] = data.draw(bad)
    _expect_refused(ec.regret_matrix, c["logps"], c["ref"], c["source_offsets"],
                    beta=c["beta"], kind=c["kind"])


# ----------------------------------------------------------------------------------------
# Data


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["items", "offsets", "n_ranked", "annotator",
                                              "sample_weight", "n_items"]))
def test_ranking_data_refuses_malformed_arguments(data, which):
    c = dict(items=np.array([0, 1, 2, 2, 0, 1, 0, 1]), offsets=np.array([0, 3, 6, 8]),
             n_ranked=np.array([2, 1, 1]), annotator=np.array([0, 1, 0]),
             sample_weight=np.ones(3), n_items=3)
    bad = {"items": st.sampled_from([None, "x", np.array([0, 1, 2, 2, 0, 1, 0, 0]),
                                     np.array([0, 1, 2, 2, 0, 1, 0, -1]), np.zeros((8, 1)),
                                     np.array([0, 1, 2, 2, 0, 1, 0, 1.5]), np.zeros(7),
                                     np.array([0, 1, 2, 2, 0, 1, 0, 2 ** 64 - 1],
                                              dtype=np.uint64)]),
           "offsets": bad_index_arrays(8),
           "n_ranked": st.sampled_from([np.array([0, 1, 1]), np.array([3, 1, 1]), "x",
                                        np.array([1, 1]), np.array([1.5, 1, 1])]),
           "annotator": st.sampled_from([np.array([0, 1]), np.array([[0], [1], [2]]),
                                         np.array([0.5, 1, 2]), np.zeros(3, dtype=object),
                                         np.array([None, None, None])]),
           "sample_weight": st.sampled_from([np.full(3, -1.0), np.full(3, np.nan), np.ones(2),
                                             np.zeros(3), np.full(3, "x"), "x"]),
           "n_items": st.sampled_from([2, 0, -1, 2.5, "3", 2 ** 63, True])}[which]
    c[which] = data.draw(bad)
    _expect_refused(RankingData, c["items"], c["offsets"], c["n_ranked"], c["annotator"],
                    c["sample_weight"], c["n_items"])


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                        st.floats(allow_nan=False), st.text(max_size=5))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda ch: st.one_of(
    st.lists(ch, max_size=4), st.dictionaries(st.text(max_size=5), ch, max_size=3)),
    max_leaves=12)


@SETTINGS
@given(rankings=st.one_of(JSON_VALUES, st.lists(st.lists(JSON_LEAVES, max_size=4),
                                                  max_size=4)))
def test_from_rankings_on_junk_refuses_or_reads(rankings):
    try:
        d = RankingData.from_rankings(rankings)
    except REFUSED:
        return
    assert d.n_records >= 1


@SETTINGS
@given(lines=st.lists(st.one_of(JSON_VALUES.map(json.dumps),
                                st.fixed_dictionaries({"ranking": JSON_VALUES}).map(json.dumps),
                                st.text(max_size=30)), min_size=1, max_size=5),
       raw=st.binary(max_size=20))
def test_from_jsonl_on_junk_refuses_or_reads(tmp_path, lines, raw):
    p = tmp_path / "x.jsonl"
    p.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw)
    try:
        d = RankingData.from_jsonl(p)
    except REFUSED:
        return
    assert d.n_records >= 1


PREFLIB_LINES = st.one_of(
    st.sampled_from(["# NUMBER ALTERNATIVES: 3", "# NUMBER ALTERNATIVES: -1",
                     "# NUMBER ALTERNATIVES: 99999999999999999999", "# NUMBER VOTERS: 9",
                     "# NUMBER UNIQUE ORDERS: 7", "# ALTERNATIVE NAME 1: A", "1: 1,2,3",
                     "2: 3,{1,2}", "1: {1,2,3}", "0: 2,1", "-1: 1,2", "1: 1,1,2", "1: 4,1",
                     "1: ", "x: 1,2", "1: 1,2,3,", "99999999999999999999999: 1,2",
                     "1: 1,,2", "1: {1,2", "1: }", "3", "1,A"]),
    st.text(max_size=20))


@SETTINGS
@given(lines=st.lists(PREFLIB_LINES, min_size=1, max_size=8),
       kind=st.sampled_from([".soc", ".soi", ".toc", ".toi"]))
def test_from_preflib_on_junk_refuses_or_reads(tmp_path, lines, kind):
    p = tmp_path / f"x{kind}"
    p.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # skipped empty orders, truncated counts
            d = RankingData.from_preflib(p)
    except REFUSED:
        return
    assert d.n_records >= 1


# ----------------------------------------------------------------------------------------
# Estimator parameters and model files

PARAMS = dict(n_components=[0, -1, 2.5, "2", None, True, 2 ** 70],
              max_iter=[0, -5, 1.5, "10", None], tol=[-1.0, float("nan"), "x", None],
              n_init=[0, 1.5, "3"], init_params=["bogus", 3, np.zeros((2, 2, 2))],
              alpha=[0.5, float("nan"), float("inf"), -1.0, "1"],
              min_weight=[1.0, -0.1, float("nan"), "x"], verbose=[-1, 1.5, "1"],
              pseudo_count=[-1.0, float("nan"), float("inf"), "x"],
              mm_iter=[0, -1, 1.5], newton=["yes", 2, None],
              checkpoint_every=[0, -1, 1.5], random_state=["x", 1.5, -1])


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(PARAMS)))
def test_plackett_luce_mixture_refuses_malformed_parameters(data, name):
    value = data.draw(st.sampled_from(PARAMS[name]))
    rankings = RankingData.from_rankings([[0, 1, 2], [2, 1, 0], [1, 0, 2]] * 4)
    kw = {"n_components": 2, name: value}
    n = kw.pop("n_components")
    with pytest.raises(REFUSED):
        PlackettLuceMixture(n, max_iter=kw.pop("max_iter", 3), **kw).fit(rankings)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    rankings = RankingData.from_rankings([[0, 1, 2], [2, 1, 0], [1, 0, 2]] * 4)
    path = tmp_path_factory.mktemp("m") / "m.npz"
    PlackettLuceMixture(2, random_state=0, max_iter=5).fit(rankings).save(path)
    return path.read_bytes()


@SETTINGS
@given(cut=st.integers(0, 10 ** 6), flips=st.lists(st.integers(0, 10 ** 6), max_size=3),
       junk=st.binary(max_size=64), how=st.sampled_from(["truncate", "flip", "junk"]))
def test_load_refuses_damaged_or_junk_files(tmp_path, saved_model, cut, flips, junk, how):
    raw = bytearray(saved_model)
    if how == "truncate":
        raw = raw[:cut % len(raw)]
    elif how == "flip":
        for f in flips:
            raw[f % len(raw)] ^= 1 << (f % 8)
    else:
        raw = bytearray(junk)
    p = tmp_path / "damaged.npz"
    p.write_bytes(bytes(raw))
    try:
        m = PlackettLuceMixture.load(p)
    except ValueError as e:
        assert "damaged.npz" in str(e)
        return
    # a flip in a byte the format does not check (e.g. a zip timestamp) may leave a valid
    # model: then it must be the saved one
    assert how == "flip"
    assert np.isfinite(m.weights_).all() and abs(m.weights_.sum() - 1) < 1e-9


# ----------------------------------------------------------------------------------------
# torch layer


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["policy", "ref", "offsets", "weights", "beta",
                                              "n_ranked"]))
def test_torch_loss_refuses_malformed_arguments(data, which):
    torch = pytest.importorskip("torch")
    import emdpo_core.torch as et

    gen = torch.Generator().manual_seed(0)
    c = dict(policy=torch.randn(9, dtype=torch.float64, generator=gen),
             ref=torch.randn(9, dtype=torch.float64, generator=gen),
             offsets=torch.tensor([0, 3, 5, 9]), weights=torch.ones(3, dtype=torch.float64),
             beta=0.5, n_ranked=torch.tensor([2, 1, 3]))
    bad = {"policy": st.sampled_from([torch.zeros(9, dtype=torch.complex128),
                                      torch.zeros(9, dtype=torch.int64), torch.zeros(8),
                                      torch.zeros(2, 2, 9), torch.zeros(9).to_sparse(), None,
                                      np.zeros(9), "x"]),
           "ref": st.sampled_from([torch.zeros(8, dtype=torch.float64),
                                   torch.zeros(9, dtype=torch.complex128),
                                   torch.zeros(9, dtype=torch.float64).to_sparse(),
                                   torch.full((9,), float("nan"), dtype=torch.float64), "x"]),
           "offsets": st.sampled_from([torch.tensor([0, 3, 5, 8]), torch.tensor([1, 3, 5, 9]),
                                       torch.tensor([0, 5, 3, 9]), torch.tensor([0., 3.5, 9.]),
                                       torch.tensor([0, 1, 9]), torch.tensor([[0, 9]]),
                                       torch.tensor([0, 9]).to_sparse(), None, "x"]),
           "weights": st.sampled_from([torch.full((3,), float("nan"), dtype=torch.float64),
                                       torch.ones(4, dtype=torch.float64), "x"]),
           "beta": st.sampled_from(BAD_SCALARS),
           "n_ranked": st.sampled_from([torch.tensor([0, 1, 1]), torch.tensor([3, 1, 1]),
                                        torch.tensor([1, 1]), "x"])}[which]
    c[which] = data.draw(bad)
    _expect_refused(et.listwise_dpo_loss, c["policy"], c["ref"], c["offsets"], c["weights"],
                    beta=c["beta"], n_ranked=c["n_ranked"], reduction="mean")


@SETTINGS
@given(where=st.tuples(st.integers(0, 2), st.integers(0, 1)),
       value=st.sampled_from([float("nan"), float("inf"), -1.0]))
def test_mixture_loss_names_the_bad_responsibility(where, value):
    torch = pytest.importorskip("torch")
    import emdpo_core.torch as et

    resp = torch.full((3, 2), 0.5, dtype=torch.float64)
    resp[where] = value
    with pytest.raises(ValueError) as e:
        et.mixture_dpo_loss(torch.zeros(2, 9, dtype=torch.float64),
                            torch.zeros(9, dtype=torch.float64), torch.tensor([0, 3, 5, 9]),
                            resp, beta=0.5)
    assert "responsibilities" in str(e.value) and str(where) in str(e.value)
