"""The EM engine's view of a process group: global sums over the shards of a fit.

See :mod:`emdpo_core.distributed` for the communicators, shard layouts and why sums are added
in rank order.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from .._checks import to_numpy
from ..distributed import LocalComm, ShardLayout, posteriors, resolve_comm, shard_layout
from . import _mixture, _responsibilities

__all__ = ["EMShards"]


class EMShards:
    """The EM engine's view of the process group during a fit: the global counterparts of the
    per-rank quantities (posteriors, log-likelihood, type totals, annotator and record totals,
    the data fingerprint). With one process every method is the one-process computation, bit
    for bit; with several, the sums over annotators count each annotator once (on the lowest
    rank holding it) and are added in rank order, so every rank gets the same bits.
    """

    def __init__(self, comm=None, layout: Optional[ShardLayout] = None):
        self.comm = comm if comm is not None else LocalComm()
        self.layout = layout

    @classmethod
    def for_data(cls, data, grouped, process_group=None, sharding: str = "auto") -> "EMShards":
        """Collective: the shards of ``data`` (its ``annotator_labels`` identify annotators
        across ranks; data without annotator ids stack in rank order)."""
        comm = resolve_comm(process_group)
        labels = getattr(data, "annotator_labels", None) \
            if getattr(data, "annotator", None) is not None else None
        return cls(comm, shard_layout(labels, grouped.n_annotators, comm, sharding))

    @property
    def distributed(self) -> bool:
        return self.comm.world_size > 1

    @property
    def is_writer(self) -> bool:
        """This rank writes files (checkpoints, models): rank 0."""
        return self.comm.rank == 0

    def _owned(self, a):
        lay = self.layout
        return a if lay is None or lay.all_owned else a[lay.owned]

    def combine(self, resp, S, loglik, totals, log_weights, annotator_weight):
        """(responsibilities (H_local, K) float64, loglik of the union, type totals (K,) of
        the union, S (H_local, K) with the shared rows summed) from this rank's E-step kernel
        output: its posteriors, partial sums S, weighted log-likelihood and type totals.

        Responsibilities and S stay where the kernel left them (torch tensors on the
        policies' device stay there) unless annotators straddle ranks or some rows belong to
        another rank: then their rows are summed or dropped on the host. Only the K type
        totals and the log-likelihood go to the host otherwise (and, with several processes,
        through one collective). One process: the kernel's values as they are."""
        totals = np.asarray(to_numpy(totals), dtype=np.float64)
        lay = self.layout
        if not self.distributed or (lay.all_owned and not lay.n_shared):
            resp = _responsibilities.as_float64(resp)
            if not self.distributed:
                return resp, float(loglik), totals, S
        else:
            resp, S = _responsibilities.as_float64(to_numpy(resp)), to_numpy(S)
            lw = np.asarray(log_weights, dtype=np.float64)
            if lay.n_shared:
                S = np.array(S, dtype=np.float64)
                table = np.zeros((lay.n_shared, S.shape[1]))
                table[lay.shared_slot] = S[lay.shared_rows]
                S[lay.shared_rows] = self.comm.sum(table)[lay.shared_slot]
                resp[lay.shared_rows] = posteriors(S[lay.shared_rows], lw)[0]
            # Each annotator counted once, by its lowest rank, with its summed S.
            own = lay.owned
            loglik, _ = _mixture.weighted_loglik(np.ascontiguousarray(S[own]), lw,
                                                 np.ascontiguousarray(annotator_weight[own]))
            totals = _mixture.type_totals(np.ascontiguousarray(resp[own]),
                                          np.ascontiguousarray(annotator_weight[own]))
        K = resp.shape[1]
        flat = self.comm.sum(np.concatenate([[float(loglik)], totals]))
        return resp, float(flat[0]), flat[1:1 + K], S

    def mixture_weights(self, resp, annotator_weight, alpha):
        """(K,) mixture weights of the union from responsibilities (NumPy or, for a torch
        family, a tensor on its device: then only the K type totals come to the host)."""
        if not self.distributed and not _responsibilities.is_tensor(resp):
            return _mixture.mixture_weights(resp, annotator_weight, alpha)
        totals = _responsibilities.type_totals(self._owned(resp),
                                               self._owned(annotator_weight))
        if self.distributed:
            totals = self.comm.sum(totals)
        return _mixture.weights_from_totals(totals, alpha)

    def annotator_total(self, grouped) -> float:
        """sum_h v_h over the union's annotators."""
        if not self.distributed:
            return grouped.annotator_total
        return float(self.comm.sum(np.float64(self._owned(grouped.annotator_weight).sum())))

    def total_weight(self, grouped) -> float:
        """sum_i c_i v_{a_i} over the union's records."""
        if not self.distributed:
            return grouped.total_weight
        return float(self.comm.sum(np.float64(grouped.total_weight)))

    def n_annotators(self, grouped) -> int:
        return grouped.n_annotators if self.layout is None else self.layout.n_annotators

    def fingerprint(self, grouped) -> str:
        """The data's fingerprint; with several ranks, a hash of every rank's in rank order
        (a checkpoint resumes only on the same shards on the same number of ranks)."""
        fp = grouped.fingerprint()
        if not self.distributed:
            return fp
        every = self.comm.gather_objects(fp)
        return hashlib.sha256(("|".join(every) + f"|ranks={len(every)}").encode()).hexdigest()

    def gather_rows(self, X, weight):
        """(X, weight) of every annotator of the union in its order, on every rank, from this
        rank's rows (for the k-means start; O(H D) per rank). A straddling annotator's row is
        the one of its lowest rank."""
        if not self.distributed:
            return X, weight
        lay = self.layout
        own = lay.owned
        parts = self.comm.gather_objects((lay.global_index[own], X[own], weight[own]))
        Xg = np.empty((lay.n_annotators, X.shape[1]))
        wg = np.empty(lay.n_annotators)
        for idx, x, w in parts:
            Xg[idx] = x
            wg[idx] = w
        return Xg, wg

    def broadcast_seed(self, seed: int) -> int:
        return int(self.comm.broadcast_object(int(seed))) if self.distributed else seed
