"""Argument checks shared by every layer, written once.

Each raises ValueError/TypeError naming the argument, what was expected and what was given
(the first offending index for array contents). NumPy only: torch tensors are recognized by
their type's module, so nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import _core

REDUCTIONS = ("sum", "mean", "weighted_mean", "none")
REGRET_KINDS = ("reward", "kl")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_torch(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and type(x).__name__ in ("Tensor", "Parameter")


def describe(x) -> str:
    if is_torch(x):
        return f"torch tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise TypeError(f"beta: expected a positive real number, got {type(beta).__name__}")
    b = float(beta)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta: expected a finite number > 0, got {b!r}")
    return b


def float_array(x, name: str, ndims=(1,)) -> np.ndarray:
    """A C-contiguous float32/float64 array (no copy when already one)."""
    if is_torch(x):
        raise TypeError(f"{name}: got a {describe(x)}; mix of torch and NumPy inputs")
    a = np.asarray(x)
    if a.dtype not in _FLOAT_DTYPES:
        if a.dtype.kind in "iub" or a.dtype == object or a.dtype.kind in "USV":
            raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {a.dtype}")
        if a.dtype.kind == "f":  # float16 / longdouble: compute in float64 or float32
            a = a.astype(np.float32 if a.dtype.itemsize < 4 else np.float64)
        else:
            raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {a.dtype}")
    if a.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected a {want} array, got shape {a.shape}")
    return np.ascontiguousarray(a)


def index_array(x, name: str) -> np.ndarray:
    """A C-contiguous int64 1-D array; int32 and other integer types are converted."""
    if is_torch(x):
        raise TypeError(f"{name}: got a {describe(x)}; mix of torch and NumPy inputs")
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            pass  # integral floats (e.g. from JSON) are accepted
        elif a.size:
            raise TypeError(f"{name}: expected an integer array (int64), got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: values exceed int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def check_offsets(offsets: np.ndarray, M: int) -> int:
    """Record offsets: (N+1,), 0 first, M last, every list at least 2 long. Returns N."""
    if offsets.shape[0] < 2:
        raise ValueError(
            f"offsets: expected at least 2 entries (N+1 for N >= 1 records), got "
            f"{offsets.shape[0]}; there are no records")
    bad = _core.first_bad_offset(offsets, M, 2)
    if bad >= 0:
        if bad == 0 and offsets[0] != 0:
            raise ValueError(f"offsets: expected offsets[0] == 0, got {offsets[0]}")
        if offsets[bad] > M:
            raise ValueError(
                f"offsets: entry {bad} is {offsets[bad]}, beyond the number of slots M={M}")
        if bad == offsets.shape[0] - 1 and offsets[bad] != M and offsets[bad] >= offsets[bad - 1] + 2:
            raise ValueError(
                f"offsets: expected offsets[-1] == M == {M} (the number of slots), "
                f"got {offsets[-1]}")
        raise ValueError(
            f"offsets: every list needs at least 2 responses, so offsets must increase by >= 2; "
            f"record {bad - 1} spans offsets[{bad - 1}]={offsets[bad - 1]} to "
            f"offsets[{bad}]={offsets[bad]}")
    return offsets.shape[0] - 1


def check_n_ranked(n_ranked, offsets: np.ndarray, N: int) -> Optional[np.ndarray]:
    if n_ranked is None:
        return None
    nr = index_array(n_ranked, "n_ranked")
    if nr.shape[0] != N:
        raise ValueError(f"n_ranked: expected {N} entries (one per record), got {nr.shape[0]}")
    bad = _core.first_bad_n_ranked(nr, offsets)
    if bad >= 0:
        m = offsets[bad + 1] - offsets[bad]
        raise ValueError(
            f"n_ranked: expected 1 <= n_ranked[i] <= m_i - 1; record {bad} has m={m} "
            f"responses and n_ranked={nr[bad]}")
    return nr


def check_layout(offsets, n_ranked, M: int):
    """Record layout over M slots: (offsets (N+1,) int64, n_ranked (N,) int64 or None)."""
    offsets = index_array(offsets, "offsets")
    N = check_offsets(offsets, M)
    return offsets, check_n_ranked(n_ranked, offsets, N)


def check_annotator_offsets(annotator_offsets, N: int) -> np.ndarray:
    ao = index_array(annotator_offsets, "annotator_offsets")
    if ao.shape[0] < 2:
        raise ValueError(
            f"annotator_offsets: expected H+1 >= 2 entries, got {ao.shape[0]}")
    bad = _core.first_bad_offset(ao, N, 0)
    if bad >= 0:
        if bad == 0:
            raise ValueError(f"annotator_offsets: expected annotator_offsets[0] == 0, got {ao[0]}")
        if ao[bad] < ao[bad - 1]:
            raise ValueError(
                f"annotator_offsets: must be non-decreasing; entry {bad} is {ao[bad]} < "
                f"entry {bad - 1} = {ao[bad - 1]}")
        raise ValueError(
            f"annotator_offsets: must cover the records 0..N with N={N}; entry {bad} is {ao[bad]} "
            f"(the last entry must equal N)")
    return ao


def check_log_weights(log_weights, K: int) -> np.ndarray:
    if is_torch(log_weights):
        log_weights = log_weights.detach().cpu().numpy()
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1) if np.ndim(log_weights) <= 1 else None
    if lw is None:
        raise ValueError(f"log_weights: expected shape ({K},), got {np.shape(log_weights)}")
    if lw.shape[0] != K:
        raise ValueError(f"log_weights: expected shape ({K},) (one per type), got {lw.shape}")
    bad = np.flatnonzero(np.isnan(lw) | (lw == np.inf))
    if bad.size:
        raise ValueError(
            f"log_weights: expected finite values or -inf, got {lw[bad[0]]} at index {bad[0]}")
    if not np.any(np.isfinite(lw)):
        raise ValueError("log_weights: every type has weight zero (all -inf)")
    return np.ascontiguousarray(lw)


def real_vector(x, name: str, size: int, per: str, dtype=np.float64) -> np.ndarray:
    """A C-contiguous (size,) array of real numbers (a torch tensor is copied to the host);
    TypeError/ValueError naming the argument otherwise. Value checks stay with the caller."""
    if is_torch(x):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected real numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=dtype)
    if a.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},) (one per {per}), got {a.shape}")
    return a


def check_record_weights(w, N: int, dtype, name="record_weights") -> Optional[np.ndarray]:
    if w is None:
        return None
    a = real_vector(w, name, N, "record", dtype)
    bad = np.flatnonzero(~np.isfinite(a) | (a < 0))
    if bad.size:
        raise ValueError(
            f"{name}: expected finite values >= 0, got {a[bad[0]]} at index {bad[0]}")
    return a


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_int(name, x, minimum):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x}")
    return int(x)


def check_float(name, x, minimum, *, strict=False):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} "
                         f"{minimum}, got {x}")
    return x


def int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            pass  # integral floats, e.g. parsed from JSON
        else:
            raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def check_depths(n_ranked, lengths) -> np.ndarray:
    """(N,) int64 depths, default m_i - 1 (full rankings); 1 <= L_i <= m_i - 1."""
    if n_ranked is None:
        return lengths - 1
    N = lengths.shape[0]
    nr = int_array(n_ranked, "n_ranked")
    if nr.shape[0] != N:
        raise ValueError(f"n_ranked: expected {N} entries (one per record), got "
                         f"{nr.shape[0]}")
    bad = np.flatnonzero((nr < 1) | (nr > lengths - 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"n_ranked: record {i} has m={lengths[i]} candidates and "
                         f"n_ranked={nr[i]}; expected 1 <= n_ranked <= m - 1 = "
                         f"{lengths[i] - 1} (m - 1 is a full ranking)")
    return nr


def check_sample_weight(sample_weight, N: int) -> Optional[np.ndarray]:
    """(N,) float64 row counts (finite, >= 0, not all 0), or None."""
    if sample_weight is None:
        return None
    sw = real_vector(sample_weight, "sample_weight", N, "record")
    bad = np.flatnonzero(~np.isfinite(sw) | (sw < 0))
    if bad.size:
        raise ValueError(f"sample_weight: expected finite values >= 0, got "
                         f"{sw[bad[0]]} at index {bad[0]}")
    if not sw.sum() > 0:
        raise ValueError("sample_weight: every weight is 0; nothing to fit")
    return sw


def policy_and_ref(policy_logps, ref_logps):
    p = float_array(policy_logps, "policy_logps", ndims=(1, 2))
    one = p.ndim == 1
    if one:
        p = p[None, :]
    if p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"policy_logps: expected shape (K, M) with K >= 1 and M >= 2, got {p.shape}")
    ref = float_array(ref_logps, "ref_logps")
    if ref.shape[0] != p.shape[1]:
        raise ValueError(
            f"ref_logps: expected shape ({p.shape[1]},) to match policy_logps' M={p.shape[1]}, "
            f"got {ref.shape}")
    if ref.dtype != p.dtype:
        raise TypeError(
            f"ref_logps: dtype {ref.dtype} does not match policy_logps' dtype {p.dtype}; "
            f"pass both as float32 or both as float64")
    return p, ref, one


def check_loss_weights(weights, K: int, N: int, dtype, one: bool) -> Optional[np.ndarray]:
    if weights is None:
        return None
    if is_torch(weights):
        raise TypeError(f"weights: got a {describe(weights)}; mix of torch and NumPy inputs")
    a = np.asarray(weights)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"weights: expected real numbers, got dtype {a.dtype}")
    want = [(N,), (K, N)] if K == 1 else [(K, N)]
    if a.shape not in want:
        raise ValueError(
            f"weights: expected shape {' or '.join(map(str, want))} (per record"
            f"{'' if K == 1 else ', per type'}), got {a.shape}")
    a = np.ascontiguousarray(a.reshape(K, N), dtype=dtype)
    bad = np.flatnonzero(~np.isfinite(a.reshape(-1)))
    if bad.size:
        k, i = divmod(int(bad[0]), N)
        raise ValueError(f"weights: expected finite values, got {a[k, i]} at index "
                         f"{i if one else (k, i)}")
    return a


def check_kind(kind) -> int:
    if kind not in REGRET_KINDS:
        raise ValueError(f"kind: expected one of {REGRET_KINDS}, got {kind!r}")
    return REGRET_KINDS.index(kind)


def check_sample_ref(sample_ref_logps, lp: np.ndarray, kind: str):
    if sample_ref_logps is None:
        if kind == "reward":
            raise ValueError("sample_ref_logps: required for kind='reward' (the implicit reward "
                             "is beta * (log pi_k - log pi_ref)); got None")
        return None
    ref = float_array(sample_ref_logps, "sample_ref_logps")
    if ref.shape[0] != lp.shape[1]:
        raise ValueError(f"sample_ref_logps: expected shape ({lp.shape[1]},) to match "
                         f"sample_logps' S={lp.shape[1]}, got {ref.shape}")
    if ref.dtype != lp.dtype:
        raise TypeError(f"sample_ref_logps: dtype {ref.dtype} does not match sample_logps' dtype "
                        f"{lp.dtype}; pass both as float32 or both as float64")
    return ref


def check_source_offsets(so: np.ndarray, K: int, S: int) -> np.ndarray:
    if so.shape[0] != K + 1:
        raise ValueError(f"source_offsets: expected K+1 = {K + 1} entries (one source policy per "
                         f"row of sample_logps), got {so.shape[0]}")
    bad = _core.first_bad_offset(so, S, 1)
    if bad >= 0:
        if bad == 0:
            raise ValueError(f"source_offsets: expected source_offsets[0] == 0, got {so[0]}")
        if so[bad] > S:
            raise ValueError(f"source_offsets: entry {bad} is {so[bad]}, beyond the number of "
                             f"samples S={S}")
        if so[bad] <= so[bad - 1]:
            raise ValueError(
                f"source_offsets: every policy needs at least one sample, so the offsets must "
                f"increase; policy {bad - 1} spans source_offsets[{bad - 1}]={so[bad - 1]} to "
                f"source_offsets[{bad}]={so[bad]}")
        raise ValueError(f"source_offsets: expected source_offsets[-1] == S == {S} (the number "
                         f"of samples), got {so[-1]}")
    return so


def check_sample_weights(sample_weights, so: np.ndarray, S: int, dtype):
    if sample_weights is None:
        return None
    if is_torch(sample_weights):
        raise TypeError(f"sample_weights: got a {describe(sample_weights)}; mix of torch and "
                        f"NumPy inputs")
    a = np.asarray(sample_weights)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"sample_weights: expected real numbers, got dtype {a.dtype}")
    if a.shape != (S,):
        raise ValueError(f"sample_weights: expected shape ({S},) (one per sample), got {a.shape}")
    a64 = a.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(a64) | (a64 < 0))
    if bad.size:
        raise ValueError(f"sample_weights: expected finite values >= 0, got {a64[bad[0]]} at "
                         f"index {bad[0]}")
    # A sum of non-negative numbers is positive iff one of them is, whatever the order.
    positive = np.add.reduceat((a64 > 0).astype(np.int64), so[:-1])
    empty = np.flatnonzero(positive == 0)
    if empty.size:
        j = int(empty[0])
        raise ValueError(f"sample_weights: the samples of policy {j} (source_offsets[{j}]="
                         f"{so[j]} to {so[j + 1]}) all have weight 0; each policy needs a "
                         f"positive total weight")
    w = np.ascontiguousarray(a64.astype(dtype))
    if dtype == np.float32 and np.any(np.add.reduceat((w > 0).astype(np.int64), so[:-1]) == 0):
        raise ValueError("sample_weights: weights underflow to 0 in float32; pass float64 "
                         "log-probabilities or rescale the weights")
    return w
