"""Compatibility with the package as it was before its modules moved into subpackages:
models saved by that code load and predict identically, and every public module path and
name it had still imports.

tests/data/old_*.npz were written by tests/data/make_old_checkpoint.py at commit 5ec4ccc."""

import importlib
import importlib.util
import os

import numpy as np
import pytest
from conftest import single_torch_thread

import emdpo_core as ec

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _maker():
    """tests/data/make_old_checkpoint.py: how the old files were made and their inputs."""
    spec = importlib.util.spec_from_file_location(
        "make_old_checkpoint", os.path.join(DATA, "make_old_checkpoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

# Public names of each module at commit 5ec4ccc (its __all__ plus public module-level names).
OLD_NAMES = {
    "kernels": ["EStepResult", "REDUCTIONS", "e_step", "listwise_dpo_loss_and_grad",
                "listwise_loglik"],
    "emdpo": ["AggregationResult", "EMDPO", "OPTIMIZERS", "TorchPolicies"],
    "em": ["CollapsedComponentWarning", "ConvergenceWarning", "EMEstimator", "INIT_PARAMS",
           "INIT_SMOOTHING", "LOG_WORTH_RANGE", "ModelSelection", "NEWTON_HALVINGS",
           "NEWTON_MAX_ITEMS", "NEWTON_MIN_GAIN", "NEWTON_RCOND", "PlackettLuceMixture",
           "PolicyFamily", "PolicyLogps", "PolicySamples", "TabularPolicies",
           "select_n_components"],
    "data": ["GroupedPreferences", "GroupedRankings", "GroupedRecords", "PreferenceData",
             "RankingData", "group_records"],
    "mmra": ["HEDGE_ITERATIONS", "MMRAResult", "MixturePolicy", "REGRET_KINDS",
             "exact_mixture_regret", "mmra", "mmra_exact", "regret_matrix"],
    "torch": ["ListwiseDPOLoss", "listwise_dpo_loss", "mixture_dpo_loss",
              "padded_listwise_dpo_loss", "pairwise_dpo_loss"],
    "datasets": ["Population", "adjusted_rand_index", "make_population", "match_types",
                 "policy_error", "LinearSoftmaxPolicy"],
    "bench": ["add_parser", "run", "CASES", "FIELDS"],
    "diagnostics": ["DOF_CAP", "IdentifiabilityReport", "IdentifiabilityWarning",
                    "degrees_of_freedom", "identifiability"],
    "cli": ["main"],
    "demo": ["DEMO_TYPE_REWARDS", "DEMO_TYPE_WEIGHTS", "run_demo"],
}
NEEDS_TORCH = {"torch", "emdpo"}
OLD_ALL = ["__version__", "build_info", "EStepResult", "listwise_loglik", "e_step",
           "listwise_dpo_loss_and_grad", "group_by_annotator", "regret_matrix", "mmra",
           "mmra_exact", "MMRAResult", "MixturePolicy", "RankingData", "PlackettLuceMixture",
           "select_n_components", "diagnostics", "ConvergenceWarning",
           "IdentifiabilityWarning", "CollapsedComponentWarning", "EMEstimator",
           "PolicyFamily", "PolicyLogps", "TabularPolicies", "PolicySamples",
           "PreferenceData", "EMDPO", "TorchPolicies", "AggregationResult", "datasets"]


def test_every_old_top_level_name_is_still_exported():
    missing = [n for n in OLD_ALL if n not in ec.__all__ or not hasattr(ec, n)]
    assert missing == []


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_every_old_module_path_still_imports_its_names(module):
    if module in NEEDS_TORCH:
        pytest.importorskip("torch")
    mod = importlib.import_module(f"emdpo_core.{module}")
    missing = [n for n in OLD_NAMES[module] if not hasattr(mod, n)]
    assert missing == []


# Names of emdpo_core.distributed while it was one module (at dd80a27): its __all__ and the
# names other modules import from it. It is a package now; each keeps its path.
OLD_DISTRIBUTED_NAMES = ["GATHER_MAX", "SHARDINGS", "LocalComm", "TorchComm", "Statistics",
                         "ShardLayout", "resolve_comm", "shard_layout", "check_same",
                         "posteriors", "combine_annotator_loglik", "e_step", "shard_of",
                         "shard", "take_records", "load_shard"]


def test_distributed_names_keep_their_path():
    from emdpo_core import distributed

    missing = [n for n in OLD_DISTRIBUTED_NAMES if not hasattr(distributed, n)]
    assert missing == []
    assert set(distributed.__all__) <= set(OLD_DISTRIBUTED_NAMES)
    assert distributed.e_step is ec.e_step


# Names of the modules cut into pieces after dd80a27 that other code imports from them (their
# __all__ and the names of their own that tests, benchmarks and the package use); each keeps
# its path. hf.trainer.sequence_logps: benchmarks/bench_hf_trainer.py times it there.
SPLIT_MODULE_NAMES = {
    "torch": ["listwise_dpo_loss", "ListwiseDPOLoss", "pairwise_dpo_loss",
              "padded_listwise_dpo_loss", "mixture_dpo_loss", "check_errors"],
    "bench.cases": ["add_parser", "run", "CASES", "FIELDS", "BETA", "QUICK", "Layout", "Sizes",
                    "make_layout"],
    "hf.trainer": ["EMDPOTrainer", "EMDPOConfig", "STATE_FILE", "TYPES_FILE", "sequence_logps"],
}


@pytest.mark.parametrize("module", sorted(SPLIT_MODULE_NAMES))
def test_split_module_names_keep_their_path(module):
    if module == "torch":
        pytest.importorskip("torch")
    if module == "hf.trainer":
        for dep in ("transformers", "peft"):
            pytest.importorskip(dep)
    mod = importlib.import_module(f"emdpo_core.{module}")
    missing = [n for n in SPLIT_MODULE_NAMES[module] if not hasattr(mod, n)]
    assert missing == []
    if module == "hf.trainer":
        import emdpo_core.hf as hf

        assert hf.EMDPOTrainer is mod.EMDPOTrainer and hf.EMDPOConfig is mod.EMDPOConfig
        assert mod.sequence_logps is hf.sequence_logps


def test_old_module_objects_are_the_new_ones():
    """A shim re-exports the object itself, so isinstance checks and monkeypatching across old
    and new paths see one class."""
    kernels, em, data, mmra = (importlib.import_module(f"emdpo_core.{m}")
                               for m in ("kernels", "em", "data", "mmra"))
    assert kernels.e_step is ec.e_step
    assert em.PlackettLuceMixture is ec.PlackettLuceMixture
    assert data.RankingData is ec.RankingData
    assert mmra.regret_matrix is ec.regret_matrix


def test_old_plackett_luce_checkpoint_predicts_identically():
    make = _maker()

    old = np.load(os.path.join(DATA, "old_predictions.npz"))
    model = ec.PlackettLuceMixture.load(os.path.join(DATA, "old_plmixture.npz"))
    data = make.plmixture_data()
    np.testing.assert_array_equal(model.log_worths_, old["pl_log_worths"])
    np.testing.assert_array_equal(model.predict(data), old["pl_labels"])
    # The same kernels on the same inputs: only the CPU's instruction set (which the kernels
    # pick at load time) can change the order of the float64 sums, by a few ulps.
    np.testing.assert_allclose(model.predict_proba(data), old["pl_proba"], rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(model.score(data), old["pl_score"], rtol=1e-12)


def test_old_emdpo_checkpoint_predicts_identically():
    pytest.importorskip("torch")
    make = _maker()

    old = np.load(os.path.join(DATA, "old_predictions.npz"))
    pop = make.population()
    with single_torch_thread():
        model = ec.EMDPO.load(os.path.join(DATA, "old_emdpo.npz"), policies=make.emdpo_family(pop))
        np.testing.assert_array_equal(model.weights_, old["em_weights"])
        np.testing.assert_array_equal(model.predict(pop.data), old["em_labels"])
        # As above: summation order may change with the instruction set, by a few ulps.
        np.testing.assert_allclose(model.predict_proba(pop.data), old["em_proba"], rtol=1e-12,
                                   atol=1e-15)
