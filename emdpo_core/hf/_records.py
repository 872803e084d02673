"""The training rows of :class:`~emdpo_core.hf.EMDPOTrainer` as records and slots.

A row (a ranked list: prompt, responses best first, optional ``n_ranked``, ``annotator``,
``weight``) is a record; each response is a slot. :func:`build_layout` reads the rows once
into a :class:`RowLayout` (slot offsets, ranked lengths, annotator index, record weights and
the grouping by annotator the E-step kernel reads); :class:`IndexedRows` hands the rows to
the collator with their ``row_index``, so a batch maps back to its slots (:func:`slots_of`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import group_by_annotator
from . import _io
from .data import validate_ranked_rows

ROW_INDEX = "row_index"
ROW_COLUMNS = ("prompt", "responses", "n_ranked", "annotator", ROW_INDEX)
WEIGHT = "weight"


class IndexedRows(torch.utils.data.Dataset):
    """The user's ranked rows, each given a ``row_index`` (its position) on the way out, so a
    batch can be mapped back to its cached reference log-probabilities and annotators.

    With a ``tokenizer`` (a RankedListCollator), each row is tokenized the first time it is
    read and kept as int32 token arrays (4 bytes a token), so later epochs and E-steps only
    pad: tokenizing every batch again would cost more than the rest of the library's work.
    """

    def __init__(self, rows, tokenizer=None):
        self.rows = rows
        self.tokenizer = tokenizer
        self._tokens = {}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        i = int(i)
        row = self.rows[i]
        if self.tokenizer is None:
            # The columns the collator reads; record weights are looked up by row_index.
            out = {k: v for k, v in row.items() if k in ROW_COLUMNS}
        else:
            tokens = self._tokens.get(i)
            if tokens is None:
                t = self.tokenizer.tokenize_row(row, i)
                tokens = (np.asarray(t["prompt_ids"], dtype=np.int32),
                          [np.asarray(r, dtype=np.int32) for r in t["response_ids"]])
                self._tokens[i] = tokens
            out = {"prompt_ids": tokens[0], "response_ids": tokens[1]}
            if row.get("n_ranked") is not None:
                out["n_ranked"] = row["n_ranked"]
        out[ROW_INDEX] = i
        return out


@dataclass
class RowLayout:
    """Records (rows) and slots (responses) of one data set, with its annotator grouping."""

    offsets: np.ndarray            # (N+1,) slot offsets of the rows
    n_ranked: np.ndarray           # (N,)
    annotator: np.ndarray          # (N,) int annotator index of each row
    annotator_ids: list            # (H,) the data set's ids, in index order
    order: np.ndarray              # (N,) rows grouped by annotator
    annotator_offsets: np.ndarray  # (H+1,)
    grouped_slots: np.ndarray      # (M,) slots in grouped row order
    grouped_offsets: np.ndarray    # (N+1,)
    lengths: np.ndarray            # (N,) characters of prompt + responses (batching order)
    record_weights: np.ndarray     # (N,) c_i, the rows' ``weight`` column or ones

    @property
    def n_rows(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def n_slots(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_annotators(self) -> int:
        return len(self.annotator_ids)

    def fingerprint(self) -> list:
        return [self.n_rows, self.n_slots, self.n_annotators,
                _io.sha256(self.offsets.tobytes() + self.n_ranked.tobytes()
                           + self.annotator.tobytes() + self.record_weights.tobytes())]


def _text_size(x) -> int:
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        return len(str(x.get("content", "")))
    return sum(_text_size(v) for v in x)


def _annotator_index(raw_ids):
    """Map hashable annotator ids to 0..H-1: sorted order when the ids sort, else first
    appearance. Returns (index (N,), ids (H,))."""
    uniq = list(dict.fromkeys(raw_ids))
    try:
        uniq = sorted(uniq)
    except TypeError:
        pass
    where = {a: h for h, a in enumerate(uniq)}
    return np.array([where[a] for a in raw_ids], dtype=np.int64), uniq


def build_layout(rows, name: str) -> RowLayout:
    n = validate_ranked_rows(rows)
    lengths = np.empty(n, dtype=np.int64)
    n_ranked = np.empty(n, dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    raw = []
    weights = np.ones(n)
    has_annotator = None
    has_weight = None
    for i in range(n):
        row = rows[i]
        m = len(row["responses"])
        lengths[i] = m
        L = row.get("n_ranked")
        n_ranked[i] = m - 1 if L is None else int(L)
        sizes[i] = _text_size(row["prompt"]) + _text_size(row["responses"])
        if has_annotator is None:
            has_annotator = "annotator" in row
            has_weight = row.get(WEIGHT) is not None
        if has_weight:
            w = row.get(WEIGHT)
            if isinstance(w, bool) or not isinstance(w, (int, float, np.floating,
                                                         np.integer)) \
                    or not math.isfinite(float(w)) or w < 0:
                raise ValueError(f"{name}: row {i} has {WEIGHT}={w!r}; record weights must be "
                                 f"finite numbers >= 0")
            weights[i] = float(w)
        # Without an annotator column every row is its own annotator (validate_ranked_rows
        # warned about it).
        raw.append(row["annotator"] if has_annotator else ("row", i))
    annotator, ids = _annotator_index(raw)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    order, annotator_offsets = group_by_annotator(annotator, len(ids))
    grouped_slots = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])
    grouped_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=grouped_offsets[1:])
    if not has_annotator:
        ids = list(range(n))
    return RowLayout(offsets=offsets, n_ranked=n_ranked, annotator=annotator, annotator_ids=ids,
                     order=order, annotator_offsets=annotator_offsets,
                     grouped_slots=grouped_slots, grouped_offsets=grouped_offsets,
                     lengths=sizes, record_weights=weights)


def ranked_pairs(layout: RowLayout):
    """(hi, lo) slot indices of every ordered pair of a ranking: position t < L_i against
    every slot s > t of the same row (the pairs a ranking asserts)."""
    hi, lo = [], []
    for i in range(layout.n_rows):
        a, m, L = int(layout.offsets[i]), int(layout.offsets[i + 1] - layout.offsets[i]), \
            int(layout.n_ranked[i])
        for t in range(L):
            for s in range(t + 1, m):
                hi.append(a + t)
                lo.append(a + s)
    return np.array(hi, dtype=np.int64), np.array(lo, dtype=np.int64)


def slots_of(batch, layout_or_offsets) -> torch.Tensor:
    """(M_b,) global slot index of each slot of a batch, from its rows' indices."""
    offsets = (layout_or_offsets.offsets if isinstance(layout_or_offsets, RowLayout)
               else layout_or_offsets)
    offsets = torch.as_tensor(offsets)
    rows = batch[ROW_INDEX].to(offsets.device)
    b_off = batch["offsets"].to(offsets.device)
    lengths = b_off[1:] - b_off[:-1]
    shift = offsets[rows] - b_off[:-1]
    return torch.repeat_interleave(shift, lengths) + torch.arange(int(b_off[-1]),
                                                                  device=offsets.device)
