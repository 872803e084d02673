"""EM over latent annotator types: the engine (:mod:`.engine`, :mod:`.persistence`), the
policy-family protocol (:mod:`.family`), the tabular family and PlackettLuceMixture
(:mod:`.tabular`), the torch family and EMDPO (:mod:`.torch_policies`, :mod:`.emdpo`),
the choice of K (:mod:`.selection`), using a fit (:mod:`._scoring`), and the E-step outputs
between E- and M-step, on the host or the policies' device (:mod:`._responsibilities`).
Numba routines: :mod:`._mixture`, :mod:`._plackett_luce_mm`, :mod:`._initialization`."""

from .emdpo import EMDPO, AggregationResult  # noqa: F401
from .engine import INIT_PARAMS, INIT_SMOOTHING, EMEstimator  # noqa: F401
from .family import (CollapsedComponentWarning, ConvergenceWarning, PolicyFamily, PolicyLogps,
                     PolicySamples)
from .selection import ModelSelection, select_n_components
from .tabular import (LOG_WORTH_RANGE, NEWTON_HALVINGS, NEWTON_MAX_ITEMS,  # noqa: F401
                      NEWTON_MIN_GAIN, NEWTON_RCOND, PlackettLuceMixture, TabularPolicies)
from .torch_policies import OPTIMIZERS, TorchPolicies  # noqa: F401

# The names of the former single module emdpo_core.em (the constants and EMDPO's names are
# importable from here too, outside __all__).
__all__ = [
    "ConvergenceWarning",
    "CollapsedComponentWarning",
    "PolicyLogps",
    "PolicySamples",
    "PolicyFamily",
    "TabularPolicies",
    "EMEstimator",
    "PlackettLuceMixture",
    "ModelSelection",
    "select_n_components",
]
