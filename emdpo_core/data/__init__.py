"""Records: layout and grouping by annotator (:mod:`.records`), tabular rankings
(:class:`RankingData`), preference data over policy inputs (:class:`PreferenceData`), and
file readers (:mod:`.io`)."""

from .preferences import GroupedPreferences, PreferenceData
from .rankings import GroupedRankings, RankingData
from .records import GroupedRecords, group_records

__all__ = ["RankingData", "PreferenceData", "GroupedRecords", "GroupedRankings",
           "GroupedPreferences", "group_records"]
