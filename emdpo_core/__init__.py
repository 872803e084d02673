"""emdpo-core: a fast compiled core for EM-DPO.

Listwise (Plackett-Luce) log-likelihoods, fused E-steps and weighted DPO losses over cached
policy log-probabilities, on CPU (C++/OpenMP) and CUDA. The math: docs/math.md.
"""

from __future__ import annotations

from . import _core
from .data._grouping import group_by_annotator
from .ops import EStepResult, listwise_dpo_loss_and_grad, listwise_loglik
from .distributed import e_step        # the kernel's E-step, over a process group when given
from . import diagnostics
from .data import RankingData
from .diagnostics import IdentifiabilityWarning
from .data import PreferenceData
from .em import (EMDPO, AggregationResult, CollapsedComponentWarning, ConvergenceWarning,
                 EMEstimator, PlackettLuceMixture, PolicyFamily, PolicyLogps, PolicySamples,
                 TabularPolicies, TorchPolicies, select_n_components)
from . import datasets
# The function mmra shadows the submodule attribute of the same name on the package;
# `from emdpo_core.mmra import ...` still reaches the module.
from .mmra import MixturePolicy, MMRAResult, mmra, mmra_exact, regret_matrix

__version__ = _core.__version__

__all__ = [
    "__version__",
    "build_info",
    "EStepResult",
    "listwise_loglik",
    "e_step",
    "listwise_dpo_loss_and_grad",
    "group_by_annotator",
    "regret_matrix",
    "mmra",
    "mmra_exact",
    "MMRAResult",
    "MixturePolicy",
    "RankingData",
    "PlackettLuceMixture",
    "select_n_components",
    "diagnostics",
    "ConvergenceWarning",
    "IdentifiabilityWarning",
    "CollapsedComponentWarning",
    "EMEstimator",
    "PolicyFamily",
    "PolicyLogps",
    "TabularPolicies",
    "PolicySamples",
    "PreferenceData",
    "EMDPO",
    "TorchPolicies",
    "AggregationResult",
    "datasets",
]


def build_info() -> dict:
    """What the compiled core was built with.

    Returns a dict with ``version``, ``cuda`` (bool: CUDA kernels compiled in), ``openmp``
    (bool), ``num_threads`` (OpenMP threads the CPU kernels use now), ``cpu_isa`` (the
    vector instruction set the CPU kernels picked at load time: "avx512", "avx2" or
    "baseline"; the environment variable EMDPO_CPU_ISA caps it), ``cxx_compiler`` and,
    for CUDA builds, ``cuda_compiler`` and ``cuda_architectures``.
    """
    info = {
        "version": _core.__version__,
        "cuda": bool(_core.cuda),
        "openmp": bool(_core.openmp),
        "num_threads": int(_core.num_threads()),
        "cpu_isa": _core.cpu_isa(),
        "cxx_compiler": _core.cxx_compiler,
    }
    if _core.cuda:
        info["cuda_compiler"] = _core.cuda_compiler
        info["cuda_architectures"] = _core.cuda_architectures
    return info
