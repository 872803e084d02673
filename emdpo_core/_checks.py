"""Argument checks shared by every layer, written once.

Each raises ValueError/TypeError naming the argument, what was expected and what was given
(the first offending index for array contents). NumPy only: torch tensors are recognized by
their type's module, so nothing here imports torch.
"""

from __future__ import annotations

import math
import reprlib
from typing import Optional

import numpy as np

from . import _core

REDUCTIONS = ("sum", "mean", "weighted_mean", "none")
REGRET_KINDS = ("reward", "kl")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_I64_MAX = int(np.iinfo(np.int64).max)


def is_torch(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and type(x).__name__ in ("Tensor", "Parameter")


def describe(x) -> str:
    if is_torch(x):
        return f"torch tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def to_numpy(x) -> np.ndarray:
    """x as a NumPy array: an array as it is, a torch tensor (or subclass) detached and copied
    to the host, anything else through ``np.asarray``."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise TypeError(f"beta: expected a positive real number, got {type(beta).__name__}")
    b = float(beta)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta: expected a finite number > 0, got {b!r}")
    return b


def float_array(x, name: str, ndims=(1,)) -> np.ndarray:
    """A C-contiguous float32/float64 array (no copy when already one)."""
    refuse_sparse(x, name)
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


def index_array(x, name: str, *, host_tensors: bool = False) -> np.ndarray:
    """A C-contiguous int64 1-D array; int32 and other integer types are converted, and so are
    integral floats (e.g. parsed from JSON). A torch tensor is refused (a kernel argument must
    not mix torch and NumPy) unless ``host_tensors``, then it is copied to the host."""
    if is_torch(x):
        refuse_sparse(x, name)
        if not host_tensors:
            raise TypeError(f"{name}: got a {describe(x)}; mix of torch and NumPy inputs")
        x = to_numpy(x)
    refuse_sparse(x, name)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {a.shape}")
    return as_int64(a, name, "an integer array (int64)")


def as_int64(a: np.ndarray, name: str, expected: str = "integers") -> np.ndarray:
    """``a`` as C-contiguous int64: integers of any width, integral floats (e.g. parsed from
    JSON) and object arrays of Python ints. Values beyond int64 are reported as they are
    (never wrapped: 2**64 - 1 is not -1, 1e19 is not -2**63); anything else is a TypeError
    naming the first offending entry."""
    kind = a.dtype.kind
    if a.size and kind == "u" and a.dtype.itemsize == 8:
        big = np.flatnonzero(a > _I64_MAX)
        if big.size:
            raise ValueError(f"{name}: value {int(a[big[0]])} at index {_index(a, big[0])} is "
                             f"beyond int64")
    elif a.size and kind == "f":
        flat = a.reshape(-1)
        bad = np.flatnonzero(~np.isfinite(flat) | (flat != np.round(flat)))
        if bad.size:
            raise TypeError(f"{name}: expected {expected}, got dtype {a.dtype} with the value "
                            f"{flat[bad[0]]!r} at index {_index(a, bad[0])}")
        big = np.flatnonzero(np.abs(flat) >= 2.0 ** 63)
        if big.size:
            raise ValueError(f"{name}: value {flat[big[0]]:g} at index {_index(a, big[0])} is "
                             f"beyond int64")
    elif a.size and kind == "O":
        for i, v in enumerate(a.reshape(-1)):       # Python ints too large for int64 land here
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected {expected}, got {clip(v)} at index "
                                f"{_index(a, i)}")
            if not -_I64_MAX - 1 <= v <= _I64_MAX:
                raise ValueError(f"{name}: value {clip(int(v))} at index {_index(a, i)} is "
                                 f"beyond int64")
    elif a.size and kind not in "iu":
        raise TypeError(f"{name}: expected {expected}, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _index(a: np.ndarray, flat_index):
    i = np.unravel_index(int(flat_index), a.shape)
    return int(i[0]) if a.ndim == 1 else tuple(int(j) for j in i)


def check_offsets(offsets: np.ndarray, M: int, total: str = "M") -> int:
    """Record offsets (int64): (N+1,), 0 first, M last (``total`` names M in messages), every
    list at least 2 long. The scan runs in C++ (one pass, no temporaries). Returns N."""
    if offsets.shape[0] < 2:
        raise ValueError(
            f"offsets: expected at least 2 entries (N+1, for at least one record), got "
            f"{offsets.shape[0]}; there are no records")
    bad = _core.first_bad_offset(offsets, M, 2)
    if bad < 0:
        return offsets.shape[0] - 1
    if bad == 0:
        raise ValueError(f"offsets: expected offsets[0] == 0, got {offsets[0]}")
    a, b = offsets[bad - 1], offsets[bad]
    if b < a:
        raise ValueError(f"offsets: must be non-decreasing; offsets[{bad}] = {b} < "
                         f"offsets[{bad - 1}] = {a}")
    if b > M:
        raise ValueError(f"offsets: entry {bad} is {b}, beyond the number of slots {total}={M}")
    if bad == offsets.shape[0] - 1 and b != M and b >= a + 2:
        raise ValueError(f"offsets: expected offsets[-1] == {total} == {M} (the number of "
                         f"slots), got {b}")
    raise ValueError(
        f"offsets: every list needs at least 2 responses, so offsets must increase by >= 2; "
        f"record {bad - 1} spans offsets[{bad - 1}]={a} to offsets[{bad}]={b}")


def check_n_ranked(n_ranked, offsets: np.ndarray, N: int) -> Optional[np.ndarray]:
    """(N,) int64 ranking depths L_i with 1 <= L_i <= m_i - 1, or None (full rankings)."""
    if n_ranked is None:
        return None
    nr = index_array(n_ranked, "n_ranked", host_tensors=True)
    if nr.shape[0] != N:
        raise ValueError(f"n_ranked: expected {N} entries (one per record), got {nr.shape[0]}")
    bad = _core.first_bad_n_ranked(nr, offsets)
    if bad >= 0:
        m = offsets[bad + 1] - offsets[bad]
        raise ValueError(
            f"n_ranked: record {bad} has m={m} candidates and n_ranked={nr[bad]}; expected "
            f"1 <= n_ranked <= m - 1 = {m - 1} (m - 1 is a full ranking)")
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
    lw = real_vector(log_weights, "log_weights", K, "type")
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
    refuse_sparse(x, name)
    if is_torch(x):
        x = to_numpy(x)
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected real numbers, got "
                        f"{clip(x) if a.dtype.kind in 'OUSV' else f'dtype {a.dtype}'}")
    a = np.ascontiguousarray(a, dtype=dtype)
    if a.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},) (one per {per}), got {a.shape}")
    return a


def weight_vector(w, name: str, size: int, per: str, dtype=np.float64) -> Optional[np.ndarray]:
    """(size,) finite weights >= 0 of ``dtype`` (one per ``per``), or None when w is None."""
    if w is None:
        return None
    a = real_vector(w, name, size, per, dtype)
    bad = np.flatnonzero(~np.isfinite(a) | (a < 0))
    if bad.size:
        raise ValueError(
            f"{name}: expected finite values >= 0, got {a[bad[0]]} at index {bad[0]}")
    return a


def check_record_weights(w, N: int, dtype, name="record_weights") -> Optional[np.ndarray]:
    return weight_vector(w, name, N, "record", dtype)


def check_annotator_weights(v, H: int) -> Optional[np.ndarray]:
    """(H,) float64 annotator weights v_h, or None (all 1)."""
    return weight_vector(v, "annotator_weights", H, "annotator")


def check_responsibilities(r, H: int, K: int, name: str) -> np.ndarray:
    """An (H, K) float64 array of starting responsibilities, each row normalised to sum 1;
    ValueError naming ``name`` and the first bad row (not finite, negative or all 0)."""
    r = np.asarray(r, dtype=np.float64)
    if r.shape != (H, K):
        raise ValueError(f"{name}: expected an (H, K) = ({H}, {K}) array of responsibilities, "
                         f"got shape {r.shape}")
    bad = np.flatnonzero(~np.isfinite(r).all(axis=1) | (r < 0).any(axis=1) |
                         ~(r.sum(axis=1) > 0))
    if bad.size:
        raise ValueError(f"{name}: row {bad[0]} must be finite, >= 0 and not all 0, got "
                         f"{r[bad[0]].tolist()}")
    return r / r.sum(axis=1, keepdims=True)


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


def check_optional_int(name, x, minimum):
    """None, or :func:`check_int`'s int."""
    return None if x is None else check_int(name, x, minimum)


def check_float(name, x, minimum, *, strict=False):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} "
                         f"{minimum}, got {x}")
    return x


