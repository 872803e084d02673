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
from conftest import single_torch_thread  # noqa: E402

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
        ("pl_annotator", sc.job_pl_fit, {"how": "annotator"}),
        ("pl_block", sc.job_pl_fit, {"how": "block", "init_params": "random"}),
        ("pl_warm", sc.job_pl_warm_start, {}),
        ("select", sc.job_select, {}),
        ("pl_bad_items", sc.job_pl_bad_items, {}),
        ("pl_bad_k", sc.job_pl_bad_k, {}),
        ("torch_lbfgs", sc.job_emdpo_torch, {"optimizer": "lbfgs"}),
        ("torch_adam", sc.job_emdpo_torch, {"optimizer": "adam"}),
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


# ----------------------------------------------------------------------------------------
# Distributed EM fits = one-process fits of the union


def _same_fit(v, ref, rtol):
    np.testing.assert_allclose(v["weights"], ref.weights_, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(v["log_worths"], ref.log_worths_, rtol=rtol, atol=rtol)
    assert v["loglik"] == pytest.approx(ref.loglik_, rel=rtol)
    np.testing.assert_allclose(v["lower_bounds"], ref.lower_bounds_, rtol=rtol, atol=rtol)
    assert (v["n_iter"], v["converged"]) == (ref.n_iter_, ref.converged_)
    assert [r["n_iter"] for r in v["restarts"]] == [r["n_iter"] for r in ref.restarts_]
    rows = np.searchsorted(ref_labels(ref), v["labels"])
    np.testing.assert_allclose(v["resp"], ref.responsibilities_[rows], rtol=rtol, atol=rtol)


_REF = {}


def ref_labels(model):
    return _REF["labels"]


def _single_pl(init_params="kmeans"):
    key = ("pl", init_params)
    if key not in _REF:
        data = sc.pl_data()
        _REF["labels"] = data.annotator_labels
        _REF[key] = ec.PlackettLuceMixture(init_params=init_params, **sc.PL_PARAMS).fit(data)
    return _REF[key]


def _same_on_every_rank(results, job, keys):
    first = value(results[0], job)
    for res in results[1:]:
        v = value(res, job)
        for k in keys:
            np.testing.assert_array_equal(np.asarray(v[k]), np.asarray(first[k]), err_msg=k)


# Tolerance of a distributed fit against the one-process fit: the same EM iterations, whose
# record sums (wins, MM denominators, Newton gradient and Hessian, log-likelihood) are added
# in another order (per rank, then across ranks); measured differences are ~1e-15 relative.
FIT_RTOL = 1e-12


@pytest.mark.parametrize("job,init", [("pl_annotator", "kmeans"), ("pl_block", "random")])
def test_sharded_plackett_luce_fit_equals_single_process(group, job, init):
    P, results = group
    ref = _single_pl(init)
    for res in results:
        _same_fit(value(res, job), ref, FIT_RTOL)
    # Every rank holds bitwise the same global fit: weights, worths, trace, convergence.
    _same_on_every_rank(results, job, ["weights", "log_worths", "loglik", "lower_bounds",
                                       "n_iter"])


def test_sharded_warm_start_equals_single_process(group):
    P, results = group
    ref = ec.PlackettLuceMixture.from_parameters(
        [[1.0, 0.5, 0, 0, 0, -1], [-1.0, 0, 0, 0, 0.5, 1]], [0.5, 0.5], warm_start=True,
        max_iter=30, tol=1e-10)
    data = sc.pl_data()
    _REF["labels"] = data.annotator_labels
    ref.fit(data)
    for res in results:
        v = value(res, "pl_warm")
        np.testing.assert_allclose(v["weights"], ref.weights_, rtol=FIT_RTOL)
        np.testing.assert_allclose(v["log_worths"], ref.log_worths_, rtol=FIT_RTOL,
                                   atol=FIT_RTOL)
        np.testing.assert_allclose(v["lower_bounds"], ref.lower_bounds_, rtol=FIT_RTOL)
    _same_on_every_rank(results, "pl_warm", ["weights", "log_worths", "lower_bounds"])


def test_model_selection_is_the_same_on_every_rank(group):
    P, results = group
    ref = ec.select_n_components(sc.pl_data(), [1, 2, 3], random_state=0, max_iter=100)
    for res in results:
        v = value(res, "select")
        assert v["best"] == ref.best_n_components
        np.testing.assert_allclose(v["bic"], [r["bic"] for r in ref.rows], rtol=1e-10)
    _same_on_every_rank(results, "select", ["best", "bic"])


def test_ranks_with_different_item_counts_or_k_are_refused(group):
    P, results = group
    for res in results:
        assert res["pl_bad_items"][:2] == ("error", "ValueError"), res["pl_bad_items"]
        assert "rank 0 has n_items=6 but rank 1 has n_items=7" in res["pl_bad_items"][2]
        assert res["pl_bad_k"][:2] == ("error", "ValueError"), res["pl_bad_k"]
        assert "rank 0 has n_components=2 but rank 1 has n_components=3" in res["pl_bad_k"][2]


def test_fit_with_uninitialised_process_group_is_refused():
    class FakeGroup:
        pass

    with pytest.raises(RuntimeError, match="not initialised"):
        ec.PlackettLuceMixture(2).fit(sc.pl_data(), process_group=FakeGroup())


# EMDPO with torch policies: the M-step's gradients and its per-type normaliser are summed
# over the ranks, so full-batch training follows the one-process path up to the order of
# float32 additions (the policies are float32). Measured: parameters agree to ~1e-6
# relative after 4 EM iterations; 1e-4 leaves margin for the optimizer's amplification.
TORCH_RTOL = 1e-4


@pytest.mark.filterwarnings("ignore::emdpo_core.ConvergenceWarning")
@pytest.mark.parametrize("optimizer", sorted(sc.TORCH_FAMILIES))
def test_emdpo_torch_policies_equal_single_process(group, optimizer):
    P, results = group
    pop = sc.torch_population()
    ref = sc.torch_model(pop, **sc.TORCH_FAMILIES[optimizer]).fit(pop.data)
    ref_params = [p.detach().numpy() for m in ref.family_.modules for p in m.parameters()]
    labels = pop.data.annotator_labels if pop.data.annotator is not None else None
    for res in results:
        v = value(res, f"torch_{optimizer}")
        np.testing.assert_allclose(v["weights"], ref.weights_, rtol=TORCH_RTOL, atol=TORCH_RTOL)
        np.testing.assert_allclose(v["lower_bounds"], ref.lower_bounds_, rtol=TORCH_RTOL)
        for a, b in zip(v["params"], ref_params):
            np.testing.assert_allclose(a, b, rtol=TORCH_RTOL, atol=TORCH_RTOL)
        rows = np.searchsorted(labels, v["labels"])
        np.testing.assert_allclose(v["resp"], ref.responsibilities_[rows], atol=TORCH_RTOL)
    _same_on_every_rank(results, f"torch_{optimizer}", ["weights", "lower_bounds", "params"])


# ----------------------------------------------------------------------------------------
# A rank killed mid-fit; the whole job restarted from the last checkpoint


def test_resume_after_a_rank_is_killed_equals_uninterrupted_fit(tmp_path, group):
    P, results = group
    if P != 2:
        pytest.skip("run once, with 2 ranks (each restart of the job starts new processes)")
    path = str(tmp_path / "fit.npz")
    killed = run_group(P, [("fit", sc.job_pl_checkpoint, {"path": path, "die_at": 5})],
                       allow_exit=True)
    assert killed[P - 1] is None                      # the killed rank left no result
    assert killed[0]["fit"][0] == "error"             # rank 0 lost its peer mid-fit
    assert ec.PlackettLuceMixture.load(path)._pending is not None   # an unfinished fit
    resumed = run_group(P, [("fit", sc.job_pl_checkpoint, {"path": path})])
    for r in range(P):
        v = value(resumed[r], "fit")
        want = value(results[r], "pl_annotator")      # the same fit, never interrupted
        assert v["resumed"]
        for k in ("weights", "log_worths", "loglik", "lower_bounds", "n_iter", "resp"):
            np.testing.assert_array_equal(np.asarray(v[k]), np.asarray(want[k]), err_msg=k)


# ----------------------------------------------------------------------------------------
# The launch example of docs/distributed.md, run by torchrun


def test_docs_example_runs_under_torchrun(tmp_path, group):
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from conftest import SUBPROCESS_CWD

    P, _ = group
    if P != 2:
        pytest.skip("run once, with 2 ranks")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    script = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S)
                  if "load_shard(sys.argv[1])" in b)
    (tmp_path / "fit_shards.py").write_text(script)
    data = sc.pl_data()
    rows = []
    for i in range(data.n_records):
        top, rest = data.record(i)
        rows.append({"annotator": str(data.annotator_labels[data.annotator[i]]),
                     "ranking": top, "items": top + rest})
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    out = subprocess.run(
        # --standalone: torchrun binds its own free rendezvous port (see the trainer test).
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "fit_shards.py"), str(tmp_path / "r.jsonl"), str(tmp_path / "f.npz")],
        cwd=SUBPROCESS_CWD, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = ec.PlackettLuceMixture(2, n_init=2, random_state=0).fit(
        ec.RankingData.from_jsonl(tmp_path / "r.jsonl"))
    line = next(x for x in out.stdout.splitlines() if x.startswith("weights"))
    assert line == (f"weights {ref.weights_.round(3).tolist()} loglik "
                    f"{round(ref.loglik_, 6)}")
    assert ec.PlackettLuceMixture.load(tmp_path / "f.npz").n_iter_ == ref.n_iter_


