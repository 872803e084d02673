"""EM across processes on torch.distributed: reductions, shard layouts, the sharded E-step.

Records are split across the ranks of a torch.distributed process group (gloo on CPU, NCCL on
GPU; launched by ``torchrun`` or ``accelerate launch``). Every rank holds its own records and
computes its own partial sums with the compiled kernels; this module combines them. Nothing
here imports torch until a process group is actually used: the single-process path is the
same code with a no-op communicator (:class:`LocalComm`).

Sufficient statistics know their reduction (as torchmetrics' states do):

    stats = Statistics()
    stats.add("loglik", local_loglik)             # reduce="sum" (default) or "max"
    stats.add("type_totals", local_type_totals)   # (K,)
    stats.sync(comm)                              # one collective per reduction kind
    stats["loglik"]                               # the global value, the same on every rank

Sums are deterministic: the partial sums of the ranks are added in rank order (rank 0 + rank 1
+ ...), in float64, by every rank alike, so every rank ends with bitwise the same value, and
rerunning with the same number of ranks and the same shards gives bitwise the same value
(an ``all_reduce`` leaves the order of additions to the backend's algorithm). Small buffers
are all-gathered and summed; large ones go through an ordered reduce-scatter (one
``all_to_all`` + rank-order sums of 1/P of the buffer on each rank + ``all_gather``), which
moves the same 2 (P-1)/P bytes per rank as a ring ``all_reduce``.

Two ways to shard an E-step (chosen by :func:`shard_layout`, ``sharding="auto"``):

- ``"annotator"``: every annotator's records are on one rank. Posteriors are local; per
  iteration only K-sized statistics cross ranks (log-likelihood, per-type totals): about
  8 (K + 2) bytes per rank and reduction.
- ``"record"``: some annotators' records straddle ranks. The partial sums S_hk of the
  straddling annotators (at most (H, K)) are summed across ranks before their posteriors are
  taken: 8 H_shared K bytes per rank per E-step (ring model: 2 (P-1)/P times that on the
  wire). An annotator held by several ranks is counted once, by the lowest of them.

Per-rank loading (:func:`load_shard`, :func:`shard_of`): each rank keeps the records of the
annotators that hash to it (a stable hash of the annotator id), so annotators never straddle
ranks; records without an annotator are split into contiguous blocks.

See docs/distributed.md for launching, the communication volume and measured scaling.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from ._checks import to_numpy
from .ops.listwise import EStepResult
from .ops.listwise import e_step as _kernel_e_step

__all__ = [
    "LocalComm",
    "TorchComm",
    "Statistics",
    "ShardLayout",
    "resolve_comm",
    "shard_layout",
    "e_step",
    "shard_of",
    "shard",
    "take_records",
    "load_shard",
    "SHARDINGS",
]

SHARDINGS = ("auto", "annotator", "record")
# Buffers of at most this many float64 values per rank are all-gathered and summed in rank
# order (latency-bound: one collective); larger ones use the ordered reduce-scatter, whose
# traffic per rank does not grow with the number of ranks.
GATHER_MAX = 4096


# ----------------------------------------------------------------------------------------
# Communicators


class LocalComm:
    """One process, no communication: every reduction returns its input.

    ``bytes_sent`` / ``calls`` count what a multi-process run would move (zero here)."""

    rank = 0
    world_size = 1
    distributed = False

    def __init__(self):
        self.calls = 0
        self.payload_bytes = 0
        self.wire_bytes = 0

    def sum(self, x: np.ndarray) -> np.ndarray:
        """Sum of ``x`` over the ranks (float64), the same bits on every rank."""
        return np.array(x, dtype=np.float64, copy=True)

    def max(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=np.float64, copy=True)

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for setup only)."""
        return [obj]

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def barrier(self) -> None:
        pass

    def sum_tensor(self, t):
        """Sum of a torch tensor over the ranks, on its device and in its dtype."""
        return t

    def broadcast_tensors(self, tensors, src: int = 0) -> None:
        """Overwrite each tensor with rank ``src``'s, in place."""

    def reset_counters(self) -> None:
        self.calls = self.payload_bytes = self.wire_bytes = 0


