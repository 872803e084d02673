"""`emdpo bench`: the benchmark harness, its cases and their baselines."""

from .cases import *  # noqa: F401,F403
from .cases import __all__  # noqa: F401