# ----------------------------------------------------------------------------------------
# The Hugging Face trainer under DDP (torchrun, as accelerate launch runs it), CPU, gloo


def test_emdpo_trainer_under_ddp_equals_one_process(tmp_path, group):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from conftest import SUBPROCESS_CWD

    P, _ = group
    if P != 2:
        pytest.skip("run once, with 2 processes")
    script = Path(__file__).resolve().parent / "_ddp_trainer.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        # --standalone: torchrun binds its own free rendezvous port, so no port picked here
        # can be taken meanwhile by the gloo group of the `group` fixture (a CI run failed so).
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)], cwd=SUBPROCESS_CWD, env=env, capture_output=True,
        text=True, timeout=400)
    # The children's warnings fill stderr; show the lines that say what failed.
    errors = [ln for ln in out.stderr.splitlines() if "Warning" not in ln and "warn" not in ln]
    assert out.returncode == 0, "\n".join(errors[-60:])
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["world_size"] == 2
    import _ddp_trainer as ddp

    one = ddp.summary(_one_process_trainer(tmp_path / "one"))
    ddp_run, resumed = got["a"], got["b"]
    # float32 policies: the M-step's gradients are averaged over 2 processes by DDP and the
    # E-step's per-annotator sums added across them, i.e. float32 sums in another order.
    # Measured: ~2e-7 relative; 1e-5 leaves margin.
    np.testing.assert_allclose(ddp_run["weights"], one["weights"], rtol=1e-5)
    np.testing.assert_allclose(ddp_run["resp"], one["resp"], atol=1e-5)
    np.testing.assert_allclose(ddp_run["loglik"], one["loglik"], rtol=1e-5)
    for n, v in one["params"].items():
        assert ddp_run["params"][n] == pytest.approx(v, rel=1e-4, abs=1e-5), n
    # Resumed under DDP from the middle of the second M-step: the uninterrupted DDP run.
    np.testing.assert_allclose(resumed["weights"], ddp_run["weights"], rtol=1e-6)
    np.testing.assert_allclose(resumed["loglik"], ddp_run["loglik"], rtol=1e-6)
    for n, v in ddp_run["params"].items():
        assert resumed["params"][n] == pytest.approx(v, rel=1e-6, abs=1e-7), n


def _one_process_trainer(out):
    import _ddp_trainer as ddp
    from test_hf_trainer import make_trainer

    rows, params = ddp.rows_and_params()
    with single_torch_thread():
        t = make_trainer(str(out), rows, per_device_train_batch_size=8,
                         **dict(params, save_strategy="no"))
        t.train()
    return t
