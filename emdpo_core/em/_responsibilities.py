"""The responsibilities between the E-step and the M-step, where the E-step kernel left them.

A family whose log-probabilities are NumPy arrays (the tabular family) gets its E-step
outputs as NumPy arrays; the engine then builds the M-step weights with the Numba routines of
:mod:`._mixture`. A family whose log-probabilities are torch tensors (TorchPolicies) gets
them as tensors on its device, and they stay there: the (K, N) M-step weights are built with
torch ops on that device, and only K-sized values (type totals, mixture weights, which types
to drop) go to the host per EM iteration. Both paths do the same float64 arithmetic: the
record weights w_ki = (c_i v_{a_i}) g_{a_i k} are bit for bit the same; type totals after a
dropped type are sums in another order (equal to float64 rounding).

torch is imported only for tensors (``import emdpo_core`` must not import it).
"""

from __future__ import annotations

import numpy as np

from . import _mixture
from .._checks import is_torch as is_tensor

__all__ = ["is_tensor", "as_float64", "RecordWeights", "type_totals", "keep_types"]


def as_float64(x):
    """A float64 copy or view of an E-step output, where it is (kernels return the policies'
    dtype; the engine's bookkeeping is float64)."""
    if is_tensor(x):
        import torch

        return x.detach().to(torch.float64)
    return np.ascontiguousarray(x, dtype=np.float64)


class RecordWeights:
    """The M-step weights w[k, i] = c_i v_{a_i} g_{a_i k} (K, N) of one grouped data object,
    built where the responsibilities g (H, K) are: NumPy -> Numba on the host; a tensor -> on
    its device, from c_i v_{a_i} and the annotator of every record, moved to each device once.
    """

    def __init__(self, grouped):
        self.grouped = grouped
        self._on_device = {}      # device -> (annotator of each record, c_i v_{a_i})

    def __call__(self, resp):
        g = self.grouped
        if not is_tensor(resp):
            return _mixture.expand_record_weights(resp, g.annotator_offsets, g.record_weight,
                                                  g.annotator_weight)
        import torch

        cached = self._on_device.get(resp.device)
        if cached is None:
            counts = np.diff(g.annotator_offsets)
            annotator = np.repeat(np.arange(g.n_annotators), counts)
            # The same float64 product c_i * v_{a_i} as expand_record_weights, so w is the
            # same bits on either path.
            scale = g.record_weight * np.repeat(g.annotator_weight, counts)
            cached = (torch.as_tensor(annotator, device=resp.device),
                      torch.as_tensor(scale, dtype=torch.float64, device=resp.device))
            self._on_device[resp.device] = cached
        annotator, scale = cached
        w = resp.to(torch.float64).t().index_select(1, annotator)
        return w.mul_(scale)


def type_totals(resp, annotator_weight) -> np.ndarray:
    """(K,) sum_h v_h g_hk on the host (the only value that comes back from a device)."""
    if not is_tensor(resp):
        return _mixture.type_totals(np.ascontiguousarray(resp, dtype=np.float64),
                                    np.ascontiguousarray(annotator_weight))
    import torch

    v = torch.as_tensor(np.asarray(annotator_weight, dtype=np.float64), device=resp.device)
    return (v[:, None] * resp.to(torch.float64)).sum(dim=0).cpu().numpy()


def keep_types(resp, keep: np.ndarray, fill: np.ndarray):
    """The responsibilities of the types ``keep`` only, each row renormalized; a row with no
    weight left on them (an annotator wholly of dropped types) becomes ``fill`` (K_kept,), the
    kept types' weights. Where resp is, without a synchronisation on a device."""
    if not is_tensor(resp):
        resp = np.ascontiguousarray(resp[:, keep])
        rows = resp.sum(axis=1, keepdims=True)
        empty = rows[:, 0] <= 1e-300
        resp /= np.where(empty[:, None], 1.0, rows)
        if empty.any():
            resp[empty] = fill
        return resp
    import torch

    dev = resp.device
    resp = resp.index_select(1, torch.as_tensor(keep, device=dev))
    rows = resp.sum(dim=1, keepdim=True)
    empty = rows <= 1e-300
    fill = torch.as_tensor(np.asarray(fill, dtype=np.float64), dtype=resp.dtype, device=dev)
    return torch.where(empty, fill[None, :], resp / torch.where(empty, 1.0, rows))
