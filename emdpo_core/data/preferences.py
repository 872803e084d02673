"""Preference data for policies that compute their own log-probabilities: records over
per-slot policy inputs (prompts and responses, token ids, ...), grouped by annotator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import _checks
from .records import GroupedRecords, RecordSet, annotator_codes, group_records, record_of

__all__ = ["PreferenceData", "GroupedPreferences"]


def _is_tensor(x) -> bool:
    """A torch tensor, told without importing torch (only its own objects can be one)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _take_rows(x, index: np.ndarray):
    """x[index] along the first axis, for a NumPy array or a torch tensor."""
    if _is_tensor(x):
        import torch

        return x.index_select(0, torch.as_tensor(index, device=x.device))
    return np.ascontiguousarray(np.take(x, index, axis=0))


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
            parts += [name, _checks.to_numpy(self.inputs[name])]
        return super()._fingerprint_parts() + tuple(parts)


class PreferenceData(RecordSet):
    """Ranked lists of responses for policies that compute their own log-probabilities.

    The layout of :class:`RankingData` (docs/math.md: record i is one annotator's
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
        offsets = _checks.index_array(offsets, "offsets", host_tensors=True)
        # The slots are as many as the offsets say; their largest entry stands for M, so that
        # a decreasing entry is reported as one (not as a slot beyond M).
        _checks.check_offsets(offsets, int(offsets.max()) if offsets.size else 0)
        lengths = np.diff(offsets)
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
            ref = _checks.real_vector(ref_logps, "ref_logps", M, "slot")
            bad = np.flatnonzero(~np.isfinite(ref))
            if bad.size:
                raise ValueError(f"ref_logps: expected finite log-probabilities, got "
                                 f"{ref[bad[0]]} at slot {bad[0]} (record "
                                 f"{record_of(offsets, int(bad[0]))})")
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
        nr = _checks.check_n_ranked(n_ranked, offsets, N)
        self.n_ranked = lengths - 1 if nr is None else nr
        self.annotator, self.annotator_labels = annotator_codes(annotator, N)
        self.sample_weight = _checks.check_sample_weight(sample_weight, N)
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
