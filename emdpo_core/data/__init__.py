"""Records: layout, grouping by annotator, RankingData and PreferenceData."""

from .rankings import *  # noqa: F401,F403
from .rankings import __all__  # noqa: F401
