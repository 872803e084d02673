"""The EM side of :class:`~emdpo_core.hf.EMDPOTrainer`: the EM state, the start (k-means
over the annotators' preference directions, on the host), the E-step over the cached
log-probabilities, the M-step's per-record type weights, the held-out metrics, and the EM
state files saved with every Trainer checkpoint.

The trainer computes log-probabilities (its no-grad passes) and owns the schedule; the
functions here take those log-probabilities as tensors and the rows as a
:class:`~emdpo_core.hf._records.RowLayout`. As in the EM engine, the E-step runs where the
log-probabilities are (the kernel takes the tensors on their device), the (H, K) posteriors
and the (K, N) M-step weights stay tensors there (built by ``em._responsibilities``), and per
E-step only K-sized values reach the host (log-likelihood, type totals, mixture weights).
The host is used where it must be: a multi-process E-step combines the processes' sums on
the host (``emdpo_core.e_step`` on a process group), state files, the fitted
``responsibilities_`` (NumPy, once per fit).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .._checks import check_responsibilities, to_numpy
from ..distributed import LocalComm
from ..distributed import e_step as _e_step_kernel
from ..em import _mixture
from ..em._initialization import smoothed_assignments  # noqa: F401 (the trainer's start)
from ..em._responsibilities import GroupedArrays
from ..ops import listwise_dpo_loss_and_grad
from . import _io
from ._records import RowLayout
from .logps import _unpack_shared

STATE_FILE = "emdpo_state.npz"
TYPES_FILE = "emdpo_types.safetensors"


@dataclass
class EMState:
    responsibilities: torch.Tensor  # (H, K) float64 posteriors of the current M-step, on
                                    # the training device
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
    return check_responsibilities(init, H, K, "init_responsibilities")


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


# ----------------------------------------------------------------------------------------
# The rows grouped by annotator, where the log-probabilities are


class Grouping:
    """The rows of a :class:`RowLayout` (or one process's share of them) grouped by
    annotator, as the E-step kernel reads them. It has the attributes that
    :class:`~emdpo_core.em._responsibilities.GroupedArrays` (``arrays``) reads, which copies
    the kernel's inputs to a device once and hands the same tensors to every E-step, and
    builds the M-step's record weights there.

    ``my_rows``: with several processes, the rows whose slots this process computed (the
    others' slots hold 0 here); None: all rows. The annotators are always all H of the
    layout (empty ranges for those with no row here): on a process group the kernel adds
    the processes' (H, K) per-annotator sums (sharding "record")."""

    unit_annotator_weight = True     # each annotator counts once

    def __init__(self, layout: RowLayout, my_rows: Optional[np.ndarray] = None):
        if my_rows is None:
            rows, ao = layout.order, layout.annotator_offsets
        else:
            mine = np.zeros(layout.n_rows, dtype=bool)
            mine[my_rows] = True
            rows = layout.order[mine[layout.order]]
            ao = np.zeros(layout.n_annotators + 1, dtype=np.int64)
            np.cumsum(np.bincount(layout.annotator[rows], minlength=layout.n_annotators),
                      out=ao[1:])
        lengths = np.diff(layout.offsets)[rows]
        self.offsets = np.zeros(rows.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.annotator_offsets = ao
        self.n_ranked = layout.n_ranked[rows]
        self.record_weight = layout.record_weights[rows]
        self.unit_record_weight = bool(np.all(self.record_weight == 1.0))
        self.n_annotators = layout.n_annotators
        self.annotator_weight = np.ones(layout.n_annotators)
        self.n_rows = layout.n_rows              # all rows (the log-likelihood is per row)
        # The slot of each grouped position, and the grouped position of each row (the
        # M-step reads weights by row); the latter only when all rows are here.
        self._slots = (np.repeat(layout.offsets[rows] - self.offsets[:-1], lengths)
                       + np.arange(int(self.offsets[-1])))
        self._position = None
        if my_rows is None:
            self._position = np.empty(rows.shape[0], dtype=np.int64)
            self._position[rows] = np.arange(rows.shape[0])
        self._index = {}                         # device -> (slots, position) tensors
        self.arrays = GroupedArrays(self)

    def _on(self, device):
        t = self._index.get(device)
        if t is None:
            t = tuple(None if a is None else torch.as_tensor(a, device=device)
                      for a in (self._slots, self._position))
            self._index[device] = t
        return t

    def e_step(self, logps: torch.Tensor, ref_logps: torch.Tensor, log_weights: np.ndarray,
               *, beta: float, comm):
        """The kernel's E-step (``emdpo_core.e_step`` on ``comm``) over the (K, M) type and
        (M,) reference log-probabilities of the layout's slots, on their device, in float64
        (the posteriors are tensors there)."""
        slots = self._on(logps.device)[0]
        policy = logps.to(torch.float64).index_select(1, slots)
        ref = ref_logps.to(torch.float64).index_select(0, slots)
        return _e_step_kernel(policy, ref, log_weights=log_weights, beta=beta,
                              process_group=comm, **self.arrays.e_step_inputs(policy))

    def record_responsibilities(self, resp: torch.Tensor) -> torch.Tensor:
        """(K, N) float64 c_i g_{a_i k} of every row, in row order, on resp's device."""
        w = self.arrays.record_weights(resp)     # grouped order
        return w.index_select(1, self._on(resp.device)[1])


# ----------------------------------------------------------------------------------------
# E-step and M-step weights


def log_mixture_weights(totals, alpha: float) -> np.ndarray:
    """(K,) log mixture weights from the type totals sum_h g_hk under a Dirichlet(alpha)
    prior (the EM engine's MAP weights). A type with weight 0 (alpha = 1) gets log 1e-300
    rather than -inf: the trainer drops no type, and its posteriors stay representable."""
    eta = _mixture.weights_from_totals(to_numpy(totals), alpha)
    return np.log(np.maximum(eta, 1e-300))


def initial_state(resp: np.ndarray, alpha: float, device) -> EMState:
    """The EM state of the first M-step: the starting (H, K) posteriors (host), moved to the
    training device, and their mixture weights."""
    totals = _mixture.type_totals(resp, np.ones(resp.shape[0]))
    return EMState(responsibilities=torch.as_tensor(resp, dtype=torch.float64, device=device),
                   log_weights=log_mixture_weights(totals, alpha))


def m_step_weights(record_resp: torch.Tensor, totals: np.ndarray) -> torch.Tensor:
    """(K, N) float32 w_ik = c_i g_{a_i k} / T_k on record_resp's device, from the (K, N)
    c_i g_{a_i k} and the (K,) totals T_k (host); a type with no weight left gets zeros (and
    a warning): it is not trained in this M-step."""
    tiny = 1e-12 * record_resp.shape[1]
    empty = np.flatnonzero(totals <= tiny)
    if empty.size:
        # stacklevel: past this function and the trainer's _set_record_weights.
        warnings.warn(f"type(s) {empty.tolist()} have no posterior weight left; they are "
                      f"not trained in this M-step (use fewer n_types or mixture_alpha > 1)",
                      UserWarning, stacklevel=4)
    scale = np.where(totals > tiny, 1.0 / np.maximum(totals, 1e-300), 0.0)
    scale = torch.as_tensor(scale, dtype=torch.float64, device=record_resp.device)
    return (record_resp * scale[:, None]).to(torch.float32)


def e_step(em: EMState, grouping: Grouping, logps: torch.Tensor, ref_logps: torch.Tensor, *,
           beta: float, mixture_alpha: float, comm, step: int) -> dict:
    """One E-step: posteriors, mixture weights and observed-data log-likelihood from the
    (K, M) type and (M,) reference log-probabilities of the slots; updates ``em`` and
    returns its new history entry. The posteriors stay on the log-probabilities' device;
    the log-likelihood and the K type totals come to the host.

    ``grouping``: this process's rows (see :class:`Grouping`); with several processes the
    kernel adds the processes' (H, K) per-annotator sums over ``comm``, so every process
    gets all posteriors."""
    res = grouping.e_step(logps, ref_logps, em.log_weights, beta=beta, comm=comm)
    em.responsibilities = res.responsibilities
    em.log_weights = log_mixture_weights(res.type_totals, mixture_alpha)
    em.n_e_steps += 1
    em.last_e_step_at = step
    loglik = float(res.loglik)
    entry = {"em_iteration": em.n_e_steps, "step": step,
             "loglik": loglik, "loglik_per_record": loglik / grouping.n_rows,
             "weights": np.exp(em.log_weights).tolist()}
    em.history.append(entry)
    return entry


def heldout_metrics(grouping: Grouping, pairs, logps: torch.Tensor, ref_logps: torch.Tensor,
                    log_weights: np.ndarray, *, beta: float, prefix: str) -> dict:
    """Per-type implicit-reward accuracy and margin over the ranked ``pairs`` (hi, lo) of
    held-out rows, their observed-data log-likelihood per record under the mixture
    ``log_weights``, and the mixture weights. Computed on the log-probabilities' device;
    K values per metric come to the host."""
    dev = logps.device
    hi, lo = (torch.as_tensor(x, device=dev) for x in pairs)
    r = beta * (logps.double() - ref_logps.double())          # (K, M)
    margins = r.index_select(1, hi) - r.index_select(1, lo)
    accuracy = to_numpy((margins > 0).double().mean(1))
    mean_margin = to_numpy(margins.mean(1))
    metrics = {}
    for k in range(logps.shape[0]):
        metrics[f"{prefix}_type{k}_accuracy"] = float(accuracy[k])
        metrics[f"{prefix}_type{k}_margin"] = float(mean_margin[k])
    # Every process has every eval row: no reduction.
    res = grouping.e_step(logps, ref_logps, log_weights, beta=beta, comm=LocalComm())
    metrics[f"{prefix}_loglik"] = float(res.loglik) / grouping.n_rows
    for k in range(logps.shape[0]):
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
                    {"responsibilities": to_numpy(em.responsibilities),
                     "log_weights": em.log_weights,
                     "ref_logps": ref_logps.double().cpu().numpy()}, meta)


def load_state(folder: str, layout: RowLayout, types, *, reinit_types: bool, device):
    """Read what :func:`save_state` wrote, loading the K types' weights into ``types``;
    refuses damaged files and a checkpoint of another training set. Returns (EMState with
    its posteriors on ``device``, initial type weights or None, (M,) float32 reference
    log-probabilities on ``device``)."""
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
    em = EMState(responsibilities=torch.as_tensor(arrays["responsibilities"],
                                                  dtype=torch.float64, device=device),
                 log_weights=arrays["log_weights"], n_e_steps=meta["n_e_steps"],
                 last_e_step_at=meta["last_e_step_at"], history=meta["history"],
                 converged=meta["converged"])
    ref = torch.as_tensor(arrays["ref_logps"], dtype=torch.float32, device=device)
    return em, initial or None, ref