def check_sample_weight(sample_weight, N: int) -> Optional[np.ndarray]:
    """(N,) float64 row counts (finite, >= 0, not all 0, with a finite sum), or None."""
    sw = weight_vector(sample_weight, "sample_weight", N, "record")
    if sw is None:
        return None
    with np.errstate(over="ignore"):
        total = sw.sum()
    if not total > 0:
        raise ValueError("sample_weight: every weight is 0; nothing to fit")
    if not math.isfinite(total):
        raise ValueError(f"sample_weight: the weights sum to {total} (overflow, largest weight "
                         f"{sw.max():g}); rescale them")
    return sw


def policy_and_ref(policy_logps, ref_logps):
    p = float_array(policy_logps, "policy_logps", ndims=(1, 2))
    one = p.ndim == 1
    if one:
        p = p[None, :]
    if p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"policy_logps: expected shape (K, M) with K >= 1 and M >= 2, got {p.shape}")
    ref = float_array(ref_logps, "ref_logps")
    check_matches("ref_logps", ref, "policy_logps", p, "M")
    return p, ref, one


def check_matches(name: str, ref, of: str, logps, size: str) -> None:
    """``name`` (1-D, NumPy or torch) has one entry per column of ``of`` (2-D, M or S
    columns) and the same dtype."""
    n = logps.shape[1]
    if ref.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) to match {of}' {size}={n}, got "
                         f"{tuple(ref.shape)}")
    if ref.dtype != logps.dtype:
        raise TypeError(f"{name}: dtype {ref.dtype} does not match {of}' dtype {logps.dtype}; "
                        f"pass both as float32 or both as float64")


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
    check_matches("sample_ref_logps", ref, "sample_logps", lp, "S")
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


