"""The EM engine over latent annotator types and its policy families."""

from .engine import *  # noqa: F401,F403
from .engine import (INIT_PARAMS, INIT_SMOOTHING, LOG_WORTH_RANGE, NEWTON_HALVINGS,  # noqa: F401
                     NEWTON_MAX_ITEMS, NEWTON_MIN_GAIN, NEWTON_RCOND)
from .engine import __all__ as _engine_all
from .emdpo import EMDPO, OPTIMIZERS, AggregationResult, TorchPolicies  # noqa: F401

__all__ = list(_engine_all) + ["EMDPO", "TorchPolicies", "AggregationResult"]