class TorchComm(LocalComm):
    """Reductions over a torch.distributed process group (gloo, NCCL, or any backend with
    ``all_gather_into_tensor``/``all_to_all_single``).

    Counters: ``calls`` collectives, ``payload_bytes`` the bytes this rank put in, and
    ``wire_bytes`` what the standard algorithms move per rank for them (ring all-gather:
    (P-1) x payload; ordered reduce-scatter + all-gather: 2 (P-1)/P x payload)."""

    distributed = True

    def __init__(self, group=None):
        super().__init__()
        import torch
        import torch.distributed as dist

        self._torch, self._dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def _tensor(self, a: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.device)

    def _gather(self, flat: np.ndarray) -> np.ndarray:
        """(P, n): every rank's flat buffer, on every rank."""
        P, n = self.world_size, flat.shape[0]
        out = self._torch.empty(P * n, dtype=self._torch.float64, device=self.device)
        self._dist.all_gather_into_tensor(out, self._tensor(flat), group=self.group)
        self.calls += 1
        self.payload_bytes += 8 * n
        self.wire_bytes += 8 * n * (P - 1)
        return out.cpu().numpy().reshape(P, n)

    def sum(self, x) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.size == 0:
            return a.copy()
        return self._ordered_sum(self._tensor(a.reshape(-1))).cpu().numpy().reshape(a.shape)

    def sum_tensor(self, t):
        flat = t.detach().reshape(-1)
        if flat.device != self.device:
            flat = flat.to(self.device)
        return self._ordered_sum(flat).to(t.device).reshape(t.shape)

    def _ordered_sum(self, flat):
        """Rank-order sum of a 1-d tensor on self.device (see the module doc)."""
        torch, dist, P = self._torch, self._dist, self.world_size
        n, size = flat.shape[0], flat.element_size()
        if n <= GATHER_MAX:
            out = torch.empty(P * n, dtype=flat.dtype, device=self.device)
            dist.all_gather_into_tensor(out, flat.contiguous(), group=self.group)
            parts = out.view(P, n)
            acc = parts[0].clone()
            for r in range(1, P):
                acc += parts[r]
            self.calls += 1
            self.payload_bytes += size * n
            self.wire_bytes += size * n * (P - 1)
            return acc
        # Ordered reduce-scatter: rank r receives chunk r of every rank (all_to_all), adds
        # them in rank order, then the summed chunks are all-gathered.
        chunk = -(-n // P)
        padded = torch.zeros(chunk * P, dtype=flat.dtype, device=self.device)
        padded[:n] = flat
        recv = torch.empty_like(padded)
        dist.all_to_all_single(recv, padded, group=self.group)
        parts = recv.view(P, chunk)
        acc = parts[0].clone()
        for r in range(1, P):
            acc += parts[r]
        out = torch.empty_like(padded)
        dist.all_gather_into_tensor(out, acc, group=self.group)
        self.calls += 2
        self.payload_bytes += size * chunk * P
        self.wire_bytes += 2 * size * chunk * (P - 1)
        return out[:n]

    def broadcast_tensors(self, tensors, src: int = 0) -> None:
        for t in tensors:
            if t.device == self.device:
                self._dist.broadcast(t.data, group=self.group, group_src=src)
            else:
                tmp = t.detach().to(self.device)
                self._dist.broadcast(tmp, group=self.group, group_src=src)
                t.data.copy_(tmp.to(t.device))
            self.calls += 1

    def sum_unordered(self, x) -> np.ndarray:
        """Sum by ``all_reduce`` (the backend's order of additions): for the benchmark's
        comparison with the ordered :meth:`sum`."""
        a = np.asarray(x, dtype=np.float64)
        t = self._tensor(a.reshape(-1))
        self._dist.all_reduce(t, group=self.group)
        self.calls += 1
        self.payload_bytes += 8 * a.size
        self.wire_bytes += 2 * 8 * a.size * (self.world_size - 1) // self.world_size
        return t.cpu().numpy().reshape(a.shape)

    def max(self, x) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.size == 0:
            return a.copy()
        return self._gather(a.reshape(-1)).max(axis=0).reshape(a.shape)

    def gather_objects(self, obj) -> list:
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        self.calls += 1
        return out

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        self._dist.broadcast_object_list(box, group=self.group, group_src=src)
        self.calls += 1
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)