def real_array(x, name: str, what: str) -> np.ndarray:
    """float64 C-contiguous values of any shape (a torch tensor is copied to the host);
    TypeError naming the argument and ``what`` was expected for other dtypes."""
    if is_torch(x):
        x = to_numpy(x)
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected {what}, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float64)


def check_regret(regret) -> np.ndarray:
    R = real_array(regret, "regret", "a real (K, K) array")
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"regret: expected a square (K, K) array with K >= 1 (rows = types, "
                         f"columns = policies), got shape {R.shape}")
    bad = np.flatnonzero(~np.isfinite(R.reshape(-1)))
    if bad.size:
        k, j = divmod(int(bad[0]), R.shape[1])
        raise ValueError(f"regret: non-finite value {R[k, j]} at [type {k}, policy {j}]; the "
                         f"regret matrix must be finite")
    return R


def check_group_weights(group_weights, K: int) -> np.ndarray:
    if group_weights is None:
        return np.ones(K)
    c = real_vector(group_weights, "group_weights", K, "type")
    bad = np.flatnonzero(~(np.isfinite(c) & (c > 0)))
    if bad.size:
        raise ValueError(f"group_weights: expected finite values > 0, got {c[bad[0]]} at index "
                         f"{bad[0]}")
    return c


def check_policy_probs(policy_probs) -> np.ndarray:
    P = real_array(policy_probs, "policy_probs", "real probabilities")
    if P.ndim == 2:
        P = P[:, None, :]  # one context
    if P.ndim != 3 or min(P.shape) < 1:
        raise ValueError(f"policy_probs: expected shape (K, C, A) (policies x contexts x "
                         f"responses) or (K, A), got {np.shape(policy_probs)}")
    bad = np.flatnonzero(~(np.isfinite(P.reshape(-1)) & (P.reshape(-1) >= 0)))
    if bad.size:
        idx = np.unravel_index(int(bad[0]), P.shape)
        raise ValueError(f"policy_probs: expected finite probabilities >= 0, got "
                         f"{P[idx]} at [policy {idx[0]}, context {idx[1]}, response {idx[2]}]")
    sums = P.sum(axis=2)
    bad = np.flatnonzero(np.abs(sums.reshape(-1) - 1.0) > 1e-6)
    if bad.size:
        k, cc = divmod(int(bad[0]), P.shape[1])
        raise ValueError(f"policy_probs: each policy's distribution over responses must sum to "
                         f"1 (within 1e-6); [policy {k}, context {cc}] sums to {sums[k, cc]}")
    return P / sums[:, :, None]


