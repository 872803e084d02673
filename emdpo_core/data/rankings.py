"""Ranking data for EM over latent annotator types: layout, validation, grouping, loaders.

Layout (DESIGN.md section 1): record i is one annotator's (possibly partial) ranking of
m_i >= 2 candidates; its item ids sit best first in slots ``offsets[i]:offsets[i+1]`` of
``items``; the first ``n_ranked[i] = L_i`` (1 <= L_i <= m_i - 1) positions are ordered, the
m_i - L_i items after them are the unranked rest of the candidate set (in any order).

Weights mean row expansion. A row of the data is an (annotator, ranking) pair and
``sample_weight[i]`` is how many times row i occurs:
- with ``annotator=None`` every row is its own annotator, so a weight of 3 stands for 3
  annotators who gave that ranking (PrefLib counts of identical ballots are this);
- with ``annotator`` given, a weight of 3 stands for the same annotator giving that ranking
  3 times.
Fitting weighted data gives exactly the fit of the expanded rows (the tests check this).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..em import _plackett_luce_mm as bk
from ..ops.listwise import _real_vector

__all__ = ["RankingData", "PreferenceData", "GroupedRecords", "GroupedRankings",
           "GroupedPreferences", "group_records"]


@dataclass(frozen=True, eq=False)
class GroupedRecords:
    """Records sorted by annotator (stable): the layout the EM engine works on.

    This is all the engine reads of the data. A data type of its own (e.g. prompts and
    responses for torch policies) plugs into the engine by having ``grouped()`` return a
    subclass of this, made with :func:`group_records`, with its per-record and per-slot
    arrays permuted the same way (``order``, ``slot_order``).

    Attributes:
        offsets: (N+1,) int64 record offsets, records in annotator order.
        n_ranked: (N,) int64 observed depths L_i.
        record_weight: (N,) float64 c_i: repeats of the record within its annotator.
        annotator_weight: (H,) float64 v_h: repeats of the annotator (with all its records).
        annotator_offsets: (H+1,) int64: annotator h owns records
            annotator_offsets[h]:annotator_offsets[h+1].
        order: (N,) int64: grouped record j is record order[j] of the original data.
        slot_order: (M,) int64: grouped slot s is slot slot_order[s] of the original data.
        unit_record_weight, unit_annotator_weight: every c_i (v_h) is 1.
    """

    offsets: np.ndarray
    n_ranked: np.ndarray
    record_weight: np.ndarray
    annotator_weight: np.ndarray
    annotator_offsets: np.ndarray
    order: np.ndarray
    slot_order: np.ndarray
    unit_record_weight: bool
    unit_annotator_weight: bool

    @property
    def n_records(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_annotators(self) -> int:
        return int(self.annotator_offsets.shape[0] - 1)

    @property
    def n_slots(self) -> int:
        return int(self.offsets[-1])

    @property
    def m_max(self) -> int:
        return int(np.max(np.diff(self.offsets)))

    @property
    def total_weight(self) -> float:
        """Number of records after row expansion: sum_i c_i v_{a_i}."""
        per_annotator = np.add.reduceat(self.record_weight, self.annotator_offsets[:-1])
        return float(np.dot(per_annotator, self.annotator_weight))

    @property
    def annotator_total(self) -> float:
        """Number of annotators after row expansion: sum_h v_h."""
        return float(self.annotator_weight.sum())

    def _fingerprint_parts(self):
        return (self.offsets, self.n_ranked, self.record_weight, self.annotator_weight,
                self.annotator_offsets)

    def fingerprint(self) -> str:
        """SHA-256 of the grouped arrays: checkpoints refuse to resume on other data."""
        h = hashlib.sha256()
        for a in self._fingerprint_parts():
            h.update(np.ascontiguousarray(a).tobytes() if isinstance(a, np.ndarray)
                     else repr(a).encode())
            h.update(b"|")
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class GroupedRankings(GroupedRecords):
    """Grouped tabular rankings: :class:`GroupedRecords` plus ``items`` (M,) int64, the item
    id of every grouped slot, and ``n_items``."""

    items: np.ndarray
    n_items: int

    def _fingerprint_parts(self):
        return super()._fingerprint_parts() + (self.items, self.n_items)


def group_records(offsets, n_ranked, annotator=None, sample_weight=None,
                  n_annotators=None) -> dict:
    """Sort records by annotator (stable) and split the weights (see the module docstring).

    Args:
        offsets: (N+1,) record offsets; n_ranked: (N,) depths.
        annotator: (N,) int64 annotator codes in [0, H), or None (each record its own
            annotator, kept in order).
        sample_weight: (N,) row counts or None.
        n_annotators: H (with annotator).

    Returns:
        A dict of the :class:`GroupedRecords` fields (pass it with ``**`` to the class or
        a subclass, adding the subclass's fields permuted by ``slot_order`` / ``order``).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    N = offsets.shape[0] - 1
    if annotator is None:
        order = np.arange(N, dtype=np.int64)
        slot_order = np.arange(offsets[-1], dtype=np.int64)
        ao = np.arange(N + 1, dtype=np.int64)
        grouped_offsets = offsets
        rw = np.ones(N)
        aw = np.ones(N) if sample_weight is None else np.array(sample_weight, dtype=np.float64)
    else:
        order, ao = bk.group_by_annotator(annotator, n_annotators)
        lengths = np.diff(offsets)[order]
        grouped_offsets = np.zeros(N + 1, dtype=np.int64)
        np.cumsum(lengths, out=grouped_offsets[1:])
        slot_order = np.repeat(offsets[:-1][order] - grouped_offsets[:-1], lengths) + \
            np.arange(grouped_offsets[-1])
        rw = np.ones(N) if sample_weight is None else \
            np.asarray(sample_weight, dtype=np.float64)[order]
        aw = np.ones(ao.shape[0] - 1)
    return dict(offsets=np.ascontiguousarray(grouped_offsets),
                n_ranked=np.ascontiguousarray(np.asarray(n_ranked, dtype=np.int64)[order]),
                record_weight=np.ascontiguousarray(rw), annotator_weight=np.ascontiguousarray(aw),
                annotator_offsets=ao, order=order, slot_order=slot_order,
                unit_record_weight=bool(np.all(rw == 1.0)),
                unit_annotator_weight=bool(np.all(aw == 1.0)))


def _first_repeated_item(items, offsets, n_items):
    """(record, slot) of the first item repeated within its record, or (-1, -1)."""
    if n_items <= 4 * items.shape[0] + 1024:
        return bk.first_repeated_item(items, offsets, n_items)
    # Sparse ids (n_items far above the number of slots): compact them first, so that no
    # array of size n_items is made.
    _, compact = np.unique(items, return_inverse=True)
    return bk.first_repeated_item(compact.reshape(-1).astype(np.int64), offsets,
                                  items.shape[0])


def _int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            pass  # integral floats, e.g. parsed from JSON
        else:
            raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _check_count(x, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if int(x) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {int(x)}")
    return int(x)


def _check_n_ranked(n_ranked, lengths) -> np.ndarray:
    """(N,) int64 depths, default m_i - 1 (full rankings); 1 <= L_i <= m_i - 1."""
    if n_ranked is None:
        return lengths - 1
    N = lengths.shape[0]
    nr = _int_array(n_ranked, "n_ranked")
    if nr.shape[0] != N:
        raise ValueError(f"n_ranked: expected {N} entries (one per record), got "
                         f"{nr.shape[0]}")
    bad = np.flatnonzero((nr < 1) | (nr > lengths - 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"n_ranked: record {i} has m={lengths[i]} candidates and "
                         f"n_ranked={nr[i]}; expected 1 <= n_ranked <= m - 1 = "
                         f"{lengths[i] - 1} (m - 1 is a full ranking)")
    return nr


def _annotator_codes(annotator, N: int):
    """(codes (N,) int64 in [0, H), labels (H,)) of annotator ids, or (None, None)."""
    if annotator is None:
        return None, None
    a = np.asarray(annotator)
    if a.ndim != 1 or a.shape[0] != N:
        raise ValueError(f"annotator: expected shape ({N},) (one id per record), got "
                         f"{a.shape}")
    if a.dtype.kind not in "iuUS":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"annotator: expected integer or string ids, got dtype "
                            f"{a.dtype}")
    labels, codes = np.unique(a, return_inverse=True)
    return np.ascontiguousarray(codes.reshape(-1), dtype=np.int64), labels


def _check_sample_weight(sample_weight, N: int) -> Optional[np.ndarray]:
    """(N,) float64 row counts (finite, >= 0, not all 0), or None."""
    if sample_weight is None:
        return None
    sw = _real_vector(sample_weight, "sample_weight", N, "record")
    bad = np.flatnonzero(~np.isfinite(sw) | (sw < 0))
    if bad.size:
        raise ValueError(f"sample_weight: expected finite values >= 0, got "
                         f"{sw[bad[0]]} at index {bad[0]}")
    if not sw.sum() > 0:
        raise ValueError("sample_weight: every weight is 0; nothing to fit")
    return sw


class _RecordSet:
    """What RankingData and PreferenceData share: records as offsets (N+1,) into slots, and
    annotator labels (None: each record its own annotator)."""

    @property
    def n_records(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_annotators(self) -> int:
        return self.n_records if self.annotator is None else int(len(self.annotator_labels))

    @property
    def list_lengths(self) -> np.ndarray:
        """(N,) number of candidates (responses) m_i of each record."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.n_records


class RankingData(_RecordSet):
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
        items = _int_array(items, "items")
        offsets = _int_array(offsets, "offsets")
        M = items.shape[0]
        if offsets.shape[0] < 2:
            raise ValueError(f"offsets: expected N+1 >= 2 entries (at least one record), got "
                             f"{offsets.shape[0]}")
        if offsets[0] != 0:
            raise ValueError(f"offsets: expected offsets[0] == 0, got {offsets[0]}")
        if offsets[-1] != M:
            raise ValueError(f"offsets: expected offsets[-1] == len(items) == {M}, got "
                             f"{offsets[-1]}")
        lengths = np.diff(offsets)
        bad = np.flatnonzero(lengths < 2)
        if bad.size:
            i = int(bad[0])
            if lengths[i] < 0:
                raise ValueError(f"offsets: must be non-decreasing; offsets[{i + 1}] = "
                                 f"{offsets[i + 1]} < offsets[{i}] = {offsets[i]}")
            if lengths[i] == 0:
                raise ValueError(f"offsets: record {i} is empty (offsets[{i}] == offsets[{i + 1}]"
                                 f" == {offsets[i]}); every record needs at least 2 items")
            raise ValueError(f"offsets: record {i} lists a single item ({items[offsets[i]]}); "
                             f"a ranking needs at least 2 candidates")
        N = offsets.shape[0] - 1
        neg = np.flatnonzero(items < 0)
        if neg.size:
            j = int(neg[0])
            raise ValueError(f"items: expected ids >= 0, got {items[j]} at slot {j} "
                             f"(record {self._record_of(offsets, j)})")
        top = int(items.max())
        if n_items is None:
            n_items = top + 1
        else:
            n_items = _check_count(n_items, "n_items", 2)
            if top >= n_items:
                j = int(np.argmax(items >= n_items))
                raise ValueError(f"items: id {items[j]} at slot {j} (record "
                                 f"{self._record_of(offsets, j)}) is out of range for "
                                 f"n_items={n_items}")
        if n_items < 2:
            raise ValueError(f"items: expected at least 2 distinct item ids, got ids up to "
                             f"{top} (n_items={n_items})")
        r, j = _first_repeated_item(items, offsets, n_items)
        if r >= 0:
            first = int(offsets[r] + np.argmax(items[offsets[r]:j] == items[j]))
            raise ValueError(f"items: record {r} lists item {items[j]} twice (slots {first} and "
                             f"{j}); the items of a record must be distinct")
        nr = _check_n_ranked(n_ranked, lengths)
        codes, labels = _annotator_codes(annotator, N)
        sw = _check_sample_weight(sample_weight, N)
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

    @staticmethod
    def _record_of(offsets, slot) -> int:
        return int(np.searchsorted(offsets, slot, side="right") - 1)

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
        return cls(**_build_from_lists(rankings, candidates, n_items=n_items,
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
        return cls(**_read_preflib(os.fspath(path), trailing_tie))

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
        path = os.fspath(path)
        rankings, cands, annot, weights = [], [], [], []
        lines = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                                     f"{type(rec).__name__}")
                unknown = set(rec) - {"annotator", "ranking", "items", "weight"}
                if unknown:
                    raise ValueError(f"{path}:{lineno}: unknown keys {sorted(unknown)}; expected "
                                     f"'ranking' and optionally 'items', 'annotator', 'weight'")
                if "ranking" not in rec:
                    raise ValueError(f"{path}:{lineno}: missing key 'ranking'")
                if not isinstance(rec["ranking"], list):
                    raise ValueError(f"{path}:{lineno}: 'ranking' must be a list, got "
                                     f"{type(rec['ranking']).__name__}")
                if "items" in rec and not isinstance(rec["items"], list):
                    raise ValueError(f"{path}:{lineno}: 'items' must be a list, got "
                                     f"{type(rec['items']).__name__}")
                rankings.append(rec["ranking"])
                cands.append(rec.get("items"))
                a = rec.get("annotator")
                if a is not None and (isinstance(a, bool) or not isinstance(a, (int, str))):
                    raise ValueError(f"{path}:{lineno}: 'annotator' must be a string or an "
                                     f"integer, got {a!r}")
                annot.append(a)
                w = rec.get("weight", 1)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or \
                        not math.isfinite(w) or w < 0:
                    raise ValueError(f"{path}:{lineno}: 'weight' must be a finite number >= 0, "
                                     f"got {w!r}")
                weights.append(float(w))
                lines.append(lineno)
        if not rankings:
            raise ValueError(f"{path}: no records (the file is empty)")
        has = [a is not None for a in annot]
        if any(has) and not all(has):
            i = has.index(not has[0])
            raise ValueError(f"{path}:{lines[i]}: 'annotator' is given on some lines and not on "
                             f"others (line {lines[0]} {'has' if has[0] else 'has none'}); give "
                             f"it on every line or on none")
        if all(has):
            kinds = {type(a) for a in annot}
            if len(kinds) > 1:
                raise ValueError(f"{path}: 'annotator' mixes strings and integers; use one kind")
        fields = _build_from_lists(rankings, cands if any(c is not None for c in cands) else None,
                                   n_items=None, item_names=None,
                                   where=lambda i: f"{path}:{lines[i]}")
        sw = np.asarray(weights)
        return cls(**fields, annotator=np.asarray(annot) if all(has) else None,
                   sample_weight=None if np.all(sw == 1.0) else sw)


# ----------------------------------------------------------------------------------------
# Preference data for policies that compute their own log-probabilities


def _is_tensor(x) -> bool:
    """A torch tensor, told without importing torch (only its own objects can be one)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _take_rows(x, index: np.ndarray):
    """x[index] along the first axis, for a NumPy array or a torch tensor."""
    if _is_tensor(x):
        import torch

        return x.index_select(0, torch.as_tensor(index, device=x.device))
    return np.ascontiguousarray(np.take(x, index, axis=0))


def _host_array(x) -> np.ndarray:
    """A NumPy copy or view of an array or tensor (for fingerprints)."""
    return x.detach().cpu().numpy() if _is_tensor(x) else np.asarray(x)


@dataclass(frozen=True, eq=False)
class GroupedPreferences(GroupedRecords):
    """Grouped :class:`PreferenceData`: :class:`GroupedRecords` plus ``inputs`` (a dict of
    per-slot arrays or tensors, first axis M, in grouped slot order), ``ref_logps`` ((M,)
    float64 or None) and ``features`` ((M, D) float64 or None), permuted the same way."""

    inputs: dict
    ref_logps: Optional[np.ndarray]
    features: Optional[np.ndarray]

    def _fingerprint_parts(self):
        parts = [self.ref_logps, self.features]
        for name in sorted(self.inputs):
            parts += [name, _host_array(self.inputs[name])]
        return super()._fingerprint_parts() + tuple(parts)


class PreferenceData(_RecordSet):
    """Ranked lists of responses for policies that compute their own log-probabilities.

    The layout of :class:`RankingData` (DESIGN.md section 1: record i is one annotator's
    ranking of the m_i >= 2 responses in slots ``offsets[i]:offsets[i+1]``, best first, the
    first ``n_ranked[i]`` positions ordered), but instead of item ids each slot carries model
    inputs: ``inputs`` maps names to arrays or tensors whose first axis has one entry per
    slot (e.g. a prompt id and a response id, or token ids). A policy family computes slot
    log-probabilities from them (see :class:`emdpo_core.TorchPolicies`: by default it calls
    ``module(**inputs)`` on batches of slots).

    Args:
        offsets: (N+1,) record offsets, offsets[0] = 0, offsets[N] = M, every record at
            least 2 slots long.
        inputs: dict name -> NumPy array or torch tensor with first axis M (slots).
        ref_logps: optional (M,) reference log-probabilities of the slots (cached once, as
            DPO trainers do: the reference is frozen). Without them the family computes
            them with its reference policy.
        n_ranked: optional (N,) depths L_i in [1, m_i - 1] (default m_i - 1, full rankings;
            1 = best-of-m choices).
        annotator: optional (N,) annotator ids (integers or strings); default: every record
            its own annotator.
        sample_weight: optional (N,) row counts, as in :class:`RankingData`.
        features: optional (M, D) feature vectors of the slots, used only to initialize the
            EM (k-means on each annotator's preference direction, see
            ``TorchPolicies.annotator_features``).

    Example:
        >>> import numpy as np, emdpo_core as ec
        >>> d = ec.PreferenceData([0, 3, 5], {"prompt": np.array([0, 0, 0, 1, 1]),
        ...                                   "response": np.array([2, 0, 1, 1, 0])},
        ...                       annotator=["a", "a"])
        >>> d.n_records, d.n_annotators, d.n_ranked.tolist()
        (2, 1, [2, 1])
    """

    def __init__(self, offsets, inputs, *, ref_logps=None, n_ranked=None, annotator=None,
                 sample_weight=None, features=None):
        offsets = _int_array(offsets, "offsets")
        if offsets.shape[0] < 2:
            raise ValueError(f"offsets: expected N+1 >= 2 entries (at least one record), got "
                             f"{offsets.shape[0]}")
        if offsets[0] != 0:
            raise ValueError(f"offsets: expected offsets[0] == 0, got {offsets[0]}")
        lengths = np.diff(offsets)
        bad = np.flatnonzero(lengths < 2)
        if bad.size:
            i = int(bad[0])
            if lengths[i] < 0:
                raise ValueError(f"offsets: must be non-decreasing; offsets[{i + 1}] = "
                                 f"{offsets[i + 1]} < offsets[{i}] = {offsets[i]}")
            raise ValueError(f"offsets: record {i} has {lengths[i]} slot(s) (offsets[{i}] = "
                             f"{offsets[i]}, offsets[{i + 1}] = {offsets[i + 1]}); every record "
                             f"needs at least 2 responses")
        M = int(offsets[-1])
        N = offsets.shape[0] - 1
        if not isinstance(inputs, dict) or not inputs:
            raise TypeError(f"inputs: expected a non-empty dict of name -> per-slot array or "
                            f"tensor, got {type(inputs).__name__}")
        checked = {}
        for name, x in inputs.items():
            if not isinstance(name, str):
                raise TypeError(f"inputs: keys must be strings, got {name!r}")
            if not _is_tensor(x):
                x = np.asarray(x)
                if x.dtype == object:
                    raise TypeError(f"inputs[{name!r}]: expected a numeric array or a tensor, "
                                    f"got an object array")
            shape = tuple(x.shape)
            if len(shape) < 1 or shape[0] != M:
                raise ValueError(f"inputs[{name!r}]: expected first axis of length M = "
                                 f"offsets[-1] = {M} (one entry per slot), got shape {shape}")
            checked[name] = x
        if ref_logps is not None:
            ref = _real_vector(ref_logps, "ref_logps", M, "slot")
            bad = np.flatnonzero(~np.isfinite(ref))
            if bad.size:
                raise ValueError(f"ref_logps: expected finite log-probabilities, got "
                                 f"{ref[bad[0]]} at slot {bad[0]} (record "
                                 f"{RankingData._record_of(offsets, int(bad[0]))})")
            ref_logps = ref
        if features is not None:
            f = np.asarray(features)
            if f.dtype.kind not in "fiu":
                raise TypeError(f"features: expected real numbers, got dtype {f.dtype}")
            f = np.ascontiguousarray(f, dtype=np.float64)
            if f.ndim != 2 or f.shape[0] != M:
                raise ValueError(f"features: expected shape ({M}, D) (one row per slot), got "
                                 f"{f.shape}")
            bad = np.flatnonzero(~np.isfinite(f).all(axis=1))
            if bad.size:
                raise ValueError(f"features: expected finite values, row {bad[0]} has "
                                 f"{f[bad[0]].tolist()}")
            features = f
        self.offsets = offsets
        self.inputs = checked
        self.ref_logps = ref_logps
        self.n_ranked = _check_n_ranked(n_ranked, lengths)
        self.annotator, self.annotator_labels = _annotator_codes(annotator, N)
        self.sample_weight = _check_sample_weight(sample_weight, N)
        self.features = features
        self._grouped: Optional[GroupedPreferences] = None

    @property
    def n_slots(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return (f"PreferenceData(n_records={self.n_records}, n_annotators={self.n_annotators}, "
                f"n_slots={self.n_slots}, inputs={sorted(self.inputs)}"
                f"{', ref_logps' if self.ref_logps is not None else ''}"
                f"{', weighted' if self.sample_weight is not None else ''})")

    def grouped(self) -> GroupedPreferences:
        """The records grouped by annotator (computed once, then kept)."""
        if self._grouped is None:
            fields = group_records(self.offsets, self.n_ranked, self.annotator,
                                   self.sample_weight, self.n_annotators)
            so = fields["slot_order"]
            identity = so.shape[0] == 0 or bool(np.all(so == np.arange(so.shape[0])))

            def take(x):
                return x if x is None or identity else _take_rows(x, so)

            self._grouped = GroupedPreferences(
                **fields, inputs={k: take(v) for k, v in self.inputs.items()},
                ref_logps=take(self.ref_logps), features=take(self.features))
        return self._grouped


# ----------------------------------------------------------------------------------------
# Builders


def _build_from_lists(rankings, candidates, *, n_items, item_names, where):
    """Lists of orders (+ candidate sets) -> constructor fields. ``where(i)`` names record i
    in error messages (a list index or a file line)."""
    try:
        n = len(rankings)
    except TypeError:
        raise TypeError(f"rankings: expected a sequence of orders, got "
                        f"{type(rankings).__name__}") from None
    if n == 0:
        raise ValueError("rankings: expected at least one ranking, got none")
    if candidates is not None and len(candidates) != n:
        raise ValueError(f"candidates: expected {n} candidate sets (one per ranking, None for "
                         f"none), got {len(candidates)}")
    # Item labels: all ints, or all strings (names).
    name_to_id = None
    names = None
    if item_names is not None:
        names = [str(x) for x in item_names]
        name_to_id = {nm: i for i, nm in enumerate(names)}
        if len(name_to_id) != len(names):
            raise ValueError("item_names: names must be distinct")
    kind = None

    def to_id(x, i):
        nonlocal kind, names, name_to_id
        if isinstance(x, (bool, np.bool_)):
            raise TypeError(f"{where(i)}: item {x!r} is a boolean; expected an integer id or a "
                            f"name")
        if isinstance(x, (int, np.integer)):
            if kind == "name":
                raise TypeError(f"{where(i)}: item {x!r} is an integer but earlier items are "
                                f"names; use one kind")
            kind = "id"
            x = int(x)
            if x < 0:
                raise ValueError(f"{where(i)}: item id {x} is negative; expected ids >= 0")
            if n_items is not None and x >= n_items:
                raise ValueError(f"{where(i)}: item id {x} is out of range for n_items={n_items}")
            return x
        if isinstance(x, str):
            if kind == "id" and name_to_id is None:
                raise TypeError(f"{where(i)}: item {x!r} is a name but earlier items are integer "
                                f"ids; use one kind")
            kind = "name" if kind is None else kind
            if name_to_id is None:
                name_to_id, names = {}, []
            if x not in name_to_id:
                if item_names is not None:
                    raise ValueError(f"{where(i)}: item {x!r} is not in item_names")
                name_to_id[x] = len(names)
                names.append(x)
            return name_to_id[x]
        raise TypeError(f"{where(i)}: item {x!r} has type {type(x).__name__}; expected an "
                        f"integer id or a string name")

    items, lengths, depths = [], [], []
    for i in range(n):
        ranking = rankings[i]
        if isinstance(ranking, (str, bytes)) or not hasattr(ranking, "__len__"):
            raise TypeError(f"{where(i)}: expected a list of items, got {type(ranking).__name__}")
        ranked = [to_id(x, i) for x in ranking]
        if len(ranked) == 0:
            raise ValueError(f"{where(i)}: empty ranking; every record must rank at least one "
                             f"item")
        dup = _first_repeat(ranked)
        if dup is not None:
            raise ValueError(f"{where(i)}: item {ranking[dup]!r} appears twice in the ranking")
        cand = None if candidates is None else candidates[i]
        if cand is None:
            if len(ranked) == 1:
                raise ValueError(f"{where(i)}: a ranking of one item ({ranking[0]!r}) with no "
                                 f"other candidates carries no information; give its candidate "
                                 f"set (items) or drop it")
            rest = []
        else:
            if isinstance(cand, (str, bytes)) or not hasattr(cand, "__len__"):
                raise TypeError(f"{where(i)}: expected a list of candidate items, got "
                                f"{type(cand).__name__}")
            cids = [to_id(x, i) for x in cand]
            dup = _first_repeat(cids)
            if dup is not None:
                raise ValueError(f"{where(i)}: candidate {cand[dup]!r} appears twice in the "
                                 f"candidate set")
            cset = set(cids)
            missing = [x for x, r in zip(ranking, ranked) if r not in cset]
            if missing:
                raise ValueError(f"{where(i)}: ranked item {missing[0]!r} is not in the candidate "
                                 f"set")
            if len(cids) < 2:
                raise ValueError(f"{where(i)}: the candidate set has {len(cids)} item(s); a "
                                 f"ranking needs at least 2 candidates")
            rset = set(ranked)
            rest = [c for c in cids if c not in rset]
        m = len(ranked) + len(rest)
        items.extend(ranked)
        items.extend(rest)
        lengths.append(m)
        depths.append(min(len(ranked), m - 1))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = np.asarray(items, dtype=np.int64)
    if n_items is None and names is not None:
        n_items = len(names)
    return dict(items=items, offsets=offsets, n_ranked=np.asarray(depths, dtype=np.int64),
                n_items=n_items, item_names=names)


def _first_repeat(ids):
    """Index of the first element equal to an earlier one, else None."""
    seen = set()
    for k, x in enumerate(ids):
        if x in seen:
            return k
        seen.add(x)
    return None


def _split_order(text: str, where: str):
    """'1,2,{3,4},5' -> [[1], [2], [3, 4], [5]] (groups of tied alternatives)."""
    groups, s = [], text.strip()
    if not s:
        return groups
    for part in _top_level_split(s, where):
        part = part.strip()
        if part.startswith("{"):
            if not part.endswith("}"):
                raise ValueError(f"{where}: unbalanced '{{' in {text.strip()!r}")
            inner = part[1:-1].strip()
            members = [p.strip() for p in inner.split(",")] if inner else []
        else:
            members = [part]
        ids = []
        for p in members:
            try:
                ids.append(int(p))
            except ValueError:
                raise ValueError(f"{where}: {p!r} is not an alternative number") from None
        if ids:
            groups.append(ids)
    return groups


def _top_level_split(s: str, where: str):
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            if depth:
                raise ValueError(f"{where}: nested '{{' in {s!r}")
            depth = 1
        elif ch == "}":
            if not depth:
                raise ValueError(f"{where}: unbalanced '}}' in {s!r}")
            depth = 0
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"{where}: unbalanced '{{' in {s!r}")
    parts.append("".join(cur))
    return parts


_PREFLIB_KINDS = (".soc", ".soi", ".toc", ".toi")


def _read_preflib(path: str, trailing_tie: str) -> dict:
    kind = os.path.splitext(path)[1].lower()
    if kind not in _PREFLIB_KINDS:
        raise ValueError(f"{path}: expected a PrefLib file of orders ending in "
                         f"{', '.join(_PREFLIB_KINDS)}, got {kind or 'no extension'!r}")
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    n_alt, names, data_lines = _preflib_header(lines, path)
    if n_alt < 2:
        raise ValueError(f"{path}: {n_alt} alternative(s); rankings need at least 2")
    items, lengths, depths, counts = [], [], [], []
    skipped = 0
    for lineno, line, count_text, order_text in data_lines:
        where = f"{path}:{lineno}"
        try:
            count = int(count_text)
        except ValueError:
            raise ValueError(f"{where}: the count {count_text.strip()!r} is not an "
                             f"integer") from None
        if count < 0:
            raise ValueError(f"{where}: negative count {count}")
        groups = _split_order(order_text, where)
        flat = [a for g in groups for a in g]
        for a in flat:
            if not 1 <= a <= n_alt:
                raise ValueError(f"{where}: alternative {a} is out of range 1..{n_alt}")
        if len(set(flat)) != len(flat):
            dup = next(a for k, a in enumerate(flat) if a in flat[:k])
            raise ValueError(f"{where}: alternative {dup} appears twice in the order")
        ties = [k for k, g in enumerate(groups) if len(g) > 1]
        if ties:
            last = len(groups) - 1
            if trailing_tie == "unranked" and ties == [last]:
                groups = groups[:last]
                # the tied bottom group joins the unranked rest
            else:
                g = groups[ties[0]]
                hint = ("; with trailing_tie='unranked' a tie in the last group is read as the "
                        "unranked rest" if trailing_tie == "reject" and ties[-1] == last
                        and len(ties) == 1 else "")
                raise ValueError(f"{where}: tie {{{','.join(map(str, g))}}}: the Plackett-Luce "
                                 f"model has no ties, so orders with ties are not supported"
                                 f"{hint}")
        ranked = [g[0] - 1 for g in groups]
        if kind == ".soc" and len(ranked) != n_alt:
            raise ValueError(f"{where}: a .soc order must list all {n_alt} alternatives, this one "
                             f"lists {len(ranked)} (is the file an .soi, incomplete orders?)")
        if not ranked:
            skipped += 1
            continue
        if count == 0:
            continue
        rset = set(ranked)
        rest = [a for a in range(n_alt) if a not in rset]
        items.extend(ranked)
        items.extend(rest)
        lengths.append(n_alt)
        depths.append(min(len(ranked), n_alt - 1))
        counts.append(count)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} empty order line(s): an empty order has "
                      f"likelihood 1 under every type and carries no information",
                      UserWarning, stacklevel=3)
    if not lengths:
        raise ValueError(f"{path}: no orders with a positive count")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    counts = np.asarray(counts, dtype=np.float64)
    return dict(items=np.asarray(items, dtype=np.int64), offsets=offsets,
                n_ranked=np.asarray(depths, dtype=np.int64),
                sample_weight=None if np.all(counts == 1) else counts, n_items=n_alt,
                item_names=names)


def _preflib_header(lines, path):
    """(n_alternatives, names or None, [(lineno, line, count, order)])."""
    content = [(k + 1, ln) for k, ln in enumerate(lines) if ln.strip()]
    if not content:
        raise ValueError(f"{path}: the file is empty")
    if content[0][1].lstrip().startswith("#"):
        n_alt, names = None, {}
        data = []
        for lineno, ln in content:
            s = ln.strip()
            if s.startswith("#"):
                key, _, val = s[1:].partition(":")
                key = key.strip().upper()
                if key == "NUMBER ALTERNATIVES":
                    try:
                        n_alt = int(val)
                    except ValueError:
                        raise ValueError(f"{path}:{lineno}: NUMBER ALTERNATIVES {val.strip()!r} "
                                         f"is not an integer") from None
                elif key.startswith("ALTERNATIVE NAME"):
                    try:
                        names[int(key.split()[-1])] = val.strip()
                    except ValueError:
                        pass
                continue
            count, sep, order = s.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'count: a,b,c', got {s!r}")
            data.append((lineno, s, count, order))
        if n_alt is None:
            raise ValueError(f"{path}: no '# NUMBER ALTERNATIVES: n' header line")
    else:
        # Older format: n, then n lines "i,name", then "voters,sum,unique", then "count,a,b,c".
        lineno, first = content[0]
        try:
            n_alt = int(first.strip())
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected the number of alternatives (older "
                             f"PrefLib format) or '#' header lines, got "
                             f"{first.strip()!r}") from None
        if len(content) < n_alt + 2:
            raise ValueError(f"{path}: truncated header: {n_alt} alternatives announced")
        names = {}
        for lineno, ln in content[1:n_alt + 1]:
            idx, _, nm = ln.partition(",")
            try:
                names[int(idx)] = nm.strip()
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'number,name', got {ln.strip()!r}") \
                    from None
        data = []
        for lineno, ln in content[n_alt + 2:]:
            count, sep, order = ln.strip().partition(",")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'count,a,b,c', got {ln.strip()!r}")
            data.append((lineno, ln, count, order))
    name_list = [names.get(a, str(a)) for a in range(1, n_alt + 1)] if names else None
    return n_alt, name_list, data