def _dist_module():
    """torch.distributed if torch is already imported, else None (never imports torch)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def resolve_comm(process_group=None):
    """The communicator for ``process_group``.

    None: the default process group when torch.distributed is initialised with more than one
    rank, else :class:`LocalComm` (one process; torch is not imported for this). A process
    group object: that group (torch.distributed must be initialised). A communicator is
    returned as it is: ``LocalComm()`` means this process alone even when a group exists.
    """
    if isinstance(process_group, LocalComm):
        return process_group
    dist = _dist_module()
    if process_group is None:
        if dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
            return TorchComm(None)
        return LocalComm()
    if dist is None or not dist.is_initialized():
        raise RuntimeError(
            "process_group: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun and accelerate launch "
            "set the environment for it), or pass process_group=None for one process")
    ProcessGroup = getattr(dist, "ProcessGroup", None)
    if ProcessGroup is not None and not isinstance(process_group, ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    return TorchComm(process_group)


# ----------------------------------------------------------------------------------------
# Declared sufficient statistics


class Statistics:
    """Named statistics, each declared with its reduction across ranks ("sum" or "max").

    :meth:`sync` packs every statistic of one reduction kind into one float64 buffer, reduces
    it with one collective, and unpacks; with one process it changes nothing. Values come back
    as float64 NumPy arrays of their declared shapes (scalars as 0-d arrays; ``float()``
    them)."""

    REDUCTIONS = ("sum", "max")

    def __init__(self):
        self._values: Dict[str, np.ndarray] = {}
        self._reduce: Dict[str, str] = {}

    def add(self, name: str, value, reduce: str = "sum") -> "Statistics":
        if reduce not in self.REDUCTIONS:
            raise ValueError(f"reduce: expected one of {self.REDUCTIONS}, got {reduce!r}")
        self._values[name] = np.asarray(value, dtype=np.float64)
        self._reduce[name] = reduce
        return self

    def __getitem__(self, name: str) -> np.ndarray:
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def sync(self, comm) -> "Statistics":
        if comm.world_size == 1:
            return self
        for kind in self.REDUCTIONS:
            names = [n for n in self._values if self._reduce[n] == kind]
            if not names:
                continue
            flat = np.concatenate([self._values[n].reshape(-1) for n in names])
            red = comm.sum(flat) if kind == "sum" else comm.max(flat)
            start = 0
            for n in names:
                shape = self._values[n].shape
                size = int(np.prod(shape, dtype=np.int64))
                self._values[n] = red[start:start + size].reshape(shape)
                start += size
        return self


# ----------------------------------------------------------------------------------------
# Shard layouts: which annotators each rank holds


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


def check_same(comm, name: str, value, what: str) -> None:
    """Raise ValueError on every rank unless ``value`` is the same on every rank."""
    if comm.world_size == 1:
        return
    values = comm.gather_objects(value)
    for r, v in enumerate(values):
        if v != values[0]:
            raise ValueError(f"{name}: rank 0 has {what}={values[0]!r} but rank {r} has "
                             f"{what}={v!r}; every rank must fit the same model on the same "
                             f"{'items' if 'item' in what else 'model'}")


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


# ----------------------------------------------------------------------------------------
# Per-rank data: which rank holds which annotator, and loaders that keep only that


def _stable_hash(x) -> int:
    """A hash of an annotator id that is the same in every process (Python's hash() of a
    string is salted per process)."""
    if isinstance(x, (bytes, bytearray)):
        b = bytes(x)
    elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        b = b"i" + str(int(x)).encode()
    else:
        b = b"s" + str(x).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


def shard_of(annotator_ids, world_size: int) -> np.ndarray:
    """(N,) int64 rank of each record: a stable hash of its annotator id modulo world_size,
    so every annotator's records land on one rank (the "annotator" sharding), whatever the
    order of the records or the process that computes it."""
    P = int(world_size)
    if P < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size}")
    ids = np.asarray(annotator_ids)
    if ids.ndim != 1:
        raise ValueError(f"annotator_ids: expected a 1-d array, got shape {ids.shape}")
    uniq, inv = np.unique(ids, return_inverse=True)
    ranks = np.array([_stable_hash(u.item() if hasattr(u, "item") else u) % P for u in uniq],
                     dtype=np.int64)
    return ranks[inv.reshape(-1)] if uniq.size else np.zeros(0, dtype=np.int64)


def _block(n: int, rank: int, world_size: int):
    """[start, stop) of rank's contiguous block of n records (sizes differ by at most 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _rank_and_size(rank, world_size, process_group):
    if rank is not None and world_size is not None:
        r, P = int(rank), int(world_size)
    elif rank is None and world_size is None:
        comm = resolve_comm(process_group)
        r, P = comm.rank, comm.world_size
    else:
        raise ValueError("rank/world_size: give both or neither (neither: from the process "
                         "group)")
    if P < 1 or not 0 <= r < P:
        raise ValueError(f"rank: expected 0 <= rank < world_size={P}, got {r}")
    return r, P


