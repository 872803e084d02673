"""torch entry points of the ops: CPU tensors run the C++ kernels on zero-copy NumPy views,
CUDA tensors the CUDA kernels on the current stream; both straight to the compiled module.
Imported only when a torch tensor is passed in, so the NumPy path never imports torch.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict, deque

import numpy as np
import torch

from .. import _checks, _core
from . import _cpu

_FLOATS = (torch.float32, torch.float64)


def _require_tensor(x, name, device):
    _checks.refuse_sparse(x, name)
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x), device=device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}: expected a tensor or an array of numbers, got "
                            f"{_checks.clip(x)}") from None
    if x.device != device:
        raise ValueError(
            f"{name}: on {x.device}, but policy_logps is on {device}; put all inputs on one device")
    return x


def _float_tensor(x, name, device, dims=(1,)):
    x = _require_tensor(x, name, device)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a float32 or float64 tensor, got {x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in dims)}, got shape "
                         f"{tuple(x.shape)}")
    return x.detach().contiguous()


def _index_tensor(x, name, device):
    x = _require_tensor(x, name, device)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (int64), got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D integer tensor, got shape {tuple(x.shape)}")
    if x.dtype != torch.int64 and not x.dtype.is_signed and x.element_size() == 8 and x.numel():
        _checks.as_int64(x.cpu().numpy(), name)     # uint64 beyond int64: the real value
    return x.to(torch.int64).contiguous()


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    return type(x).__name__


def _numpy(x):
    return None if x is None else x.detach().cpu().numpy()


# Index arrays (offsets, n_ranked, annotator_offsets) are checked on the host. On CUDA that
# costs a device-to-host copy, so tensors already checked are remembered by (pointer, size,
# version counter): an in-place change bumps torch's version counter and forces a re-check.
# The key alone is not enough: once a checked tensor is freed, the caching allocator hands its
# memory to the next tensor of that size, which then has the same pointer and a version of 0
# but other contents. So an entry also holds weak references to the tensors it checked and
# only counts for those very tensor objects while they are alive.
_checked: "OrderedDict[tuple, tuple]" = OrderedDict()


def _check_cached(key, check, tensors=()):
    tensors = tuple(t for t in tensors if t is not None)  # optional arrays that are absent
    if any(t.is_inference() for t in tensors):
        check()  # inference tensors have no version counter, so in-place changes go unseen
        return
    refs = _checked.get(key)
    if refs is not None and len(refs) == len(tensors) and all(
            r() is t for r, t in zip(refs, tensors)):
        _checked.move_to_end(key)
        return
    check()
    _checked[key] = tuple(weakref.ref(t) for t in tensors)
    _checked.move_to_end(key)
    if len(_checked) > 32:
        _checked.popitem(last=False)


def _key(*tensors):
    return tuple((t.data_ptr(), t.numel(), None if t.is_inference() else t._version,
                  str(t.device)) if t is not None else None for t in tensors)


def _check_layout_cuda(offsets, n_ranked, M):
    def check():
        _checks.check_layout(offsets.cpu().numpy(), _numpy(n_ranked), M)

    _check_cached(("layout", M) + _key(offsets, n_ranked), check,
                  tuple(t for t in (offsets, n_ranked) if t is not None))


def _require_cuda_build(device):
    if device.type != "cuda":
        raise ValueError(f"policy_logps: tensors on {device} are not supported; use CPU or CUDA "
                         f"tensors")
    if not getattr(_core, "cuda", False):
        raise RuntimeError(
            "emdpo_core was built without CUDA, so it cannot run on CUDA tensors. Reinstall from "
            "source on a machine with nvcc on PATH: EMDPO_WITH_CUDA=ON pip install --no-binary "
            "emdpo-core --force-reinstall emdpo-core (or `pip install .` in a checkout); "
            "emdpo_core.build_info() shows what was built.")


def _prepare(policy_logps, ref_logps):
    device = policy_logps.device
    p = _float_tensor(policy_logps, "policy_logps", device, dims=(1, 2))
    one = p.dim() == 1
    if one:
        p = p.unsqueeze(0)
    if p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"policy_logps: expected shape (K, M) with K >= 1 and M >= 2, got "
                         f"{tuple(p.shape)}")
    ref = _float_tensor(ref_logps, "ref_logps", device)
    _checks.check_matches("ref_logps", ref, "policy_logps", p, "M")
    return p, ref, one, device


def _raise_if_bad(first_bad, p, ref, offsets, beta):
    bad = int(first_bad.item())
    if bad >= 0:
        o = offsets.cpu().numpy()
        b = int(o[bad + 1])
        _cpu.raise_non_finite(bad, p[:, :b].cpu().numpy(), ref[:b].cpu().numpy(), o, beta)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def _dtype_name(t):
    return "float32" if t.dtype == torch.float32 else "float64"


# ----------------------------------------------------------------------------------------
# Error flags of the CUDA kernels without host synchronisation.
#
# The kernels report invalid inputs through small device flags (the first record whose
# rewards are not finite, the first non-finite weight, ...). Reading them right after the
# launch would make the host wait for the GPU on every call. Calls that return tensors
# (the loss with return_tensors=True, which the autograd Function uses) instead queue a copy
# of the flags to pinned host memory behind the kernel and read it once it has landed: at a
# later call, without waiting, or on request with check_errors(). Meanwhile the loss they
# returned is NaN (the kernel makes it so), so no result looks valid. Calls that return
# Python floats synchronise anyway and read their flags in the same transfer as the value.

_pending: "deque[_Flags]" = deque()
_MAX_PENDING = 64  # past this many unread calls, the oldest is waited for


class _Flags:
    """Device flags of one call, copied to pinned memory; `report(values)` raises."""

    def __init__(self, flags, report):
        self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        self.host.copy_(flags, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(flags.device))
        self.report = report


def check_errors(wait=True):
    """Raise the first error that earlier CUDA calls flagged. With wait=False only calls whose
    flags have already reached the host are looked at (no synchronisation)."""
    while _pending:
        f = _pending[0]
        if not wait and not f.event.query():
            return
        f.event.synchronize()
        _pending.popleft()
        f.report(f.host.tolist())


def _defer(flags, report):
    check_errors(wait=False)
    _pending.append(_Flags(flags, report))
    if len(_pending) > _MAX_PENDING:
        f = _pending.popleft()
        f.event.synchronize()
        f.report(f.host.tolist())


def _weight_tensor(x, name, device, dtype, dims=(1,)):
    """Real-valued weights as a contiguous tensor of the compute dtype (integers accepted,
    as on the NumPy path)."""
    x = _require_tensor(x, name, device)
    if x.dtype.is_complex:
        raise TypeError(f"{name}: expected real numbers, got {x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in dims)}, got shape "
                         f"{tuple(x.shape)}")
    return x.detach().to(dtype).contiguous()


def _layout(offsets, n_ranked, M, device):
    """Checked int64 offsets and n_ranked tensors (n_ranked may be None). CPU tensors are
    checked on their NumPy views; CUDA ones once per tensor version (see _check_cached)."""
    offsets = _index_tensor(offsets, "offsets", device)
    nr = None if n_ranked is None else _index_tensor(n_ranked, "n_ranked", device)
    if device.type == "cpu":
        _checks.check_layout(offsets.numpy(), _numpy(nr), M)
    else:
        _check_layout_cuda(offsets, nr, M)
    return offsets, nr


def _inputs(policy_logps, ref_logps, beta, offsets, n_ranked):
    """The checks every listwise op starts with: (p (K, M), ref, one, device, beta, offsets,
    n_ranked)."""
    p, ref, one, device = _prepare(policy_logps, ref_logps)
    beta = _checks.check_beta(beta)
    if device.type != "cpu":
        _require_cuda_build(device)
    offsets, nr = _layout(offsets, n_ranked, p.shape[1], device)
    return p, ref, one, device, beta, offsets, nr


def _as_tensors(*arrays):
    return tuple(None if a is None else torch.from_numpy(a) for a in arrays)


def listwise_loglik(policy_logps, ref_logps, offsets, *, beta, n_ranked=None):
    p, ref, _, device, beta, offsets, nr = _inputs(policy_logps, ref_logps, beta, offsets,
                                                   n_ranked)
    K, M = p.shape
    if device.type == "cpu":
        return torch.from_numpy(_cpu.listwise_loglik(p.numpy(), ref.numpy(), offsets.numpy(),
                                                        _numpy(nr), beta))
    N = offsets.shape[0] - 1
    out = torch.empty((N, K), dtype=p.dtype, device=device)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        _core.cuda_listwise_loglik(_dtype_name(p), p.data_ptr(), ref.data_ptr(),
                                   offsets.data_ptr(), _ptr(nr), N, M, K, beta, out.data_ptr(),
                                   first_bad.data_ptr(), _stream(device))
    _raise_if_bad(first_bad, p, ref, offsets, beta)
    return out


def _annotator_offsets(annotator_offsets, N, device):
    ao = _index_tensor(annotator_offsets, "annotator_offsets", device)
    if device.type == "cpu":
        _checks.check_annotator_offsets(ao.numpy(), N)
    else:
        _check_cached(("annotators", N) + _key(ao),
                      lambda: _checks.check_annotator_offsets(ao.cpu().numpy(), N), (ao,))
    return ao


def _record_weights(record_weights, N, device, dtype):
    if record_weights is None:
        return None
    if device.type == "cpu":
        host = _checks.check_record_weights(
            _numpy(record_weights) if isinstance(record_weights, torch.Tensor)
            else record_weights, N, _dtype_name(torch.empty((), dtype=dtype)))
        return torch.from_numpy(host)
    cw = _weight_tensor(record_weights, "record_weights", device, dtype)
    if cw.shape != (N,):
        raise ValueError(f"record_weights: expected shape ({N},), got {tuple(cw.shape)}")
    if not bool(torch.all(torch.isfinite(cw) & (cw >= 0))):
        _checks.check_record_weights(cw.cpu().numpy(), N, cw.cpu().numpy().dtype)  # raises
    return cw


def _log_weights_on(log_weights, K, device):
    """log eta (K,) float64 on the device. A CUDA tensor stays on the device (its checks run
    there and are read with the E-step's result); anything else is checked on the host and
    copied through pinned memory without blocking the host."""
    if (device.type == "cuda" and isinstance(log_weights, torch.Tensor)
            and log_weights.device == device):
        lw = log_weights.detach()
        if lw.dim() != 1 or lw.shape[0] != K:
            raise ValueError(f"log_weights: expected shape ({K},) (one per type), got "
                             f"{tuple(lw.shape)}")
        return lw.to(torch.float64).contiguous(), True
    lw_host = _checks.check_log_weights(
        _numpy(log_weights) if isinstance(log_weights, torch.Tensor) else log_weights, K)
    if device.type == "cpu":
        return torch.from_numpy(lw_host), False
    return torch.from_numpy(lw_host).pin_memory().to(device, non_blocking=True), False


def _annotator_weights_on(annotator_weights, H, device):
    """Annotator weights v (H,) float64 on the device, or None. A CUDA tensor stays on the
    device (checked there, read with the E-step's result); anything else is checked on the
    host and copied through pinned memory without blocking the host."""
    if annotator_weights is None:
        return None, False
    if isinstance(annotator_weights, torch.Tensor) and annotator_weights.device == device:
        v = _weight_tensor(annotator_weights, "annotator_weights", device, torch.float64)
        if tuple(v.shape) != (H,):
            raise ValueError(f"annotator_weights: expected shape ({H},), got {tuple(v.shape)}")
        return v, True
    v_host = _checks.check_annotator_weights(
        _numpy(annotator_weights) if isinstance(annotator_weights, torch.Tensor)
        else annotator_weights, H)
    return torch.from_numpy(v_host).pin_memory().to(device, non_blocking=True), False


def e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights, *, beta,
           n_ranked=None, record_weights=None, annotator_weights=None,
           return_record_loglik=False):
    """As emdpo_core.e_step. On CUDA the kernel weighs the annotators and forms the type
    totals itself, and the call synchronises once, to return loglik as a float (the flags
    of invalid inputs travel with it)."""
    p, ref, _, device, beta, offsets, nr = _inputs(policy_logps, ref_logps, beta, offsets,
                                                   n_ranked)
    K, M = p.shape
    N = offsets.shape[0] - 1
    ao = _annotator_offsets(annotator_offsets, N, device)
    H = ao.shape[0] - 1
    lw, lw_on_device = _log_weights_on(log_weights, K, device)
    cw = _record_weights(record_weights, N, device, p.dtype)
    if device.type == "cpu":
        v_host = _checks.check_annotator_weights(
            _numpy(annotator_weights) if isinstance(annotator_weights, torch.Tensor)
            else annotator_weights, H)
        r = _cpu.e_step(p.numpy(), ref.numpy(), offsets.numpy(), _numpy(nr), ao.numpy(),
                        lw.numpy(), _numpy(cw), v_host, beta, return_record_loglik)
        resp, annot_ll, rec, totals = _as_tensors(r.responsibilities, r.annotator_loglik,
                                                  r.record_loglik, r.type_totals)
        return _cpu.EStepResult(resp, r.loglik, annot_ll, rec, totals)
    v, v_on_device = _annotator_weights_on(annotator_weights, H, device)
    resp = torch.empty((H, K), dtype=p.dtype, device=device)
    annot_ll = torch.empty((H, K), dtype=p.dtype, device=device)
    rec = torch.empty((N, K), dtype=p.dtype, device=device) if return_record_loglik else None
    totals = torch.empty((K,), dtype=torch.float64, device=device)
    # One float64 vector read once at the end: [loglik, first bad record, log-weight checks
    # (a NaN or +inf entry, all entries -inf), annotator-weight check (a negative or
    # non-finite entry)].
    out = torch.full((5,), -1.0, dtype=torch.float64, device=device)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=device)
    if lw_on_device:
        out[2] = (torch.isnan(lw) | (lw == float("inf"))).any().to(torch.float64)
        out[3] = (lw == float("-inf")).all().to(torch.float64)
    if v_on_device:
        out[4] = (~(torch.isfinite(v) & (v >= 0))).any().to(torch.float64)
    ws_bytes = _core.cuda_e_step_workspace_bytes(N, H, K)
    ws = torch.empty((max(ws_bytes, 1),), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        _core.cuda_e_step(_dtype_name(p), p.data_ptr(), ref.data_ptr(), offsets.data_ptr(),
                          _ptr(nr), _ptr(cw), ao.data_ptr(), lw.data_ptr(), N, M, K, H, beta,
                          resp.data_ptr(), annot_ll.data_ptr(), out[0:1].data_ptr(), _ptr(rec),
                          first_bad.data_ptr(), ws.data_ptr(), ws_bytes, _stream(device),
                          annotator_weights_ptr=_ptr(v), type_totals_ptr=totals.data_ptr())
    out[1] = first_bad[0].to(torch.float64)
    loglik, bad, lw_bad, lw_zero, v_bad = out.tolist()  # the one synchronisation
    if bad >= 0:
        _raise_if_bad(first_bad, p, ref, offsets, beta)
    if lw_bad > 0 or lw_zero > 0:
        _checks.check_log_weights(lw.cpu().numpy(), K)  # raises with the message
    if v_bad > 0:
        _checks.check_annotator_weights(v.cpu().numpy(), H)  # raises with the message
    return _cpu.EStepResult(resp, loglik, annot_ll, rec, totals)


def listwise_dpo_loss_and_grad(policy_logps, ref_logps, offsets, weights=None, *, beta,
                               n_ranked=None, reduction="sum", return_tensors=False):
    """Returns (loss, grad) like the NumPy version. With return_tensors=True the loss is a
    0-d float64 tensor on the input's device (no host synchronisation for the value)."""
    p, ref, one, device, beta, offsets, nr = _inputs(policy_logps, ref_logps, beta, offsets,
                                                     n_ranked)
    reduction = _checks.check_reduction(reduction)
    K, M = p.shape
    N = offsets.shape[0] - 1
    if device.type == "cpu":
        w = None if weights is None else _float_tensor(weights, "weights", device, dims=(1, 2))
        w = _checks.check_loss_weights(_numpy(w), K, N, p.numpy().dtype, one)
        loss, grad = _cpu.listwise_dpo_loss_and_grad(p.numpy(), ref.numpy(), offsets.numpy(),
                                                     _numpy(nr), w, reduction, beta)
        grad = torch.from_numpy(grad[0] if one else grad)
        if reduction == "none":
            return torch.from_numpy(loss[0] if one else loss), grad
        return (torch.tensor(loss, dtype=torch.float64) if return_tensors else loss), grad
    w = None
    if weights is not None:
        w = _weight_tensor(weights, "weights", device, p.dtype, dims=(1, 2))
        want = [(N,), (K, N)] if K == 1 else [(K, N)]
        if tuple(w.shape) not in want:
            raise ValueError(f"weights: expected shape {' or '.join(map(str, want))}, got "
                             f"{tuple(w.shape)}")
        w = w.reshape(K, N).contiguous()
    # Flags, all on the device: [first record with non-finite rewards, first non-finite
    # weight (flat index k * N + i; the kernel checks the weights as it reads them), first
    # type whose weights do not sum to a positive total (weighted_mean)].
    flags = torch.full((3,), -1, dtype=torch.int64, device=device)
    if reduction in ("sum", "none"):
        scale = torch.ones(K, dtype=torch.float64, device=device)
    elif reduction == "mean":
        scale = torch.full((K,), 1.0 / N, dtype=torch.float64, device=device)
    elif w is None:
        scale = torch.full((K,), 1.0 / N, dtype=torch.float64, device=device)
    else:
        # As _cpu.weighted_mean_weights: each type's weights divided by their largest
        # magnitude first, so 1 / sum stays finite for tiny weights. A type whose weights do
        # not sum to a positive total is flagged on the device (read with the other flags).
        w_given = w
        top = w.abs().amax(dim=1, keepdim=True).to(torch.float64)
        top = torch.where(top > 0, top, torch.ones_like(top))  # an all-zero type stays zero
        w = (w.to(torch.float64) / top).to(p.dtype).contiguous()
        totals = w.sum(dim=1, dtype=torch.float64)  # signs as _cpu's: from rescaled sums
        first = torch.where(totals > 0, K, torch.arange(K, device=device)).min()
        flags[2] = torch.where(first < K, first, -1)
        scale = 1.0 / totals
    grad = torch.empty((K, M), dtype=p.dtype, device=device)
    rec = torch.empty((K, N), dtype=p.dtype, device=device) if reduction == "none" else None
    loss = torch.empty((), dtype=torch.float64, device=device)
    ws_bytes = _core.cuda_loss_workspace_bytes(N, K)
    ws = torch.empty((max(ws_bytes, 1),), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        _core.cuda_listwise_dpo_loss_and_grad(
            _dtype_name(p), p.data_ptr(), ref.data_ptr(), offsets.data_ptr(), _ptr(nr), _ptr(w),
            scale.data_ptr(), N, M, K, beta, loss.data_ptr(), grad.data_ptr(), _ptr(rec),
            flags[0:1].data_ptr(), ws.data_ptr(), ws_bytes, _stream(device),
            bad_weight_ptr=0 if w is None else flags[1:2].data_ptr())
    if one:
        grad = grad[0]
    if return_tensors or reduction == "none":
        # No host synchronisation: the flags are read later (see _Flags).
        _defer(flags, lambda v: _raise_loss_flags(v, N, one))
        if reduction == "none":
            return (rec[0] if one else rec), grad
        return loss, grad
    # A Python float is asked for: one transfer brings the value and the flags.
    values = torch.cat([flags.to(torch.float64), loss.view(1)]).tolist()
    bad = [int(v) for v in values[:3]]
    if bad[0] >= 0:
        _raise_if_bad(flags[0:1], p, ref, offsets, beta)
    if bad[1] >= 0 or bad[2] >= 0:
        w_host = (w_given if reduction == "weighted_mean" else w).cpu().numpy()
        _checks.check_loss_weights(w_host, K, N, w_host.dtype, one)  # raises for bad[1]
        _cpu.loss_scale(reduction, w_host, K, N)  # raises for bad[2]
    return values[3], grad


def _raise_loss_flags(v, N, one):
    """The deferred form of the loss call's checks (the inputs are no longer at hand)."""
    if v[0] >= 0:
        raise ValueError(
            f"policy_logps/ref_logps: non-finite reward in record {v[0]} (a NaN or infinite "
            f"log-probability, or an overflowing beta * (logpi - logpi_ref)); found after an "
            f"earlier loss call returned, whose loss is NaN")
    if v[1] >= 0:
        k, i = divmod(v[1], N)
        raise ValueError(f"weights: expected finite values, got a non-finite weight at index "
                         f"{i if one else (k, i)} (in an earlier loss call, whose loss is NaN)")
    if v[2] >= 0:
        raise ValueError(
            f"weights: reduction='weighted_mean' needs a positive sum of weights for every "
            f"type; type {v[2]} has none (in an earlier loss call)")


def regret_matrix(sample_logps, sample_ref_logps, source_offsets, *, beta, kind,
                  sample_weights):
    """Returns a float64 tensor on the input's device."""
    device = sample_logps.device
    if device.type != "cpu":
        _require_cuda_build(device)
    beta = _checks.check_beta(beta)
    kind_code = _checks.check_kind(kind)
    lp = _float_tensor(sample_logps, "sample_logps", device, dims=(2,))
    K, S = lp.shape
    if K < 1 or S < 1:
        raise ValueError(f"sample_logps: expected shape (K, S) with K >= 1 and S >= 1, got "
                         f"{tuple(lp.shape)}")
    ref = None
    if sample_ref_logps is None:
        _checks.check_sample_ref(None, None, kind)  # raises for kind="reward"
    else:
        ref = _float_tensor(sample_ref_logps, "sample_ref_logps", device)
        _checks.check_matches("sample_ref_logps", ref, "sample_logps", lp, "S")
    if kind_code == 1:
        ref = None
    so = _index_tensor(source_offsets, "source_offsets", device)
    so_host = _checks.check_source_offsets(so.cpu().numpy(), K, S)  # K+1 numbers: a small copy
    if device.type == "cpu":
        sw = None
        if sample_weights is not None:
            sw = _require_tensor(sample_weights, "sample_weights", device)
            if sw.dtype.is_complex or sw.dtype == torch.bool:
                raise TypeError(f"sample_weights: expected real numbers, got {sw.dtype}")
            sw = _checks.check_sample_weights(_numpy(sw), so_host, S, lp.numpy().dtype)
        return torch.from_numpy(_cpu.regret_matrix(lp.numpy(), _numpy(ref), so_host, sw, kind_code,
                                               beta))
    sw = None
    if sample_weights is not None:
        sw = _require_tensor(sample_weights, "sample_weights", device)
        if sw.dtype.is_complex or sw.dtype == torch.bool:
            raise TypeError(f"sample_weights: expected real numbers, got {sw.dtype}")
        sw = sw.detach().to(lp.dtype)
        if tuple(sw.shape) != (S,):
            raise ValueError(f"sample_weights: expected shape ({S},), got {tuple(sw.shape)}")
        counts = torch.from_numpy(np.diff(so_host)).to(device)
        source = torch.repeat_interleave(torch.arange(K, device=device), counts)
        n_positive = torch.zeros(K, dtype=torch.int64, device=device).index_add_(
            0, source, (sw > 0).to(torch.int64))
        if not bool(torch.all(torch.isfinite(sw) & (sw >= 0))) or not bool(
                torch.all(n_positive > 0)):
            _checks.check_sample_weights(sw.cpu().numpy(), so_host, S, np.float64)  # raises
        sw = sw.contiguous()
    R = torch.empty((K, K), dtype=torch.float64, device=device)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=device)
    ws_bytes = _core.cuda_regret_matrix_workspace_bytes(K, S)
    ws = torch.empty((max(ws_bytes, 1),), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        _core.cuda_regret_matrix(_dtype_name(lp), lp.data_ptr(), _ptr(ref), so.data_ptr(),
                                 _ptr(sw), K, S, kind_code, beta, R.data_ptr(),
                                 first_bad.data_ptr(), ws.data_ptr(), ws_bytes, _stream(device))
    if int(first_bad.item()) >= 0:
        _cpu.raise_regret_non_finite(lp.cpu().numpy(), _numpy(ref), so_host, beta)
    return R