def check_context_weights(context_weights, C: int) -> np.ndarray:
    if context_weights is None:
        return np.full(C, 1.0 / C)
    rho = real_vector(context_weights, "context_weights", C, "context")
    bad = np.flatnonzero(~(np.isfinite(rho) & (rho >= 0)))
    if bad.size:
        raise ValueError(f"context_weights: expected finite values >= 0, got {rho[bad[0]]} at "
                         f"index {bad[0]}")
    if not rho.sum() > 0:
        raise ValueError("context_weights: all zero; at least one context needs weight")
    return rho / rho.sum()


# ----------------------------------------------------------------------------------------
# Hardening: readable messages, ids that cost what the data costs, sparse inputs

# A user value echoed in a message is cut to about this many characters (a 1 GB line must
# not become a 1 GB message); containers show their first few entries.
MESSAGE_VALUE_CHARS = 60
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MESSAGE_VALUE_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxdict = 4
_REPR.maxlevel = 3


def clip(value) -> str:
    """repr(value) for an error message, cut to a readable length: every message that echoes
    a value the user gave (a name, a line of a file, a key) goes through here."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        # str() of a huge int is slow and refused beyond 4300 digits
        digits = int(value.bit_length() * 0.30103) + 1
        return f"<an integer of about {digits} digits>"
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        return f"<{type(value).__name__}>"


# A message from elsewhere (an exception's text) wrapped into ours is cut to this length.
MESSAGE_CHARS = 400


def clip_message(text) -> str:
    """An exception's message on one line, cut to MESSAGE_CHARS characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_CHARS else \
        text[:MESSAGE_CHARS - 30] + f"... ({len(text)} characters)"


# Ids (item ids, annotator ids) index arrays of size largest id + 1, so their cost grows with
# the largest id, not with the data. An id may exceed what the data could use by this
# margin: up to max(SPARE_IDS, 4 * entries) for `entries` values given. Larger ids are
# refused (a header claiming 10^12 alternatives, an id of 10^8 in a file of ten rankings):
# relabel them compactly.
SPARE_IDS = 1 << 20


def check_id_bound(name: str, largest: int, n_entries: int, *, count: bool = False) -> None:
    """Refuse an id (``largest``) or, with ``count=True``, a number of ids (``largest`` + 1)
    whose arrays would cost far more than the ``n_entries`` values the data gives."""
    bound = max(SPARE_IDS, 4 * int(n_entries))
    if largest >= bound:
        what = f"{clip(int(largest) + 1)} ids" if count else f"id {clip(int(largest))}"
        raise ValueError(
            f"{name}: {what} is too large for data of {n_entries} entries (ids index arrays "
            f"of size largest id + 1; ids below {bound} are accepted here); relabel the ids "
            f"compactly, e.g. with numpy.unique(ids, return_inverse=True)")


def refuse_sparse(x, name: str) -> None:
    """TypeError for sparse torch tensors and SciPy sparse matrices (the kernels read dense
    buffers; densify explicitly)."""
    if is_torch(x):
        if str(x.layout) != "torch.strided":
            raise TypeError(f"{name}: got a sparse torch tensor (layout {x.layout}); pass a "
                            f"dense tensor (x.to_dense())")
        return
    if type(x).__module__.startswith("scipy.sparse"):
        raise TypeError(f"{name}: got a SciPy sparse {type(x).__name__}; pass a dense array "
                        f"(x.toarray())")
