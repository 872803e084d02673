"""Per-rank data: which rank holds which annotator, and loaders that keep only that.

Each rank keeps the records of the annotators that hash to it (:func:`shard_of`, a stable
hash of the annotator id), so annotators never straddle ranks; records without an annotator
are split into contiguous blocks.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List

import numpy as np

from .comm import resolve_comm

__all__ = ["shard_of", "shard", "take_records", "load_shard"]



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
    from ..data import RankingData
    from ..data.io import json_objects

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
    from ..data import RankingData

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
    from ..data import PreferenceData, RankingData

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
