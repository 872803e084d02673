"""Saving fitted EM models and checkpoints of unfinished fits: one .npz file, NumPy arrays
plus a JSON header (no pickled objects), written atomically (emdpo_core._io.atomic_write).
On load every field is checked (what a file may set, and how, is in docs/guarantees.md):
a damaged or foreign file is refused with an error naming the file and the field."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from .._checks import clip, clip_message, describe
from .._io import atomic_write
from .._checks import to_numpy

_FORMAT_VERSION = 1


@dataclass
class _Run:
    """One EM run's state at an iteration boundary (after an E-step)."""

    restart: int
    n_iter: int
    log_weights: np.ndarray            # (K,)
    resp: Any                          # (H, K) NumPy, or a torch family's tensor on its device
    loglik: float
    objective: float
    trace: List[float]                 # objective / total weight after each E-step
    converged: bool = False
    components: Optional[np.ndarray] = None   # original index of each component still held
    dropped: List[List[int]] = field(default_factory=list)   # [iteration, original index]
    # sum_h v_h g_hk from the E-step that made resp (not saved: a resumed run recomputes it)
    totals: Optional[np.ndarray] = None


class Persistence:
    """save / load / checkpoints of :class:`~emdpo_core.EMEstimator` (a mixin: it reads the
    estimator's parameters, fitted attributes and family state)."""

    def _restore_fitted(self, meta) -> None:
        """Subclass hook: restore extra fitted attributes saved by ``_fitted_state``."""

    _SKIP_PARAMS: tuple = ()   # parameters that cannot go to JSON (given again to load)

    def _params_json(self):
        meta, arrays = {}, {}
        for p in self._file_params():
            v = getattr(self, p)
            if isinstance(v, np.ndarray):
                arrays[f"param/{p}"] = v
                meta[p] = {"__array__": f"param/{p}"}
            elif isinstance(v, np.random.Generator):
                meta[p] = None   # the drawn seed is stored; resume is exact anyway
            elif isinstance(v, (np.integer, np.floating)):
                meta[p] = v.item()
            else:
                meta[p] = v
        return meta, arrays

    # Fitted attributes written by save (those a from_parameters model lacks are skipped).
    # name -> kind checked on load ("real", "int", "bool", "list").
    _FITTED_SCALARS = {"loglik_": "real", "objective_": "real", "log_prior_": "real",
                       "lower_bound_": "real", "converged_": "bool", "n_iter_": "int",
                       "n_components_": "int", "dropped_components_": "list",
                       "restarts_": "list"}

    def _fitted_state(self):
        arrays = {"weights": self.weights_}
        for name in ("lower_bounds_", "responsibilities_"):
            if getattr(self, name, None) is not None:
                arrays[name.rstrip("_")] = getattr(self, name)
        for k, v in self.family_.state_dict().items():
            arrays[f"family/{k}"] = v
        meta = {name: getattr(self, name) for name in self._FITTED_SCALARS
                if hasattr(self, name)}
        meta["n_annotators_fit"] = getattr(self, "_n_annotators_fit", None)
        return meta, arrays

    def _run_arrays(self, prefix, run: _Run):
        # A distributed fit's responsibilities are spread over the ranks: not saved (resume
        # recomputes them with an E-step).
        shards = getattr(self, "_shards", None)
        resp = run.resp[:0] if shards is not None and shards.distributed else run.resp
        resp = to_numpy(resp)        # a torch family's run keeps them on its device
        return {f"{prefix}/log_weights": run.log_weights, f"{prefix}/resp": resp,
                f"{prefix}/trace": np.asarray(run.trace), f"{prefix}/components": run.components}

    @staticmethod
    def _run_meta(run: _Run):
        return {"restart": run.restart, "n_iter": run.n_iter, "loglik": run.loglik,
                "objective": run.objective, "converged": run.converged, "dropped": run.dropped}

    @staticmethod
    def _run_from(meta, arrays, prefix) -> _Run:
        return _Run(restart=meta["restart"], n_iter=meta["n_iter"],
                    log_weights=arrays[f"{prefix}/log_weights"], resp=arrays[f"{prefix}/resp"],
                    loglik=meta["loglik"], objective=meta["objective"],
                    trace=arrays[f"{prefix}/trace"].tolist(), converged=meta["converged"],
                    components=arrays[f"{prefix}/components"],
                    dropped=[list(x) for x in meta["dropped"]])

    def _write(self, path, status, meta_extra, arrays):
        from .._core import __version__

        params, parr = self._params_json()
        meta = {"format": _FORMAT_VERSION, "class": type(self).__name__, "version": __version__,
                "status": status, "params": params, **meta_extra}
        arrays = {**parr, **arrays,
                  "__meta__": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)

    def _save_checkpoint(self, g, best, summaries, run, next_restart, n_runs, run_family=None):
        """In-progress state: the best finished run so far, the restart summaries, and the
        current run (None between restarts) with its family state."""
        shards = getattr(self, "_shards", None)
        if self.checkpoint is None or (shards is not None and not shards.is_writer):
            return                     # distributed fits: rank 0 writes
        t0 = time.perf_counter()
        fingerprint = getattr(self, "_fingerprint", None) or g.fingerprint()
        meta = {"seed": self._fit_seed, "fingerprint": fingerprint, "n_runs": n_runs,
                "next_restart": next_restart, "summaries": summaries, "best": None,
                "run": None}
        arrays = {}
        if best is not None:
            meta["best"] = self._run_meta(best["run"])
            arrays.update(self._run_arrays("best", best["run"]))
            arrays.update({f"best_family/{k}": v for k, v in best["family"].items()})
        if run is not None:
            meta["run"] = self._run_meta(run)
            arrays.update(self._run_arrays("run", run))
            fam = run_family if run_family is not None else self.family_.state_dict()
            arrays.update({f"run_family/{k}": v for k, v in fam.items()})
        self._write(self.checkpoint, "in_progress", meta, arrays)
        self.timings_["checkpoint"] += time.perf_counter() - t0

    def save(self, path) -> None:
        """Write the fitted model (parameters, fitted attributes, the family's state) to one
        .npz file: NumPy arrays plus a JSON header, no pickled objects."""
        self._check_fitted()
        meta, arrays = self._fitted_state()
        self._write(path, "fitted", {"fitted": meta}, arrays)

    # Parameters a model file may set: every constructor parameter except these, which name
    # a path (a file must never make a later call touch the file system) or an object (given
    # again to load, see _SKIP_PARAMS).
    _NOT_FROM_FILES = ("checkpoint",)

    @classmethod
    def _file_params(cls):
        """The allow-list: parameters a model file may carry."""
        return [p for p in cls._param_names()
                if p not in cls._NOT_FROM_FILES and p not in cls._SKIP_PARAMS]

    @classmethod
    def load(cls, path, **params):
        """Read a model written by :meth:`save`, or a checkpoint of an unfinished fit (then
        ``fit(data)`` on the result resumes it on the same data; pass ``checkpoint=path`` to
        keep checkpointing). ``params`` override or supply parameters that were not stored
        (e.g. a family object).

        Everything is checked before use (docs/guarantees.md): a damaged or foreign file, a
        header that is not JSON or lacks a field, a parameter outside the allow-list
        (:meth:`_file_params`) or with a value the estimator refuses, weights that are not a
        distribution, family arrays of the wrong shape or with non-finite values: ValueError
        naming the file and the field."""
        path = os.fspath(path)
        arrays = _read_npz(path)
        meta = _read_header(path, arrays)

        def bad(field, what):
            return ValueError(f"{path}: {field}: {what}")

        if meta["class"] != cls.__name__:
            raise bad("class", f"the file holds a {clip(meta['class'])}, not a {cls.__name__}")
        if meta["format"] != _FORMAT_VERSION:
            raise bad("format", f"{clip(meta['format'])} is not supported (expected "
                                f"{_FORMAT_VERSION})")
        allowed = cls._file_params()
        kw = {}
        for p, v in meta["params"].items():
            if p not in allowed:
                if p in cls._NOT_FROM_FILES and v is None:
                    continue           # files written before the allow-list say checkpoint: null
                raise bad(f"params.{clip(p)}", f"not a parameter a model file may set (allowed: "
                                               f"{', '.join(allowed)})")
            if isinstance(v, dict):
                ref = v.get("__array__")
                if list(v) != ["__array__"] or ref not in arrays:
                    raise bad(f"params.{p}", f"expected a JSON value or a reference to an array "
                                             f"of the file, got {clip(v)}")
                v = arrays[ref]
            elif isinstance(v, list):
                raise bad(f"params.{p}", f"expected a JSON number, string, boolean or null, got "
                                         f"a list")
            kw[p] = v
        kw.update(params)
        est = cls(**kw)
        try:
            est._check_params()
        except (TypeError, ValueError) as e:
            raise bad("params", clip_message(e)) from None
        est.family_ = est._make_family()

        def sub(prefix):
            n = len(prefix) + 1
            return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}

        def load_family(prefix):
            try:
                est.family_.load_state_dict(sub(prefix))
            except (TypeError, ValueError, KeyError, RuntimeError) as e:
                raise bad(prefix, clip_message(e)) from None

        if meta["status"] == "fitted":
            f = _field(path, meta, "fitted", dict)
            load_family("family")
            K = est.family_.n_components
            est.weights_ = _distribution(path, "weights", _array(path, arrays, "weights"), K)
            if "responsibilities" in arrays:
                est.responsibilities_ = _distribution(path, "responsibilities",
                                                      arrays["responsibilities"], K, rows=True)
            else:
                est.responsibilities_ = None
            if "lower_bounds" in arrays:
                est.lower_bounds_ = _real_array(path, "lower_bounds", arrays["lower_bounds"], 1)
            for name, kind in cls._FITTED_SCALARS.items():
                if name in f:
                    setattr(est, name, _typed(path, f"fitted.{name}", f[name], kind))
            n_fit = f.get("n_annotators_fit")
            if n_fit is not None:
                est._n_annotators_fit = _typed(path, "fitted.n_annotators_fit", n_fit, "real")
            est._restore_fitted(f)
        else:  # "in_progress" (_read_header checked the status)
            try:
                best = None
                if meta["best"] is not None:
                    best = {"run": cls._run_from(meta["best"], arrays, "best"),
                            "family": sub("best_family")}
                run = cls._run_from(meta["run"], arrays, "run") if meta["run"] is not None \
                    else None
                est._pending = {"seed": int(meta["seed"]), "fingerprint": str(meta["fingerprint"]),
                                "n_runs": int(meta["n_runs"]),
                                "next_restart": int(meta["next_restart"]),
                                "summaries": list(meta["summaries"]), "best": best, "run": run,
                                "run_family": sub("run_family") if run is not None else None}
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise bad("checkpoint", f"missing or malformed field {clip(str(e))}") from None
        return est


