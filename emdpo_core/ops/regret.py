"""The regret matrix op: regret of each annotator type under each policy, from cached samples
of every policy (compiled kernel, CPU or CUDA). NumPy entry point here; torch tensors go to
:mod:`emdpo_core.ops._torch`.
"""

from __future__ import annotations

from .. import _checks
from .._checks import REGRET_KINDS
from . import _cpu

__all__ = ["regret_matrix", "REGRET_KINDS"]


def regret_matrix(sample_logps, sample_ref_logps, source_offsets, *, beta, kind="reward",
                  sample_weights=None):
    """Regret of each type under each policy, from cached samples of every policy.

    Samples s of policy j occupy ``source_offsets[j]:source_offsets[j+1]``;
    ``sample_logps[k, s] = log pi_k(y_s | x_s)`` and ``sample_ref_logps[s] = log pi_ref(y_s |
    x_s)``. With the (weighted) mean over policy j's samples written E_j:

        reward:  A[k, j] = E_j[log pi_k - log pi_ref],   R[k, j] = beta (A[k, k] - A[k, j])
                 (the authors' definition: the gap in type k's implicit reward; can be < 0)
        kl:      R[k, j] = beta E_j[log pi_j - log pi_k]   (a Monte-Carlo estimate of
                 beta KL(pi_j || pi_k), the exact loss in type k's KL-regularized value)

    The reduction runs in a compiled kernel accumulating in float64, bitwise identical for any
    number of threads. Non-finite log-probabilities raise a ValueError naming the entry.

    Args:
        sample_logps: (K, S) float32/float64, one row per type, one column per sample.
        sample_ref_logps: (S,) same dtype; required for kind="reward", unused (may be None)
            for kind="kl".
        source_offsets: (K+1,) integers, 0 first, S last; every policy needs >= 1 sample.
        beta: DPO temperature, > 0.
        kind: "reward" or "kl".
        sample_weights: (S,) non-negative weights (e.g. prompt weights or exact probabilities
            for tabular policies), positive sum within each source; default plain means.

    Returns:
        (K, K) float64 array (a float64 tensor on the input's device for torch input).

    Example:
        >>> import numpy as np, emdpo_core as ec
        >>> # 2 types; samples 0-1 come from policy 0, samples 2-3 from policy 1
        >>> lp = np.log([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.8, 0.8]])
        >>> R = ec.regret_matrix(lp, None, [0, 2, 4], beta=1.0, kind="kl")
        >>> R.round(3).tolist()
        [[0.0, 1.386], [1.609, 0.0]]
    """
    if _checks.is_torch(sample_logps):
        from . import _torch

        return _torch.regret_matrix(sample_logps, sample_ref_logps, source_offsets, beta=beta,
                                    kind=kind, sample_weights=sample_weights)
    beta = _checks.check_beta(beta)
    kind_code = _checks.check_kind(kind)
    lp = _checks.float_array(sample_logps, "sample_logps", ndims=(2,))
    K, S = lp.shape
    if K < 1 or S < 1:
        raise ValueError(f"sample_logps: expected shape (K, S) with K >= 1 and S >= 1, got "
                         f"{lp.shape}")
    ref = _checks.check_sample_ref(sample_ref_logps, lp, kind)
    so = _checks.check_source_offsets(_checks.index_array(source_offsets, "source_offsets"), K, S)
    sw = _checks.check_sample_weights(sample_weights, so, S, lp.dtype)
    return _cpu.regret_matrix(lp, ref if kind_code == 0 else None, so, sw, kind_code, beta)


