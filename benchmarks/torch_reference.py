"""The vectorized PyTorch baseline of the benchmarks. It lives in the package
(emdpo_core/bench/torch_baseline.py) so that `emdpo bench` and these scripts measure against one
copy; this module re-exports it under its old name."""

from emdpo_core.bench.torch_baseline import (PaddedLayout, e_step, listwise_loglik,  # noqa: F401
                                        loss_and_grad, regret_matrix)
