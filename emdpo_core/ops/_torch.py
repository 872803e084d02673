"""torch entry points of the ops: CPU tensors run the C++ kernels on zero-copy NumPy views,
CUDA tensors the CUDA kernels on the current stream; both straight to the compiled module.
Imported only when a torch tensor is passed in, so the NumPy path never imports torch.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import torch

from .. import _checks, _core
from . import _cpu

_FLOATS = (torch.float32, torch.float64)


def _require_tensor(x, name, device):
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x), device=device)
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
    return x.to(torch.int64).contiguous()


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
    if p.shape[1] < 2:
        raise ValueError(f"policy_logps: expected shape (K, M) with M >= 2, got {tuple(p.shape)}")
    ref = _float_tensor(ref_logps, "ref_logps", device)
    if ref.shape[0] != p.shape[1]:
        raise ValueError(f"ref_logps: expected shape ({p.shape[1]},) to match policy_logps' "
                         f"M={p.shape[1]}, got {tuple(ref.shape)}")
    if ref.dtype != p.dtype:
        raise TypeError(f"ref_logps: dtype {ref.dtype} does not match policy_logps' dtype "
                        f"{p.dtype}; pass both as float32 or both as float64")
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


def _as_tensors(*arrays):
    return tuple(None if a is None else torch.from_numpy(a) for a in arrays)


def listwise_loglik(policy_logps, ref_logps, offsets, *, beta, n_ranked=None):
    p, ref, _, device = _prepare(policy_logps, ref_logps)
    beta = _checks.check_beta(beta)
    K, M = p.shape
    if device.type != "cpu":
        _require_cuda_build(device)
    offsets, nr = _layout(offsets, n_ranked, M, device)
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


def e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights, *, beta,
           n_ranked=None, record_weights=None, return_record_loglik=False):
    p, ref, _, device = _prepare(policy_logps, ref_logps)
    beta = _checks.check_beta(beta)
    K, M = p.shape
    if device.type != "cpu":
        _require_cuda_build(device)
    offsets, nr = _layout(offsets, n_ranked, M, device)
    N = offsets.shape[0] - 1
    ao = _annotator_offsets(annotator_offsets, N, device)
    H = ao.shape[0] - 1
    lw_host = _checks.check_log_weights(
        _numpy(log_weights) if isinstance(log_weights, torch.Tensor) else log_weights, K)
    cw = _record_weights(record_weights, N, device, p.dtype)
    if device.type == "cpu":
        r = _cpu.e_step(p.numpy(), ref.numpy(), offsets.numpy(), _numpy(nr), ao.numpy(),
                           lw_host, _numpy(cw), beta, return_record_loglik)
        resp, annot_ll, rec = _as_tensors(r.responsibilities, r.annotator_loglik,
                                          r.record_loglik)
        return _cpu.EStepResult(resp, r.loglik, annot_ll, rec)
    lw = torch.from_numpy(lw_host).to(device)
    resp = torch.empty((H, K), dtype=p.dtype, device=device)
    annot_ll = torch.empty((H, K), dtype=p.dtype, device=device)
    rec = torch.empty((N, K), dtype=p.dtype, device=device) if return_record_loglik else None
    loglik = torch.empty((1,), dtype=torch.float64, device=device)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=device)
    ws_bytes = _core.cuda_e_step_workspace_bytes(N, H, K)
    ws = torch.empty((max(ws_bytes, 1),), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        _core.cuda_e_step(_dtype_name(p), p.data_ptr(), ref.data_ptr(), offsets.data_ptr(),
                          _ptr(nr), _ptr(cw), ao.data_ptr(), lw.data_ptr(), N, M, K, H, beta,
                          resp.data_ptr(), annot_ll.data_ptr(), loglik.data_ptr(), _ptr(rec),
                          first_bad.data_ptr(), ws.data_ptr(), ws_bytes, _stream(device))
    _raise_if_bad(first_bad, p, ref, offsets, beta)
    return _cpu.EStepResult(resp, float(loglik.item()), annot_ll, rec)


def listwise_dpo_loss_and_grad(policy_logps, ref_logps, offsets, weights=None, *, beta,
                               n_ranked=None, reduction="sum", return_tensors=False):
    """Returns (loss, grad) like the NumPy version. With return_tensors=True the loss is a
    0-d float64 tensor on the input's device (no host synchronisation for the value)."""
    p, ref, one, device = _prepare(policy_logps, ref_logps)
    beta = _checks.check_beta(beta)
    reduction = _checks.check_reduction(reduction)
    K, M = p.shape
    if device.type != "cpu":
        _require_cuda_build(device)
    offsets, nr = _layout(offsets, n_ranked, M, device)
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
        if not bool(torch.isfinite(w).all()):  # as the CPU path: name the first bad weight
            _checks.check_loss_weights(w.cpu().numpy(), K, N, _dtype_name(w), one)
    if reduction in ("sum", "none"):
        scale = torch.ones(K, dtype=torch.float64, device=device)
    elif reduction == "mean":
        scale = torch.full((K,), 1.0 / N, dtype=torch.float64, device=device)
    else:
        totals = (torch.full((K,), float(N), dtype=torch.float64, device=device) if w is None
                  else w.sum(dim=1, dtype=torch.float64))
        if not bool((totals > 0).all()):
            _cpu.loss_scale(reduction, w.cpu().numpy(), K, N)  # raises with the message
        scale = 1.0 / totals
    grad = torch.empty((K, M), dtype=p.dtype, device=device)
    rec = torch.empty((K, N), dtype=p.dtype, device=device) if reduction == "none" else None
    loss = torch.empty((), dtype=torch.float64, device=device)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=device)
    ws_bytes = _core.cuda_loss_workspace_bytes(N, K)
    ws = torch.empty((max(ws_bytes, 1),), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        _core.cuda_listwise_dpo_loss_and_grad(
            _dtype_name(p), p.data_ptr(), ref.data_ptr(), offsets.data_ptr(), _ptr(nr), _ptr(w),
            scale.data_ptr(), N, M, K, beta, loss.data_ptr(), grad.data_ptr(), _ptr(rec),
            first_bad.data_ptr(), ws.data_ptr(), ws_bytes, _stream(device))
    _raise_if_bad(first_bad, p, ref, offsets, beta)
    if one:
        grad = grad[0]
    if reduction == "none":
        return (rec[0] if one else rec), grad
    return (loss if return_tensors else float(loss.item())), grad


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
        if ref.shape[0] != S:
            raise ValueError(f"sample_ref_logps: expected shape ({S},) to match sample_logps' "
                             f"S={S}, got {tuple(ref.shape)}")
        if ref.dtype != lp.dtype:
            raise TypeError(f"sample_ref_logps: dtype {ref.dtype} does not match sample_logps' "
                            f"dtype {lp.dtype}; pass both as float32 or both as float64")
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
