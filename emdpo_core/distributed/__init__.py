"""EM across processes on torch.distributed: reductions, shard layouts, the sharded E-step.

Records are split across the ranks of a torch.distributed process group (gloo on CPU, NCCL on
GPU; launched by ``torchrun`` or ``accelerate launch``). Every rank holds its own records and
computes its own partial sums with the compiled kernels; this package combines them. Nothing
here imports torch until a process group is actually used: the single-process path is the
same code with a no-op communicator (:class:`LocalComm`).

- ``comm``: the communicators (:class:`LocalComm`, :class:`TorchComm`,
  :func:`resolve_comm`), rank-order sums, declared sufficient statistics
  (:class:`Statistics`) and :func:`check_same`;
- ``sharding``: shard layouts (:class:`ShardLayout`, :func:`shard_layout`) and the sharded
  E-step (:func:`e_step`, the public ``emdpo_core.e_step``);
- ``loading``: which rank holds which annotator (:func:`shard_of`) and loaders that keep
  only that (:func:`load_shard`, :func:`shard`, :func:`take_records`).

See docs/distributed.md for launching, the communication volume and measured scaling.
"""

# Also the names other modules import that are not in __all__ (check_same, posteriors,
# combine_annotator_loglik, GATHER_MAX): every name of the former single module keeps its path.
from .comm import GATHER_MAX, LocalComm, Statistics, TorchComm, check_same, resolve_comm
from .loading import load_shard, shard, shard_of, take_records
from .sharding import (SHARDINGS, ShardLayout, combine_annotator_loglik, e_step, posteriors,
                       shard_layout)

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
