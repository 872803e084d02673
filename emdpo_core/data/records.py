"""Records: the layout every data type shares, and their grouping by annotator.

Layout: record i is one annotator's (possibly partial) ranking of m_i >= 2 candidates; its
candidates sit best first in slots ``offsets[i]:offsets[i+1]``; the first
``n_ranked[i] = L_i`` (1 <= L_i <= m_i - 1) positions are ordered, the m_i - L_i candidates
after them are the unranked rest of the candidate set (in any order).

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
from dataclasses import dataclass

import numpy as np

from . import _grouping

__all__ = ["GroupedRecords", "group_records"]


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
        order, ao = _grouping.group_by_annotator(annotator, n_annotators)
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


def first_repeated_item(items, offsets, n_items):
    """(record, slot) of the first item repeated within its record, or (-1, -1)."""
    if n_items <= 4 * items.shape[0] + 1024:
        return _grouping.first_repeated_item(items, offsets, n_items)
    # Sparse ids (n_items far above the number of slots): compact them first, so that no
    # array of size n_items is made.
    _, compact = np.unique(items, return_inverse=True)
    return _grouping.first_repeated_item(compact.reshape(-1).astype(np.int64), offsets,
                                  items.shape[0])


def annotator_codes(annotator, N: int):
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


def record_of(offsets, slot) -> int:
    return int(np.searchsorted(offsets, slot, side="right") - 1)


class RecordSet:
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