# ----------------------------------------------------------------------------------------
# Reading and checking a model file (every error names the file and the field)

_HEADER_FIELDS = {"format": int, "class": str, "status": str, "params": dict}
_STATUS_FIELDS = {"fitted": ("fitted",),
                  "in_progress": ("seed", "fingerprint", "n_runs", "next_restart", "summaries",
                                  "best", "run")}
# Weights and posteriors must sum to 1 within rounding: they are normalized in float64 when
# written (sums of K terms, K << 1e6, so errors stay far below this).
_SUM_TOLERANCE = 1e-8


def _read_npz(path: str) -> dict:
    """Every array of an .npz file; a file that is not a readable zip of plain arrays is a
    ValueError (a missing file stays an OSError)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            return {k: z[k] for k in z.files}
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, zlib, format and pickle errors alike
        raise ValueError(f"{path}: not a readable model file (damaged or not an .npz archive "
                         f"of arrays: {type(e).__name__}: {clip_message(e)})") from None


def _read_header(path: str, arrays: dict) -> dict:
    raw = arrays.pop("__meta__", None)
    if raw is None:
        raise ValueError(f"{path}: header: no __meta__ entry (not an emdpo_core model file)")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{path}: header: expected bytes (uint8), got {describe(raw)}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: header: not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: header: not valid JSON ({clip_message(e)})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: header: expected a JSON object, got {type(meta).__name__}")
    for name, kind in _HEADER_FIELDS.items():
        _field(path, meta, name, kind)
    if meta["status"] not in _STATUS_FIELDS:
        raise ValueError(f"{path}: status: expected 'fitted' or 'in_progress', got "
                         f"{clip(meta['status'])}")
    for name in _STATUS_FIELDS[meta["status"]]:
        if name not in meta:
            raise ValueError(f"{path}: {name}: missing from the header")
    return meta


def _field(path, meta, name, kind):
    if name not in meta:
        raise ValueError(f"{path}: {name}: missing from the header")
    v = meta[name]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"{path}: {name}: expected a JSON {kind.__name__}, got {clip(v)}")
    return v


def _typed(path, field, v, kind):
    """A fitted scalar of the header, checked: 'real', 'int', 'bool' or 'list'."""
    ok = {"real": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          "int": lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
          "bool": lambda x: isinstance(x, bool),
          "list": lambda x: isinstance(x, list)}[kind](v)
    if not ok:
        want = {"real": "a number", "int": "an integer >= 0", "bool": "true or false",
                "list": "a list"}[kind]
        raise ValueError(f"{path}: {field}: expected {want}, got {clip(v)}")
    return v


def _array(path, arrays, name):
    if name not in arrays:
        raise ValueError(f"{path}: {name}: missing from the file")
    return arrays[name]


def _real_array(path, name, a, ndim):
    if a.dtype.kind != "f":
        raise ValueError(f"{path}: {name}: expected floating-point values, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{path}: {name}: expected a {ndim}-D array, got shape {a.shape}")
    bad = np.flatnonzero(~np.isfinite(a.reshape(-1)))
    if bad.size:
        idx = np.unravel_index(bad[0], a.shape)
        raise ValueError(f"{path}: {name}: non-finite value {a[idx]} at index "
                         f"{idx if ndim > 1 else idx[0]}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _distribution(path, name, a, K, rows=False):
    """(K,) weights, or (H, K) posteriors with rows=True: finite, >= 0, summing to 1."""
    a = _real_array(path, name, a, 2 if rows else 1)
    if a.shape[-1] != K:
        raise ValueError(f"{path}: {name}: expected {K} entries per "
                         f"{'row' if rows else 'array'} (the family holds K={K} types), got "
                         f"shape {a.shape}")
    neg = np.flatnonzero(a.reshape(-1) < 0)
    if neg.size:
        idx = np.unravel_index(neg[0], a.shape)
        raise ValueError(f"{path}: {name}: negative value {a[idx]} at index "
                         f"{idx if rows else idx[0]}")
    sums = a.sum(axis=-1).reshape(-1)
    off = np.flatnonzero(np.abs(sums - 1.0) > _SUM_TOLERANCE)
    if off.size:
        where = f" (row {off[0]})" if rows else ""
        raise ValueError(f"{path}: {name}: expected values summing to 1{where}, got "
                         f"{sums[off[0]]!r}")
    return a
