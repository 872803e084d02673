"""Argument preparation of the torch loss layer (:mod:`emdpo_core.torch`): tensors, shapes,
dtypes and devices of its arguments, each checked once, with errors naming the argument.

Layout checks (offsets, n_ranked) and value checks (finite log-probabilities) happen in the
dispatch layer (``ops/_torch.py``), with the same messages as the NumPy API. Imports torch.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _checks

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_DEVICE_TYPES = ("cpu", "cuda")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    return type(x).__name__


def require_policy_tensor(x, name: str) -> torch.Tensor:
    _checks.refuse_sparse(x, name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor, got {_describe(x)}; for NumPy arrays use "
            f"emdpo_core.listwise_dpo_loss_and_grad")
    if x.device.type not in _DEVICE_TYPES:
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {x.device}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}")
    return x


def as_tensor(x, name: str, device: torch.device, exact_floats: bool = False) -> torch.Tensor:
    """x as a tensor on ``device``. exact_floats: Python floats become float64 (torch alone
    reads them as its default dtype, float32: weights of a float64 policy rounded, 1e-50 read
    as 0); set where the values end up in float64 or are checked before a cast."""
    _checks.refuse_sparse(x, name)
    if isinstance(x, torch.Tensor):
        if x.device != device:
            raise ValueError(
                f"{name}: on {x.device}, but policy_logps is on {device}; put all inputs on "
                f"one device")
        return x
    try:
        if exact_floats and not isinstance(x, np.ndarray):
            x = np.asarray(x)
        return torch.as_tensor(x, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected a tensor or array, got {_describe(x)} "
                        f"({_checks.clip_message(e)})") from None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels run in float32 or float64: half types are upcast to float32."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def prepare_logps(policy_logps, ref_logps):
    """(policy, ref, loss dtype): policy cast to the computation dtype (differentiably), ref
    cast and detached."""
    policy = require_policy_tensor(policy_logps, "policy_logps")
    ref = as_tensor(ref_logps, "ref_logps", policy.device,
                    exact_floats=policy.dtype == torch.float64)
    if not ref.dtype.is_floating_point:
        raise TypeError(f"ref_logps: expected a floating-point tensor, got {ref.dtype}")
    out_dtype = torch.promote_types(policy.dtype, ref.dtype)
    dtype = _compute_dtype(out_dtype)
    return policy.to(dtype), ref.detach().to(dtype), out_dtype


def as_index(x, name: str, device: torch.device) -> torch.Tensor:
    t = as_tensor(x, name, device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (int64), got {t.dtype}")
    if t.dtype != torch.int64:
        # every integer type is read as int64 here, once (the backward's index arithmetic
        # needs int64: uint8 offsets used to pass the forward and fail in the backward)
        if not t.dtype.is_signed and t.element_size() == 8 and t.numel():
            _checks.as_int64(t.cpu().numpy(), name)        # uint64 beyond int64
        t = t.to(torch.int64)
    return t


def prepare_weights(weights, policy: torch.Tensor, N: int) -> Optional[torch.Tensor]:
    """None, (N,) or (K, N) in the computation dtype, detached; (N,) is shared by all K
    policies of a (K, M) ``policy``."""
    if weights is None:
        return None
    w = as_tensor(weights, "weights", policy.device, exact_floats=True)  # cast to policy's
    if w.dtype.is_complex:
        raise TypeError(f"weights: expected real numbers, got {w.dtype}")
    K = policy.shape[0] if policy.dim() == 2 else 1
    shapes = [(N,)] + ([(K, N)] if policy.dim() == 2 else [])
    if tuple(w.shape) not in shapes:
        raise ValueError(
            f"weights: expected shape {' or '.join(map(str, shapes))} (per record"
            f"{', per policy' if policy.dim() == 2 else ''}), got {tuple(w.shape)}")
    w = w.detach().to(policy.dtype)
    if policy.dim() == 2 and w.dim() == 1:
        w = w.expand(K, N)
    return w


def prepare_total_weight(total_weight, reduction, policy: torch.Tensor) -> Optional[torch.Tensor]:
    """None, or the divisors T_k of the "weighted_mean" reduction: shape (K,) for a (K, M)
    ``policy`` (a number is shared by all K), () for an (M,) one; detached, in float64.
    Checked on the host: finite and > 0 (one tiny device-to-host copy on CUDA)."""
    if total_weight is None:
        return None
    if _checks.check_reduction(reduction) != "weighted_mean":
        raise ValueError(f"total_weight: only with reduction='weighted_mean' (it is that "
                         f"reduction's divisor, in place of the weights' own total), got "
                         f"reduction={reduction!r}")
    t = as_tensor(total_weight, "total_weight", policy.device, exact_floats=True)
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"total_weight: expected real numbers > 0, got {t.dtype}")
    K = policy.shape[0] if policy.dim() == 2 else None
    shapes = [()] + ([(K,)] if K is not None else [(1,)])
    if tuple(t.shape) not in shapes:
        raise ValueError(f"total_weight: expected shape {' or '.join(map(str, shapes))} (a "
                         f"number{', or one per policy' if K is not None else ''}), got "
                         f"{tuple(t.shape)}")
    host = t.detach().reshape(-1).to("cpu", torch.float64)
    bad = torch.nonzero(~torch.isfinite(host) | (host <= 0))
    if bad.numel():
        i = int(bad[0, 0])
        where = "" if t.dim() == 0 else f" at index {i}"
        raise ValueError(f"total_weight: expected finite numbers > 0 (each policy's total "
                         f"weight over all records), got {host[i].item()}{where}")
    # float64, as given: the caller divides the weights by it in float64 (a T below the
    # normal range of a float32 computation, e.g. a collapsed type's clamped total times a
    # minibatch's share, would lose its digits or become 0 in float32).
    t = t.detach().to(torch.float64)
    return t.reshape(()) if K is None else t.expand(K)


def n_records(offsets: torch.Tensor) -> int:
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(
            f"offsets: expected a 1-D tensor of N+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    return offsets.shape[0] - 1



def check_columns(names, tensors):
    first = tensors[0]
    if first.dim() != 1 or first.shape[0] < 1:
        raise ValueError(f"{names[0]}: expected shape (B,) with B >= 1, got {tuple(first.shape)}")
    for name, t in zip(names[1:], tensors[1:]):
        if tuple(t.shape) != tuple(first.shape):
            raise ValueError(
                f"{name}: expected shape {tuple(first.shape)} like {names[0]}, got "
                f"{tuple(t.shape)}")



def check_lengths(lengths: torch.Tensor, B: int, m_max: int) -> bool:
    """Checks 2 <= lengths[i] <= m_max; returns True when every list is full (no padding)."""
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths: expected shape ({B},) (one per row), got "
                         f"{tuple(lengths.shape)}")
    if lengths.device.type == "cpu":
        # NumPy's integer min/max are ~50x faster than torch's on CPU (measured, 1M int64).
        host = lengths.numpy()
        lo, hi = int(host.min()), int(host.max())
    else:
        lo, hi = torch.stack(torch.aminmax(lengths)).tolist()  # one pass, one tiny host copy
    if lo < 2 or hi > m_max:
        host = lengths.cpu()
        i = int(torch.nonzero((host < 2) | (host > m_max))[0, 0])
        raise ValueError(
            f"lengths: expected 2 <= lengths[i] <= m_max = {m_max}, got lengths[{i}] = "
            f"{int(host[i])}")
    return lo == m_max

