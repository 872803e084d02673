"""Per-rank loading: every rank keeps its annotators' records; the shards add up to the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core import distributed

DATA = Path(__file__).resolve().parent / "data"


def _rows(rng, n=60):
    names = ["apple", "kiwi", "fig", "plum", "pear"]
    out = []
    for i in range(n):
        cand = list(rng.permutation(names)[:rng.integers(2, 6)])
        row = {"annotator": f"a{rng.integers(0, 17)}", "ranking": cand[:max(1, len(cand) - 1)],
               "items": cand}
        if i % 7 == 0:
            row["weight"] = 2.0
        out.append(row)
    return out


def _records(data):
    """Multiset of (annotator, ranked items, rest, weight) with item names."""
    names = data.item_names or [str(i) for i in range(data.n_items)]
    out = []
    for i in range(data.n_records):
        top, rest = data.record(i)
        a = None if data.annotator is None else str(data.annotator_labels[data.annotator[i]])
        w = 1.0 if data.sample_weight is None else float(data.sample_weight[i])
        out.append((a, tuple(names[x] for x in top), tuple(sorted(names[x] for x in rest)), w))
    return sorted(out, key=repr)


def _check_union(shards, whole):
    annots = [set(s.annotator_labels.tolist()) for s in shards if s.annotator is not None]
    for a in range(len(annots)):
        for b in range(a + 1, len(annots)):
            assert not annots[a] & annots[b]          # no annotator straddles ranks
    assert all(s.n_items == whole.n_items for s in shards)
    assert all(s.item_names == whole.item_names for s in shards)
    assert sorted(sum((_records(s) for s in shards), []), key=repr) == _records(whole)


@pytest.mark.parametrize("P", [1, 2, 3])
def test_jsonl_shards_add_up_to_the_file(tmp_path, rng, P):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(rng)) + "\n")
    whole = ec.RankingData.from_jsonl(path)
    shards = [distributed.load_shard(path, rank=r, world_size=P) for r in range(P)]
    _check_union(shards, whole)


def test_parquet_and_dataset_shards(tmp_path, rng):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _rows(rng)
    for r in rows:
        r.setdefault("weight", 1.0)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "r.parquet")
    jl = tmp_path / "r.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    whole = ec.RankingData.from_jsonl(jl)
    _check_union([distributed.load_shard(tmp_path / "r.parquet", rank=r, world_size=2)
                  for r in range(2)], whole)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(rows)
    _check_union([distributed.load_shard(ds, rank=r, world_size=2) for r in range(2)], whole)


def test_preflib_shards_are_contiguous_blocks():
    path = DATA / "00004-00000050.soc"
    whole = ec.RankingData.from_preflib(path)
    shards = [distributed.load_shard(path, rank=r, world_size=3) for r in range(3)]
    assert sum(s.n_records for s in shards) == whole.n_records
    np.testing.assert_array_equal(np.concatenate([s.items for s in shards]), whole.items)


def test_in_memory_shard_and_bad_arguments(rng):
    data = ec.RankingData.from_rankings([[0, 1, 2], [2, 1], [1, 0, 2], [0, 2]],
                                        annotator=["x", "y", "x", "z"])
    parts = [distributed.shard(data, rank=r, world_size=2) for r in range(2)]
    _check_union(parts, data)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size=2"):
        distributed.shard(data, rank=2, world_size=2)
    with pytest.raises(ValueError, match="give both or neither"):
        distributed.shard(data, rank=0)
    with pytest.raises(ValueError, match="cannot tell the format"):
        distributed.load_shard("rankings.txt", rank=0, world_size=1)


def test_load_shard_reads_json_lines_as_from_jsonl_does(tmp_path):
    # One JSON Lines reader for both: a byte-order mark is dropped, a bad line is named by file
    # and line.
    path = tmp_path / "r.jsonl"
    bom = b"\xef\xbb\xbf"
    path.write_bytes(bom + b'{"ranking": [0, 1], "annotator": "a"}\n\n[1, 0]\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:3: expected a JSON object, got list"):
        distributed.load_shard(path, rank=0, world_size=1)
    path.write_bytes(bom + b'{"ranking": [0, 1], "annotator": "a"}\n{"ranking": [1, 0, 2]}\n')
    with pytest.raises(ValueError, match="'annotator' is given on some rows"):
        distributed.load_shard(path, rank=0, world_size=1)
    path.write_bytes(bom + b'{"ranking": [0, 1], "annotator": "a"}\n'
                           b'{"ranking": [2, 0, 1], "annotator": "b"}\n')
    d = distributed.load_shard(path, rank=0, world_size=1)
    assert d.n_records == 2 and d.record(1) == ([2, 0], [1])


def test_docstring_example_of_the_public_e_step_runs():
    import doctest

    from emdpo_core.distributed import sharding

    result = doctest.testmod(sharding, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
