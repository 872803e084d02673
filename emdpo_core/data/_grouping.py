"""Numba routines over the record layout: grouping records by annotator (a stable counting
sort), the first item repeated within a record, and each record's candidate set as a bit mask.
Functions take and return arrays only."""

from __future__ import annotations

import numba
import numpy as np

from .. import _checks


@numba.njit(cache=True, nogil=True)
def _counting_sort(ids, n_groups):
    """Stable counting sort of ids in [0, n_groups): (order, offsets)."""
    n = ids.shape[0]
    offsets = np.zeros(n_groups + 1, dtype=np.int64)
    for i in range(n):
        offsets[ids[i] + 1] += 1
    for h in range(n_groups):
        offsets[h + 1] += offsets[h]
    cursor = offsets[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        h = ids[i]
        order[cursor[h]] = i
        cursor[h] += 1
    return order, offsets


def group_by_annotator(annotator_ids, n_annotators=None):
    """Group records by annotator, keeping the records' order within each annotator.

    Args:
        annotator_ids: (N,) integer ids in [0, H).
        n_annotators: H; default max(annotator_ids) + 1. Annotators without records are
            allowed (their posterior stays the prior).

    Returns:
        (order, annotator_offsets): ``order`` (N,) int64 permutation putting the records in
        annotator order (record ``order[j]`` goes to position j), and ``annotator_offsets``
        (H+1,) int64 so that annotator h owns positions annotator_offsets[h]:
        annotator_offsets[h+1].

    Example:
        >>> import emdpo_core as ec
        >>> order, ao = ec.group_by_annotator([1, 0, 1, 2])
        >>> order.tolist(), ao.tolist()
        ([1, 0, 2, 3], [0, 1, 3, 4])
    """
    a = np.asarray(annotator_ids)
    if a.ndim != 1:
        raise ValueError(f"annotator_ids: expected a 1-D integer array, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("annotator_ids: expected at least one record, got an empty array")
    if a.dtype.kind not in "iu":
        raise TypeError(f"annotator_ids: expected integer ids, got dtype {a.dtype}")
    ids = _checks.as_int64(a, "annotator_ids")
    neg = np.flatnonzero(ids < 0)
    if neg.size:
        raise ValueError(f"annotator_ids: expected ids >= 0, got {ids[neg[0]]} at index {neg[0]}")
    top = int(ids.max())
    # annotator_offsets has H + 1 entries: ids far beyond the number of records would make
    # the cost grow with the largest id instead of with the data
    if n_annotators is None:
        _checks.check_id_bound("annotator_ids", top, ids.shape[0])
        H = top + 1
    else:
        if isinstance(n_annotators, bool) or not isinstance(n_annotators, (int, np.integer)):
            raise TypeError(f"n_annotators: expected an int, got {type(n_annotators).__name__}")
        H = int(n_annotators)   # the caller's count (e.g. the global H of a shard): not bounded
        if top >= H:
            i = int(np.argmax(ids >= H))
            raise ValueError(f"annotator_ids: id {ids[i]} at index {i} is out of range for "
                             f"n_annotators={H}")
    return _counting_sort(ids, H)


# ----------------------------------------------------------------------------------------
# Ranking data checks


@numba.njit(cache=True, nogil=True)
def first_repeated_item(items, offsets, n_items):
    """First (record, slot) whose item already appeared earlier in the same record, else
    (-1, -1). One pass with a stamp array: O(M + n_items)."""
    stamp = np.full(n_items, -1, dtype=np.int64)
    for i in range(offsets.shape[0] - 1):
        for j in range(offsets[i], offsets[i + 1]):
            it = items[j]
            if stamp[it] == i:
                return i, j
            stamp[it] = i
    return -1, -1


@numba.njit(cache=True, nogil=True)
def candidate_set_masks(items, offsets, n_words):
    """(N, n_words) uint64 bitmask of each record's candidate set (exact set identity)."""
    N = offsets.shape[0] - 1
    out = np.zeros((N, n_words), dtype=np.uint64)
    one = np.uint64(1)
    for i in range(N):
        for j in range(offsets[i], offsets[i + 1]):
            it = items[j]
            out[i, it >> 6] |= one << np.uint64(it & 63)
    return out
