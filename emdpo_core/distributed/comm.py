"""Communicators: reductions over the ranks of a torch.distributed process group, and
declared sufficient statistics.

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
"""

from __future__ import annotations

import sys
from typing import Dict

import numpy as np

__all__ = ["LocalComm", "TorchComm", "resolve_comm", "Statistics", "check_same"]

# Buffers of at most this many float64 values per rank are all-gathered and summed in rank
# order (latency-bound: one collective); larger ones use the ordered reduce-scatter, whose
# traffic per rank does not grow with the number of ranks.
GATHER_MAX = 4096



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
