"""The responsibilities between the E-step and the M-step, where the E-step kernel left them.

A family whose log-probabilities are NumPy arrays (the tabular family) gets its E-step
outputs as NumPy arrays; the engine then builds the M-step weights with the Numba routines of
:mod:`._mixture`. A family whose log-probabilities are torch tensors (TorchPolicies) gets
them as tensors on its device, and they stay there: the (K, N) M-step weights are built with
torch ops on that device, and only K-sized values (type totals, mixture weights, which types
to drop) go to the host per EM iteration; the kernel's O(N) inputs are copied there once
per fit. Both paths do the same float64 arithmetic: the record weights
w_ki = (c_i v_{a_i}) g_{a_i k} are bit for bit the same; type totals after a dropped type
are sums in another order (equal to float64 rounding).

torch is imported only for tensors (``import emdpo_core`` must not import it).
"""

from __future__ import annotations

import numpy as np

from . import _mixture
from .._checks import is_torch as is_tensor

__all__ = ["is_tensor", "as_float64", "GroupedArrays", "type_totals", "keep_types"]


def as_float64(x):
    """A float64 copy or view of an E-step output, where it is (kernels return the policies'
    dtype; the engine's bookkeeping is float64)."""
    if is_tensor(x):
        import torch

        return x.detach().to(torch.float64)
    return np.ascontiguousarray(x, dtype=np.float64)


class GroupedArrays:
    """One grouped data object's arrays where the policies are: the E-step kernel's inputs
    (offsets, ranking depths, annotator offsets, record and annotator weights) and the M-step
    weights w[k, i] = c_i v_{a_i} g_{a_i k} (K, N).

    For NumPy they are the grouped data's own arrays (and Numba builds the weights). For
    tensors on a device they are copied there once per device and reused every iteration: no
    per-iteration copies of O(N) inputs, and the ops layer's checks of index tensors, which it
    remembers per tensor object, run once instead of copying them back to the host to check.
    """

    def __init__(self, grouped):
        self.grouped = grouped
        self._on_device = {}      # device -> dict of tensors

    def _host(self):
        g = self.grouped
        return {"offsets": g.offsets, "n_ranked": g.n_ranked,
                "annotator_offsets": g.annotator_offsets,
                "record_weights": None if g.unit_record_weight else g.record_weight,
                "annotator_weights": None if g.unit_annotator_weight else g.annotator_weight}

    def _tensors(self, device):
        t = self._on_device.get(device)
        if t is None:
            import torch

            g = self.grouped
            counts = np.diff(g.annotator_offsets)
            host = self._host()
            # The record weights' factors c_i v_{a_i}: the same float64 products as
            # expand_record_weights, so w is the same bits on either path.
            host["annotator_of_record"] = np.repeat(np.arange(g.n_annotators), counts)
            host["record_scale"] = g.record_weight * np.repeat(g.annotator_weight, counts)
            t = {k: None if v is None else torch.as_tensor(v, device=device)
                 for k, v in host.items()}
            self._on_device[device] = t
        return t

    def e_step_inputs(self, like) -> dict:
        """Keyword arguments of the E-step kernel besides the log-probabilities and log
        weights, NumPy or on the device of the tensor ``like``."""
        if not is_tensor(like):
            return self._host()
        t = self._tensors(like.device)
        return {k: t[k] for k in ("offsets", "n_ranked", "annotator_offsets",
                                  "record_weights", "annotator_weights")}

    def record_weights(self, resp):
        """(K, N) float64 M-step weights, where resp (H, K) is."""
        g = self.grouped
        if not is_tensor(resp):
            return _mixture.expand_record_weights(resp, g.annotator_offsets, g.record_weight,
                                                  g.annotator_weight)
        import torch

        t = self._tensors(resp.device)
        w = resp.to(torch.float64).t().index_select(1, t["annotator_of_record"])
        return w.mul_(t["record_scale"])


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
