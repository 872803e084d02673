"""Distributed EM on torch.distributed (gloo, CPU): sharded runs equal one-process runs.

Each process group (2 and 3 ranks) is started once per module (starting processes that import
torch is most of the cost) and runs every scenario of tests/_dist_scenarios.py; the tests
below compare what each rank returned with the one-process computation on the union of the
shards."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _dist_scenarios as sc  # noqa: E402
from _dist_harness import run_group, value  # noqa: E402

import emdpo_core as ec  # noqa: E402
from emdpo_core import distributed  # noqa: E402

WORLD_SIZES = (2, 3)


def _jobs():
    return [
        ("reductions", sc.job_reductions, {}),
        ("estep_annotator", sc.job_e_step, {"how": "annotator"}),
        ("estep_block", sc.job_e_step, {"how": "block"}),
        ("estep_block_record", sc.job_e_step, {"how": "annotator", "sharding": "record"}),
        ("estep_torch", sc.job_e_step, {"how": "block", "torch_input": True}),
        ("estep_global_csr", sc.job_e_step_global_csr, {}),
        ("bad_k", sc.job_e_step_bad_k, {}),
        ("straddle", sc.job_straddle_annotator_mode, {}),
    ]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda p: f"P{p}")
def group(request):
    return request.param, run_group(request.param, _jobs())


# ----------------------------------------------------------------------------------------
# Reductions


def test_statistics_sum_in_rank_order_and_max(group):
    P, results = group
    parts = [np.random.default_rng(100 + r) for r in range(P)]
    small = [g.normal(size=(3, 4)) for g in parts]
    large = [g.normal(size=10_001) for g in parts]
    top = [g.normal(size=5) for g in parts]
    want_small, want_large = small[0].copy(), large[0].copy()
    for r in range(1, P):            # rank order, float64: the documented order of additions
        want_small += small[r]
        want_large += large[r]
    for r, res in enumerate(results):
        v = value(res, "reductions")
        assert (v["world"], v["rank"]) == (P, r)
        np.testing.assert_array_equal(v["small"], want_small)       # bitwise
        np.testing.assert_array_equal(v["large"], want_large)
        np.testing.assert_array_equal(v["top"], np.max(top, axis=0))
        assert v["scalar"] == sum(range(1, P + 1))


# ----------------------------------------------------------------------------------------
# Sharded E-step = one-process E-step on the union


def _check_rows(v, labels, ref, *, bitwise_resp=False):
    rows = np.searchsorted(labels, v["labels"])
    np.testing.assert_array_equal(labels[rows], v["labels"])
    if bitwise_resp:
        np.testing.assert_array_equal(v["resp"], ref.responsibilities[rows])
    # 1e-12: the only difference is the order of float64 additions of the partial sums.
    np.testing.assert_allclose(v["resp"], ref.responsibilities[rows], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v["S"], ref.annotator_loglik[rows], rtol=1e-12, atol=1e-9)
    assert v["loglik"] == pytest.approx(ref.loglik, rel=1e-12)


@pytest.mark.parametrize("job", ["estep_annotator", "estep_block", "estep_block_record",
                                 "estep_torch"])
def test_sharded_e_step_equals_single_process(group, job):
    P, results = group
    labels, ref = sc.single_e_step(sc.estep_data(0))
    seen = []
    logliks = set()
    for res in results:
        v = value(res, job)
        # annotator-sharded: posteriors are computed where the records are, by the same
        # kernel on the same records, so they are bitwise the one-process ones.
        _check_rows(v, labels, ref, bitwise_resp=job == "estep_annotator")
        seen.append(v["labels"])
        logliks.add(v["loglik"])
    assert len(logliks) == 1                     # bitwise the same on every rank
    union = np.unique(np.concatenate(seen))
    np.testing.assert_array_equal(union, labels)  # every annotator is on some rank


def test_sharded_e_step_global_annotator_index(group):
    P, results = group
    labels, ref = sc.single_e_step(sc.estep_data(0))
    first = value(results[0], "estep_global_csr")
    for res in results:
        v = value(res, "estep_global_csr")
        _check_rows(v, labels, ref)
        np.testing.assert_array_equal(v["resp"], first["resp"])   # every rank: the same bits


def test_different_k_on_ranks_is_refused(group):
    P, results = group
    for res in results:
        kind, msg = res["bad_k"][1], res["bad_k"][2]
        assert kind == "ValueError", res["bad_k"]
        assert "rank 0 has K=3 but rank 1 has K=2" in msg


def test_straddling_annotator_in_annotator_mode_is_refused(group):
    P, results = group
    for res in results:
        kind, msg = res["straddle"][1], res["straddle"][2]
        assert kind == "ValueError", res["straddle"]
        assert "straddle ranks" in msg and "sharding='annotator'" in msg


# ----------------------------------------------------------------------------------------
# Without a group


def test_process_group_not_initialised_is_refused():
    assert not dist.is_initialized()

    class FakeGroup:
        pass

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        distributed.resolve_comm(FakeGroup())


def test_single_process_path_is_the_kernel(rng):
    d = sc.estep_data(3)
    g, ao, labels = sc.grouped(d)
    a = ec.e_step(g["policy"], g["ref"], g["offsets"], ao, g["log_weights"], beta=g["beta"],
                  n_ranked=g["n_ranked"], record_weights=g["record_weights"])
    b = distributed.e_step(g["policy"], g["ref"], g["offsets"], ao, g["log_weights"],
                           beta=g["beta"], n_ranked=g["n_ranked"],
                           record_weights=g["record_weights"], annotator_ids=labels)
    np.testing.assert_array_equal(a.responsibilities, b.responsibilities)
    assert a.loglik == b.loglik
    assert isinstance(distributed.resolve_comm(None), distributed.LocalComm)


def test_shard_of_keeps_annotators_together_and_is_stable():
    ids = np.array(["ann-3", "ann-1", "ann-3", "ann-2", "ann-1"] * 3)
    r = distributed.shard_of(ids, 3)
    for a in np.unique(ids):
        assert np.unique(r[ids == a]).size == 1
    # The hash is blake2b of the id: fixed across processes and Python runs.
    np.testing.assert_array_equal(distributed.shard_of(ids[::-1], 3), r[::-1])
    assert set(distributed.shard_of(np.arange(1000), 4).tolist()) == {0, 1, 2, 3}
