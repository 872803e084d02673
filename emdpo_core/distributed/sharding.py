"""Shard layouts (which annotators each rank holds) and the E-step over the union of the
ranks' records.

Two ways to shard an E-step (chosen by :func:`shard_layout`, ``sharding="auto"``):

- ``"annotator"``: every annotator's records are on one rank. Posteriors are local; per
  iteration only K-sized statistics cross ranks (log-likelihood, per-type totals): about
  8 (K + 2) bytes per rank and reduction.
- ``"record"``: some annotators' records straddle ranks. The partial sums S_hk of the
  straddling annotators (at most (H, K)) are summed across ranks before their posteriors are
  taken: 8 H_shared K bytes per rank per E-step (ring model: 2 (P-1)/P times that on the
  wire). An annotator held by several ranks is counted once, by the lowest of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import to_numpy
from ..ops.listwise import EStepResult
from ..ops.listwise import e_step as _kernel_e_step
from .comm import Statistics, check_same, resolve_comm

__all__ = ["SHARDINGS", "ShardLayout", "shard_layout", "posteriors", "combine_annotator_loglik",
           "e_step"]

SHARDINGS = ("auto", "annotator", "record")



@dataclass
class ShardLayout:
    """How this rank's annotators sit in the union of the shards.

    mode: "single" (one process), "annotator" or "record".
    n_annotators: H of the union (distinct annotators over all ranks).
    global_index: (H_local,) int64 position of each local annotator in the union's order
        (sorted annotator ids; for data without annotator ids, records in rank order).
    owned: (H_local,) bool: this rank counts the annotator in global sums (the lowest rank
        holding it).
    shared_rows: (S_local,) int64 local rows of annotators held by several ranks.
    shared_slot: (S_local,) int64 their positions in the global table of shared annotators.
    n_shared: number of annotators held by several ranks (over all ranks).
    """

    comm: Any
    mode: str
    n_annotators: int
    global_index: np.ndarray
    owned: np.ndarray
    shared_rows: np.ndarray
    shared_slot: np.ndarray
    n_shared: int

    @property
    def all_owned(self) -> bool:
        return bool(self.owned.all())

    def bytes_per_e_step(self, K: int) -> int:
        """Payload bytes per rank that one E-step reduction moves (see the module doc)."""
        if self.mode == "single":
            return 0
        return 8 * (self.n_shared * K + K + 2)


def _label_kind(labels) -> str:
    if labels is None:
        return "none"
    return "str" if np.asarray(labels).dtype.kind in "US" else "int"


def shard_layout(labels, n_annotators_local: int, comm, sharding: str = "auto") -> ShardLayout:
    """The :class:`ShardLayout` of this rank (collective: every rank calls it).

    Args:
        labels: (H_local,) sorted distinct annotator ids of this rank (``annotator_labels``
            of the data), or None when every record is its own annotator (the union is then
            the concatenation of the shards in rank order, and nothing can straddle).
        n_annotators_local: H_local.
        comm: a communicator (:func:`resolve_comm`).
        sharding: "auto", "annotator" (annotators straddling ranks are an error) or "record".

    Cost: the annotator ids are all-gathered once (O(H) bytes, at setup, not per
    iteration).
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding: expected one of {SHARDINGS}, got {sharding!r}")
    H = int(n_annotators_local)
    if comm.world_size == 1:
        idx = np.arange(H, dtype=np.int64)
        return ShardLayout(comm, "single", H, idx, np.ones(H, dtype=bool),
                           np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    kind = _label_kind(labels)
    everyone = comm.gather_objects((kind, H, None if labels is None else np.asarray(labels)))
    kinds = [e[0] for e in everyone]
    if len(set(kinds)) > 1:
        r = next(r for r, k in enumerate(kinds) if k != kinds[0])
        raise ValueError(f"annotator: rank 0 has {_kind_words(kinds[0])} and rank {r} has "
                         f"{_kind_words(kinds[r])}; every rank's data must identify annotators "
                         f"the same way")
    if kind == "none":
        start = sum(e[1] for e in everyone[:comm.rank])
        total = sum(e[1] for e in everyone)
        idx = np.arange(start, start + H, dtype=np.int64)
        return ShardLayout(comm, "annotator", total, idx, np.ones(H, dtype=bool),
                           np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    union = np.unique(np.concatenate([e[2] for e in everyone]))
    per_rank = [np.searchsorted(union, e[2]) for e in everyone]
    counts = np.zeros(union.shape[0], dtype=np.int64)
    first = np.full(union.shape[0], comm.world_size, dtype=np.int64)
    for r in range(comm.world_size - 1, -1, -1):
        counts[per_rank[r]] += 1
        first[per_rank[r]] = r
    idx = per_rank[comm.rank].astype(np.int64)
    shared = np.flatnonzero(counts > 1)
    if shared.size and sharding == "annotator":
        u = int(shared[0])
        ranks = [r for r in range(comm.world_size) if np.any(per_rank[r] == u)]
        raise ValueError(
            f"annotator: id {union[u]!r} has records on ranks {ranks} ({shared.size} annotator(s) "
            f"straddle ranks in all); sharding='annotator' needs every annotator's records on one "
            f"rank: load the shards with emdpo_core.distributed.load_shard / shard_of, or use "
            f"sharding='record' (or 'auto')")
    mode = "record" if (sharding == "record" or shared.size) else "annotator"
    is_shared = counts[idx] > 1
    rows = np.flatnonzero(is_shared).astype(np.int64)
    slots = np.searchsorted(shared, idx[rows]).astype(np.int64)
    return ShardLayout(comm, mode, int(union.shape[0]), idx, first[idx] == comm.rank, rows,
                       slots, int(shared.size))


def _kind_words(kind: str) -> str:
    return {"none": "no annotator ids", "str": "string annotator ids",
            "int": "integer annotator ids"}[kind]


# ----------------------------------------------------------------------------------------
# Combining the E-step of the shards



def posteriors(S, log_weights):
    """(responsibilities, per-row log-likelihood) from partial sums S (R, K)."""
    z = S + log_weights[None, :]
    mx = z.max(axis=1, keepdims=True)
    e = np.exp(z - mx)
    tot = e.sum(axis=1, keepdims=True)
    return e / tot, (mx + np.log(tot))[:, 0]


def combine_annotator_loglik(layout: ShardLayout, S_local, log_weights, annotator_weight=None):
    """Global partial sums, posteriors and log-likelihood from this rank's (H_local, K) S.

    Returns (S (H_local, K) float64 with the shared rows summed over ranks,
    responsibilities (H_local, K), per-annotator log-likelihood (H_local,),
    loglik = sum over owned annotators of v_h logsumexp_k (log eta_k + S_hk), summed over
    ranks). Collective."""
    comm = layout.comm
    S = np.array(to_numpy(S_local), dtype=np.float64, copy=True)
    lw = np.asarray(to_numpy(log_weights), dtype=np.float64).reshape(-1)
    if layout.n_shared:
        table = np.zeros((layout.n_shared, S.shape[1]))
        table[layout.shared_slot] = S[layout.shared_rows]
        S[layout.shared_rows] = comm.sum(table)[layout.shared_slot]
    resp, per = posteriors(S, lw)
    v = np.ones(S.shape[0]) if annotator_weight is None else np.asarray(annotator_weight)
    stats = Statistics().add("loglik", np.dot(v[layout.owned], per[layout.owned]))
    stats.sync(comm)
    return S, resp, per, float(stats["loglik"])


def e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights, *, beta,
           n_ranked=None, record_weights=None, annotator_weights=None,
           return_record_loglik=False, process_group=None, annotator_ids=None,
           sharding="auto") -> EStepResult:
    """Fused E-step: per-record likelihoods, per-annotator sums, posteriors over types; on a
    process group, over the union of the ranks' records.

    Records must be grouped by annotator: records annotator_offsets[h]:annotator_offsets[h+1]
    belong to annotator h (see :func:`emdpo_core.group_by_annotator`). With
    S_hk = sum_i c_i ll_ik:
        log g_hk = log eta_k + S_hk - logsumexp_j (log eta_j + S_hj),
        loglik  = sum_h logsumexp_k (log eta_k + S_hk).
    Arguments and the one-process result as :func:`emdpo_core.ops.e_step` (the compiled
    kernel, which this calls on this rank's records).

    ``process_group``: None = the default group when torch.distributed is initialised with
    several ranks, else this process alone (``LocalComm()``: alone in any case). On a group
    each rank passes its own records (grouped by annotator). How a rank's annotator rows map
    to the union:

    - ``annotator_ids`` (H_local,) given: row h is annotator ``annotator_ids[h]`` (any
      integers or strings, distinct within the rank). Annotators whose records are on
      several ranks have their partial sums S_hk summed across ranks (``sharding`` "auto" or
      "record"; "annotator" raises ValueError for them). The result has this rank's rows.
    - ``annotator_ids=None``, ``sharding`` "auto" or "record": every rank indexes the same
      global annotators 0..H-1 (annotators it has no records of are empty ranges of
      ``annotator_offsets``); the (H, K) partial sums are summed over ranks and every rank
      gets the whole (H, K) result.
    - ``annotator_ids=None``, ``sharding="annotator"``: each rank's annotators are its own
      (not checked); the union stacks them in rank order.

    Returns the :class:`~emdpo_core.EStepResult` of the union restricted to this rank's rows:
    ``loglik`` is the log-likelihood of the union (the same on every rank),
    ``responsibilities`` and ``annotator_loglik`` (this rank's rows, S summed over ranks)
    are float64 NumPy arrays (torch tensors on the input's device for torch input),
    ``record_loglik`` is this rank's records. With no process group (one process) this is
    exactly the one-process E-step.

    Example:
        >>> import numpy as np, emdpo_core as ec
        >>> p = np.log(np.full((2, 6), 0.5)); ref = np.zeros(6)
        >>> r = ec.e_step(p, ref, [0, 3, 6], [0, 2], np.log([0.5, 0.5]), beta=1.0)
        >>> r.responsibilities.round(3).tolist()
        [[0.5, 0.5]]
    """
    comm = resolve_comm(process_group)
    res = _kernel_e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights,
                         beta=beta, n_ranked=n_ranked, record_weights=record_weights,
                         annotator_weights=annotator_weights,
                         return_record_loglik=return_record_loglik)
    if comm.world_size == 1:
        return res
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding: expected one of {SHARDINGS}, got {sharding!r}")
    S_local = to_numpy(res.annotator_loglik)
    H, K = S_local.shape
    check_same(comm, "log_weights", int(K), "K")
    if annotator_ids is not None:
        ids = np.asarray(annotator_ids)
        if ids.shape != (H,):
            raise ValueError(f"annotator_ids: expected shape ({H},) (one id per row of "
                             f"annotator_offsets), got {ids.shape}")
        if ids.dtype.kind not in "iuUS":
            raise TypeError(f"annotator_ids: expected integer or string ids, got dtype "
                            f"{ids.dtype}")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if dup.size:
            raise ValueError(f"annotator_ids: id {sorted_ids[dup[0]]!r} appears twice on rank "
                             f"{comm.rank}; group its records into one row")
        layout = shard_layout(sorted_ids, H, comm, sharding)
        inv = np.empty(H, dtype=np.int64)
        inv[order] = np.arange(H)
        layout = ShardLayout(comm, layout.mode, layout.n_annotators, layout.global_index[inv],
                             layout.owned[inv], order[layout.shared_rows], layout.shared_slot,
                             layout.n_shared)
    elif sharding == "annotator":
        layout = shard_layout(None, H, comm, "annotator")
    else:
        check_same(comm, "annotator_offsets", int(H), "H (annotators)")
        first = comm.rank == 0
        layout = ShardLayout(comm, "record", H, np.arange(H, dtype=np.int64),
                             np.full(H, first), np.arange(H, dtype=np.int64),
                             np.arange(H, dtype=np.int64), H)
    out_resp = np.array(to_numpy(res.responsibilities), dtype=np.float64)
    v = None if annotator_weights is None else np.asarray(to_numpy(annotator_weights),
                                                          dtype=np.float64)
    if layout.mode == "annotator":
        # Local posteriors are final: keep the kernel's values bit for bit; only the
        # log-likelihood and the type totals are summed over ranks.
        S, resp = np.array(S_local, dtype=np.float64), out_resp
        st = Statistics().add("loglik", res.loglik).add("totals", to_numpy(res.type_totals))
        st.sync(comm)
        loglik, totals = float(st["loglik"]), st["totals"]
    else:
        S, resp, _, loglik = combine_annotator_loglik(layout, S_local, log_weights, v)
        rows = layout.shared_rows
        out_resp[rows] = resp[rows]
        resp = out_resp
        w = np.ones(H) if v is None else v
        own = layout.owned
        totals = comm.sum((w[own, None] * resp[own]).sum(axis=0))
    if not isinstance(res.annotator_loglik, np.ndarray):
        import torch

        dev = res.annotator_loglik.device
        resp = torch.as_tensor(resp, device=dev)
        S = torch.as_tensor(S, device=dev)
    return EStepResult(resp, loglik, S, res.record_loglik, totals)