def load_shard(source, *, rank=None, world_size=None, process_group=None, format=None,
               annotator_column: str = "annotator", ranking_column: str = "ranking",
               items_column: str = "items", weight_column: str = "weight", n_items=None,
               item_names=None):
    """This rank's shard of a ranking source, as a :class:`~emdpo_core.RankingData`.

    Records with an annotator id go to ``shard_of(id, world_size)`` (annotators never
    straddle ranks); records without one (e.g. PrefLib ballots, which stand for their own
    voters) are split into contiguous blocks in file order. Item ids are the same on every
    rank: integer items keep their ids; string items are numbered in order of first
    appearance in the whole source (every rank reads the names of the whole source, and
    the records of its shard only). Give ``n_items`` (or ``item_names``) so that every rank
    agrees on the item count even when a shard misses the last items.

    Args:
        source: a path (.jsonl / .json, PrefLib .soc/.soi/.toc/.toi, .parquet), or a
            ``datasets.Dataset`` (rows with ``ranking_column`` and optionally
            ``items_column``, ``annotator_column``, ``weight_column``).
        rank, world_size: this rank and the number of ranks (default: the process group's).
        format: "jsonl", "preflib", "parquet" or "dataset" (default: from the suffix / type).
    """
    from .data import RankingData
    from .data.io import json_objects

    r, P = _rank_and_size(rank, world_size, process_group)
    fmt = format or _guess_format(source)
    if fmt == "preflib":
        full = RankingData.from_preflib(source)
        return shard(full, rank=r, world_size=P)
    if fmt == "jsonl":
        rows = (rec for _, rec in json_objects(source))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(os.fspath(source)).to_pylist()
    elif fmt == "dataset":
        rows = source
    else:
        raise ValueError(f"format: expected 'jsonl', 'preflib', 'parquet' or 'dataset', got "
                         f"{fmt!r}")
    return _rows_shard(rows, r, P, annotator_column, ranking_column, items_column,
                       weight_column, n_items, item_names, str(getattr(source, "__fspath__",
                                                                       lambda: "dataset")()))


def _guess_format(source) -> str:
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "column_names") and hasattr(source, "select"):
            return "dataset"
        raise TypeError(f"source: expected a path or a datasets.Dataset, got "
                        f"{type(source).__name__}")
    s = os.fspath(source).lower()
    if s.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if s.endswith((".soc", ".soi", ".toc", ".toi")):
        return "preflib"
    if s.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"source: cannot tell the format of {os.fspath(source)!r} from its suffix; "
                     f"pass format='jsonl', 'preflib' or 'parquet'")


