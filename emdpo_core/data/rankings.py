"""Tabular rankings of item ids (:class:`RankingData`) and their grouped form."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from . import io
from .. import _checks
from .records import (GroupedRecords, RecordSet, annotator_codes, first_repeated_item,
                      group_records, record_of)

__all__ = ["RankingData", "GroupedRankings"]


@dataclass(frozen=True, eq=False)
class GroupedRankings(GroupedRecords):
    """Grouped tabular rankings: :class:`GroupedRecords` plus ``items`` (M,) int64, the item
    id of every grouped slot, and ``n_items``."""

    items: np.ndarray
    n_items: int

    def _fingerprint_parts(self):
        return super()._fingerprint_parts() + (self.items, self.n_items)


class RankingData(RecordSet):
    """Tabular rankings: item ids per slot, best first, with annotators and weights.

    Args:
        items: (M,) integer item ids in [0, n_items), records' slots concatenated, best first
            (the unranked rest of each candidate set after its ranked items).
        offsets: (N+1,) record offsets: record i is items[offsets[i]:offsets[i+1]],
            offsets[0] = 0, offsets[N] = M, every record at least 2 items long.
        n_ranked: (N,) observed ranking depth L_i in [1, m_i - 1] (top-L_i orders;
            m_i - 1 = a full ranking, the default; 1 = a top-1 choice).
        annotator: (N,) annotator ids (integers or strings); default None = every record is
            its own annotator. Ids are re-coded to 0..H-1 in sorted order of the distinct ids;
            ``annotator_labels`` keeps the ids, row h of ``predict_proba`` is annotator
            ``annotator_labels[h]``.
        sample_weight: (N,) finite weights >= 0: how many times each row occurs (see the
            module docstring: with annotator=None a row is an annotator).
        n_items: number of items; default max(items) + 1.
        item_names: optional n_items names (used in printed and JSON output).

    Raises ValueError/TypeError naming the argument, the expected and the given value, with
    the first offending record or slot (repeated items in a list, ids out of range, empty
    lists, lists of one item, bad depths, bad weights).

    Example:
        >>> import emdpo_core as ec
        >>> d = ec.RankingData.from_rankings([[0, 1, 2], [2, 0], [1, 2, 0]])
        >>> d.n_records, d.n_items, d.n_ranked.tolist()
        (3, 3, [2, 1, 2])
    """

    def __init__(self, items, offsets, n_ranked=None, annotator=None, sample_weight=None,
                 n_items=None, *, item_names=None):
        items = _checks.index_array(items, "items", host_tensors=True)
        offsets = _checks.index_array(offsets, "offsets", host_tensors=True)
        _checks.check_offsets(offsets, items.shape[0], total="len(items)")
        lengths = np.diff(offsets)
        N = offsets.shape[0] - 1
        neg = np.flatnonzero(items < 0)
        if neg.size:
            j = int(neg[0])
            raise ValueError(f"items: expected ids >= 0, got {items[j]} at slot {j} "
                             f"(record {record_of(offsets, j)})")
        top = int(items.max())
        if n_items is None:
            n_items = top + 1
        else:
            n_items = _checks.check_int("n_items", n_items, 2)
            if n_items > np.iinfo(np.int64).max:
                raise ValueError(f"n_items: {n_items} is beyond int64")
            if top >= n_items:
                j = int(np.argmax(items >= n_items))
                raise ValueError(f"items: id {items[j]} at slot {j} (record "
                                 f"{record_of(offsets, j)}) is out of range for "
                                 f"n_items={n_items}")
        if n_items < 2:
            raise ValueError(f"items: expected at least 2 distinct item ids, got ids up to "
                             f"{top} (n_items={n_items})")
        r, j = first_repeated_item(items, offsets, n_items)
        if r >= 0:
            first = int(offsets[r] + np.argmax(items[offsets[r]:j] == items[j]))
            raise ValueError(f"items: record {r} lists item {items[j]} twice (slots {first} and "
                             f"{j}); the items of a record must be distinct")
        nr = _checks.check_n_ranked(n_ranked, offsets, N)
        if nr is None:
            nr = lengths - 1
        codes, labels = annotator_codes(annotator, N)
        sw = _checks.check_sample_weight(sample_weight, N)
        if item_names is not None:
            item_names = [str(x) for x in item_names]
            if len(item_names) != n_items:
                raise ValueError(f"item_names: expected {n_items} names (one per item), got "
                                 f"{len(item_names)}")
        self.items = items
        self.offsets = offsets
        self.n_ranked = nr
        self.annotator = codes
        self.annotator_labels = labels
        self.sample_weight = sw
        self.n_items = int(n_items)
        self.item_names = item_names
        self._grouped: Optional[GroupedRankings] = None
        self._cache: dict = {}

    # ------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"RankingData(n_records={self.n_records}, n_annotators={self.n_annotators}, "
                f"n_items={self.n_items}, n_slots={self.items.shape[0]}"
                f"{', weighted' if self.sample_weight is not None else ''})")

    def record(self, i: int):
        """(ranked items, unranked rest) of record i, as lists of item ids."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        L = int(self.n_ranked[i])
        return self.items[a:a + L].tolist(), self.items[a + L:b].tolist()

    def grouped(self) -> GroupedRankings:
        """The records grouped by annotator (computed once, then kept)."""
        if self._grouped is None:
            fields = group_records(self.offsets, self.n_ranked, self.annotator,
                                   self.sample_weight, self.n_annotators)
            items = np.ascontiguousarray(self.items[fields["slot_order"]])
            self._grouped = GroupedRankings(**fields, items=items, n_items=self.n_items)
        return self._grouped

    # ------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_rankings(cls, rankings: Sequence[Sequence], candidates=None, *, annotator=None,
                      sample_weight=None, n_items=None, item_names=None) -> "RankingData":
        """Build from Python lists of orders, best first.

        Args:
            rankings: one order per record, best first. Without ``candidates`` each order is a
                full ranking of its own items (so it needs at least 2). Items are ints, or all
                strings (names; ids given in order of first appearance unless ``item_names``
                fixes them).
            candidates: optional candidate set per record (a superset of its ranking): the
                ranking is then a top-L order of that set and the other candidates are its
                unranked rest. A ranking that lists all m or m - 1 candidates is full.
            annotator, sample_weight, n_items, item_names: as in the constructor.

        Example:
            >>> import emdpo_core as ec
            >>> d = ec.RankingData.from_rankings([["b", "a"], ["c"]], [None, ["a", "b", "c"]])
            >>> d.item_names, d.record(1)
            (['b', 'a', 'c'], ([2], [1, 0]))
        """
        return cls(**io.build_from_lists(rankings, candidates, n_items=n_items,
                                       item_names=item_names,
                                       where=lambda i: f"rankings[{i}]"),
                   annotator=annotator, sample_weight=sample_weight)

    @classmethod
    def from_preflib(cls, path, *, trailing_tie: str = "reject") -> "RankingData":
        """Read a PrefLib file of orders: .soc (complete strict orders), .soi (incomplete
        strict orders), .toc/.toi (orders with ties, accepted only without real ties).

        Both the current PrefLib format (``# NUMBER ALTERNATIVES: n`` header lines, then
        ``count: a,b,c``) and the older one (n, n name lines, a voter-count line, then
        ``count,a,b,c``) are read. Alternatives are numbered 1..n in the file and 0..n-1 here;
        ``item_names`` come from the ALTERNATIVE NAME lines.

        Every order is one record whose candidate set is all n alternatives: the listed
        alternatives are its top-L order (L = number listed, or n - 1 when all n or n - 1
        are listed) and the unlisted ones are its unranked rest. A line's count becomes the
        record's ``sample_weight`` (that many voters; ``annotator`` is None). Orders that list
        nothing carry no information and are skipped with a warning.

        Ties ``{a,b}`` are rejected with the line number: the Plackett-Luce model has no ties.
        ``trailing_tie="unranked"`` accepts a tie that is the last group of a line and treats
        it as the unranked rest (a common reading of bottom ties in ballots).
        """
        if trailing_tie not in ("reject", "unranked"):
            raise ValueError(f"trailing_tie: expected 'reject' or 'unranked', got "
                             f"{trailing_tie!r}")
        return cls(**io.read_preflib(os.fspath(path), trailing_tie))

    @classmethod
    def from_jsonl(cls, path) -> "RankingData":
        """Read JSON Lines, one record per line:
        ``{"annotator": ..., "ranking": [...], "items": [...], "weight": ...}``.

        ``ranking`` (required) is the order best first; ``items`` (optional) the candidate
        set, a superset of ``ranking`` whose other members are the unranked rest (without it
        the ranking is a full ranking of its own items); ``annotator`` (optional, any JSON
        string or integer; give it on every line or on none) and ``weight`` (optional,
        default 1). Items are integer ids or strings (names). Errors name the line.
        """
        return cls(**io.read_jsonl(path))


