"""The EM side of :class:`~emdpo_core.hf.EMDPOTrainer`, on the host: the EM state, the start
(k-means over the annotators' preference directions), the E-step over the cached
log-probabilities, the M-step's per-record type weights, the held-out metrics, and the EM
state files saved with every Trainer checkpoint.

The trainer computes log-probabilities (its no-grad passes) and owns the schedule; the
functions here take those log-probabilities as tensors and the rows as a
:class:`~emdpo_core.hf._records.RowLayout`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .. import listwise_dpo_loss_and_grad
from ..distributed import LocalComm
from ..distributed import e_step as _e_step_kernel
from ..em import INIT_SMOOTHING
from . import _io
from ._records import RowLayout
from .logps import _unpack_shared

STATE_FILE = "emdpo_state.npz"
TYPES_FILE = "emdpo_types.safetensors"


@dataclass
class EMState:
    responsibilities: np.ndarray    # (H, K) posteriors used by the current M-step
    log_weights: np.ndarray         # (K,) log mixture weights
    n_e_steps: int = 0              # E-steps done
    last_e_step_at: int = -1        # global step of the latest E-step
    history: list = field(default_factory=list)
    converged: bool = False


# ----------------------------------------------------------------------------------------
# The start


def check_init_responsibilities(init, H: int, K: int) -> np.ndarray:
    """The user's ``init_responsibilities``, checked and normalised per row."""
    if isinstance(init, dict):
        raise TypeError("init_responsibilities: a dict needs the annotator ids; pass an "
                        "(H, K) array in the order of trainer.annotator_ids_")
    r = np.asarray(init, dtype=np.float64)
    if r.shape != (H, K):
        raise ValueError(f"init_responsibilities: expected shape (H, K) = ({H}, {K}), got "
                         f"{r.shape}")
    bad = np.flatnonzero(~np.isfinite(r).all(1) | (r < 0).any(1) | ~(r.sum(1) > 0))
    if bad.size:
        raise ValueError(f"init_responsibilities: row {bad[0]} must be finite, >= 0 and not "
                         f"all zero, got {r[bad[0]].tolist()}")
    return r / r.sum(1, keepdims=True)


def response_embeddings(model, batch) -> torch.Tensor:
    """(M_b, D) mean of the last hidden state over each slot's response tokens."""
    if batch.get("layout") == "prefix_shared":
        batch = _unpack_shared(batch)     # one sequence per slot: simple and done once
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True, use_cache=False)
    h = out.hidden_states[-1].float()
    mask = batch["response_mask"].to(h.dtype)[..., None]
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def preference_features(emb: np.ndarray, layout: RowLayout) -> np.ndarray:
    """(H, D) standardised preference direction of each annotator: the mean over its
    rankings of sum_j (d ll / d r_j at r = 0) * emb_j, from the (M, D) slot embeddings."""
    zeros = np.zeros(layout.n_slots)
    _, grad = listwise_dpo_loss_and_grad(zeros, zeros, layout.offsets, beta=1.0,
                                         n_ranked=layout.n_ranked, reduction="sum")
    contrib = -grad[:, None] * emb           # d ll / d r_j times phi_j
    per_row = np.add.reduceat(contrib, layout.offsets[:-1], axis=0)
    X = np.zeros((layout.n_annotators, emb.shape[1]))
    np.add.at(X, layout.annotator, per_row)
    X /= np.bincount(layout.annotator, minlength=layout.n_annotators)[:, None]
    X -= X.mean(0)
    scale = X.std(0)
    return X / np.where(scale > 0, scale, 1.0)


def kmeans(X: np.ndarray, K: int, rng, n_iter: int = 100) -> np.ndarray:
    """Labels of k-means (k-means++ seeding, Lloyd iterations) on the rows of X."""
    H = X.shape[0]
    centers = np.empty((K, X.shape[1]))
    centers[0] = X[rng.integers(H)]
    d2 = ((X - centers[0]) ** 2).sum(1)
    for k in range(1, K):
        total = d2.sum()
        centers[k] = X[rng.choice(H, p=d2 / total) if total > 0 else rng.integers(H)]
        d2 = np.minimum(d2, ((X - centers[k]) ** 2).sum(1))
    labels = np.zeros(H, dtype=np.int64)
    for it in range(n_iter):
        dist = ((X[:, None, :] - centers[None]) ** 2).sum(-1)
        new = dist.argmin(1)
        if it > 0 and np.array_equal(new, labels):
            break
        labels = new
        for k in range(K):
            if np.any(labels == k):
                centers[k] = X[labels == k].mean(0)
    return labels