def _rows_shard(rows, r, P, acol, rcol, icol, wcol, n_items, item_names, where):
    from .data import RankingData

    names: Dict[Any, int] = {} if item_names is None else \
        {str(x): i for i, x in enumerate(item_names)}
    string_items = None
    keep_rank, keep_items, keep_annot, keep_w = [], [], [], []
    annot_ids: List[Any] = []
    n_rows = 0
    for j, rec in enumerate(rows):
        n_rows += 1
        if rcol not in rec or not isinstance(rec[rcol], (list, tuple)):
            raise ValueError(f"{where}: row {j}: expected a list under {rcol!r}")
        ranking = list(rec[rcol])
        cands = rec.get(icol)
        every = ranking + ([] if cands is None else list(cands))
        if every:
            is_str = isinstance(every[0], str)
            if string_items is None:
                string_items = is_str
            elif string_items != is_str:
                raise ValueError(f"{where}: row {j}: items mix names and integer ids")
            if is_str and item_names is None:
                for x in every:
                    if x not in names:
                        names[x] = len(names)
        a = rec.get(acol)
        annot_ids.append(a)
        keep_rank.append(ranking)
        keep_items.append(None if cands is None else list(cands))
        keep_w.append(rec.get(wcol, 1))
    has = [a is not None for a in annot_ids]
    if any(has) and not all(has):
        raise ValueError(f"{where}: row {has.index(not has[0])}: {acol!r} is given on some rows "
                         f"and not on others")
    if n_rows == 0:
        raise ValueError(f"{where}: no records")
    if all(has):
        mine = np.flatnonzero(shard_of(np.asarray(annot_ids), P) == r)
    else:
        a, b = _block(n_rows, r, P)
        mine = np.arange(a, b)
    if mine.size == 0:
        raise ValueError(f"{where}: rank {r} of {P} gets no records; use fewer ranks or more "
                         f"annotators")
    rankings = [keep_rank[i] for i in mine]
    cands = [keep_items[i] for i in mine]
    if string_items and item_names is None:
        item_names = list(names)      # every rank numbers the names of the whole source alike
    w = np.asarray([float(keep_w[i]) for i in mine])
    return RankingData.from_rankings(
        rankings, cands if any(c is not None for c in cands) else None,
        annotator=np.asarray([annot_ids[i] for i in mine]) if all(has) else None,
        sample_weight=None if np.all(w == 1.0) else w, n_items=n_items,
        item_names=item_names if string_items else None)


def take_records(data, rows):
    """A RankingData or PreferenceData of the records ``rows`` (int indices, in that order):
    their slots, depths, annotator ids (the original ids), weights and per-slot arrays."""
    from .data import PreferenceData, RankingData

    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.diff(data.offsets)[rows]
    starts = data.offsets[:-1][rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    slots = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    annot = None if data.annotator is None else data.annotator_labels[data.annotator[rows]]
    sw = None if data.sample_weight is None else data.sample_weight[rows]
    if isinstance(data, RankingData):
        return RankingData(data.items[slots], offsets, data.n_ranked[rows], annotator=annot,
                           sample_weight=sw, n_items=data.n_items, item_names=data.item_names)
    if isinstance(data, PreferenceData):
        def take(x):
            if x is None:
                return None
            if hasattr(x, "detach"):              # a torch tensor: index on its device
                import torch

                return x[torch.as_tensor(slots, device=x.device)]
            return np.asarray(x)[slots]

        return PreferenceData(offsets, {k: take(v) for k, v in data.inputs.items()},
                              ref_logps=take(data.ref_logps), n_ranked=data.n_ranked[rows],
                              annotator=annot, sample_weight=sw, features=take(data.features))
    raise TypeError(f"data: expected a RankingData or a PreferenceData, got "
                    f"{type(data).__name__}")


def shard(data, *, rank=None, world_size=None, process_group=None):
    """This rank's records of an in-memory RankingData or PreferenceData: the records of the
    annotators that :func:`shard_of` sends here (annotators never straddle ranks), or a
    contiguous block of records when the data has no annotator ids. The union of the ranks'
    shards is the data (records of each annotator in their original order)."""
    r, P = _rank_and_size(rank, world_size, process_group)
    N = data.n_records
    if data.annotator is not None:
        rows = np.flatnonzero(shard_of(data.annotator_labels[data.annotator], P) == r)
    else:
        a, b = _block(N, r, P)
        rows = np.arange(a, b)
    if rows.size == 0:
        raise ValueError(f"data: rank {r} of {P} gets no records; use fewer ranks")
    return take_records(data, rows)
