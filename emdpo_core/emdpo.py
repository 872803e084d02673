"""Former home of EMDPO and TorchPolicies; they live in :mod:`emdpo_core.em` now
(:mod:`emdpo_core.em.emdpo`, :mod:`emdpo_core.em.torch_policies`). Kept so that
``emdpo_core.emdpo`` imports keep working."""

from .em.emdpo import AggregationResult, EMDPO
from .em.torch_policies import OPTIMIZERS, TorchPolicies

__all__ = ["EMDPO", "TorchPolicies", "AggregationResult", "OPTIMIZERS"]