def smoothed_assignments(labels: np.ndarray, K: int) -> np.ndarray:
    """(H, K) posteriors of hard labels: the label gets 1 - INIT_SMOOTHING, the rest is
    spread, so that no type starts with an exactly zero weight for anybody."""
    H = labels.shape[0]
    resp = np.full((H, K), INIT_SMOOTHING / K)
    resp[np.arange(H), labels] += 1.0 - INIT_SMOOTHING
    return resp


# ----------------------------------------------------------------------------------------
# E-step and M-step weights


def mixture_log_weights(resp: np.ndarray, alpha: float) -> np.ndarray:
    """(K,) log mixture weights from (H, K) posteriors under a Dirichlet(alpha) prior."""
    H, K = resp.shape
    eta = (resp.sum(0) + alpha - 1.0) / (H + K * (alpha - 1.0))
    return np.log(np.maximum(eta, 1e-300))


def record_responsibilities(resp: np.ndarray, layout: RowLayout) -> np.ndarray:
    """(N, K) c_i g_{a_i k}: each record's weight times its annotator's posteriors."""
    return resp[layout.annotator] * layout.record_weights[:, None]


def m_step_weights(record_resp: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """(K, N) w_ik = c_i g_{a_i k} / T_k; a type with no weight left gets zeros (and a
    warning): it is not trained in this M-step."""
    tiny = 1e-12 * record_resp.shape[0]
    empty = np.flatnonzero(totals <= tiny)
    if empty.size:
        # stacklevel: past this function and the trainer's _set_record_weights.
        warnings.warn(f"type(s) {empty.tolist()} have no posterior weight left; they are "
                      f"not trained in this M-step (use fewer n_types or mixture_alpha > 1)",
                      UserWarning, stacklevel=4)
    scale = np.where(totals > tiny, 1.0 / np.maximum(totals, 1e-300), 0.0)
    return np.ascontiguousarray((record_resp * scale).T)


def e_step(em: EMState, layout: RowLayout, logps: torch.Tensor, ref_logps: torch.Tensor, *,
           my_rows: Optional[np.ndarray], beta: float, mixture_alpha: float, comm,
           step: int) -> dict:
    """One E-step: posteriors, mixture weights and observed-data log-likelihood from the
    (K, M) type and (M,) reference log-probabilities of the slots; updates ``em`` and
    returns its new history entry.

    ``my_rows``: with several processes, the rows whose slots this process computed (the
    others' slots hold 0 here); None: all rows. The kernel then adds the processes' (H, K)
    per-annotator sums over ``comm``, so every process gets all posteriors."""
    if my_rows is None:
        rows, ao = layout.order, layout.annotator_offsets
    else:
        # This process's rows, grouped by annotator, against all H annotators (empty
        # ranges for the others): sharding "record".
        mine = np.zeros(layout.n_rows, dtype=bool)
        mine[my_rows] = True
        rows = layout.order[mine[layout.order]]
        ao = np.zeros(layout.n_annotators + 1, dtype=np.int64)
        np.cumsum(np.bincount(layout.annotator[rows], minlength=layout.n_annotators),
                  out=ao[1:])
    lengths = np.diff(layout.offsets)[rows]
    offsets = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    slots = (np.repeat(layout.offsets[rows] - offsets[:-1], lengths)
             + np.arange(int(offsets[-1])))
    policy = logps.double().cpu().numpy()[:, slots]
    ref = ref_logps.double().cpu().numpy()[slots]
    res = _e_step_kernel(policy, ref, offsets, ao, em.log_weights, beta=beta,
                         n_ranked=layout.n_ranked[rows],
                         record_weights=layout.record_weights[rows], process_group=comm)
    resp = np.asarray(res.responsibilities, dtype=np.float64)
    em.responsibilities = resp
    em.log_weights = mixture_log_weights(resp, mixture_alpha)
    em.n_e_steps += 1
    em.last_e_step_at = step
    entry = {"em_iteration": em.n_e_steps, "step": step,
             "loglik": float(res.loglik), "loglik_per_record": float(res.loglik) / layout.n_rows,
             "weights": np.exp(em.log_weights).tolist()}
    em.history.append(entry)
    return entry


def heldout_metrics(layout: RowLayout, pairs, logps: torch.Tensor, ref_logps: torch.Tensor,
                    log_weights: np.ndarray, *, beta: float, prefix: str) -> dict:
    """Per-type implicit-reward accuracy and margin over the ranked ``pairs`` (hi, lo) of
    held-out rows, their observed-data log-likelihood per record under the mixture
    ``log_weights``, and the mixture weights."""
    hi, lo = pairs
    K = logps.shape[0]
    r = (beta * (logps.double() - ref_logps.double())).cpu().numpy()   # (K, M)
    metrics = {}
    margins = r[:, hi] - r[:, lo]
    for k in range(K):
        metrics[f"{prefix}_type{k}_accuracy"] = float((margins[k] > 0).mean())
        metrics[f"{prefix}_type{k}_margin"] = float(margins[k].mean())
    res = _e_step_kernel(logps.double().cpu().numpy()[:, layout.grouped_slots],
                         ref_logps.double().cpu().numpy()[layout.grouped_slots],
                         layout.grouped_offsets, layout.annotator_offsets, log_weights,
                         beta=beta, n_ranked=layout.n_ranked[layout.order],
                         record_weights=layout.record_weights[layout.order],
                         process_group=LocalComm())   # every process has every eval row
    metrics[f"{prefix}_loglik"] = float(res.loglik) / layout.n_rows
    for k in range(K):
        metrics[f"{prefix}_weight_{k}"] = float(np.exp(log_weights[k]))
    return metrics


# ----------------------------------------------------------------------------------------
# EM state files


def save_state(folder: str, em: EMState, layout: RowLayout, types, initial_types,
               ref_logps: torch.Tensor) -> None:
    """Write the EM state (posteriors, mixture weights, iteration, history, cached reference
    log-probabilities) and the weights of all K ``types`` (and their initial weights, when
    kept) into ``folder``, atomically and checksummed."""
    from safetensors.torch import save as st_save

    tensors = {n: v.contiguous().cpu() for n, v in types.state_dict().items()}
    if initial_types is not None:
        tensors.update({f"initial.{n}": v.contiguous().cpu() for n, v in initial_types.items()})
    blob = st_save(tensors)
    _io.atomic_write_bytes(os.path.join(folder, TYPES_FILE), blob)
    meta = {"format": "emdpo-hf-em-state", "version": 1, "n_e_steps": em.n_e_steps,
            "last_e_step_at": em.last_e_step_at, "history": em.history,
            "converged": em.converged, "layout": layout.fingerprint(),
            "types_sha256": _io.sha256(blob), "type_names": types.names}
    _io.save_arrays(os.path.join(folder, STATE_FILE),
                    {"responsibilities": em.responsibilities, "log_weights": em.log_weights,
                     "ref_logps": ref_logps.double().cpu().numpy()}, meta)


def load_state(folder: str, layout: RowLayout, types, *, reinit_types: bool, device):
    """Read what :func:`save_state` wrote, loading the K types' weights into ``types``;
    refuses damaged files and a checkpoint of another training set. Returns (EMState,
    initial type weights or None, (M,) float32 reference log-probabilities on ``device``)."""
    from safetensors.torch import load as st_load

    path = os.path.join(folder, STATE_FILE)
    arrays, meta = _io.load_arrays(path)
    if meta.get("format") != "emdpo-hf-em-state":
        raise ValueError(f"{path}: not an EMDPOTrainer state file")
    if meta["layout"] != layout.fingerprint():
        raise ValueError(f"{path}: saved for another training set (rows, slots, annotators "
                         f"{meta['layout'][:3]}, here {layout.fingerprint()[:3]})")
    if meta["type_names"] != types.names:
        raise ValueError(f"{path}: saved with types {meta['type_names']}, this trainer has "
                         f"{types.names}")
    tpath = os.path.join(folder, TYPES_FILE)
    if not os.path.isfile(tpath):
        raise FileNotFoundError(f"{tpath}: no such file")
    with open(tpath, "rb") as f:
        blob = f.read()
    if _io.sha256(blob) != meta["types_sha256"]:
        raise ValueError(f"{tpath}: checksum mismatch, the file is damaged; refusing to "
                         f"load it")
    tensors = st_load(blob)
    initial = {n[len("initial."):]: v for n, v in tensors.items() if n.startswith("initial.")}
    types.load_state_dict({n: v for n, v in tensors.items() if not n.startswith("initial.")})
    if reinit_types and not initial:
        raise ValueError(f"{tpath}: reinit_types=True but the checkpoint holds no initial "
                         f"type weights")
    em = EMState(responsibilities=arrays["responsibilities"],
                 log_weights=arrays["log_weights"], n_e_steps=meta["n_e_steps"],
                 last_e_step_at=meta["last_e_step_at"], history=meta["history"],
                 converged=meta["converged"])
    ref = torch.as_tensor(arrays["ref_logps"], dtype=torch.float32, device=device)
    return em, initial or None, ref
