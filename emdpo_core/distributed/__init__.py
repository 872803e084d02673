"""EM across processes on torch.distributed (transitional: the whole module in sharding.py)."""

from .sharding import (GATHER_MAX, SHARDINGS, LocalComm, ShardLayout, Statistics, TorchComm,
                       check_same, combine_annotator_loglik, e_step, load_shard, posteriors,
                       resolve_comm, shard, shard_layout, shard_of, take_records)
from .sharding import __all__  # noqa: F401
