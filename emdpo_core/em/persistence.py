"""Saving fitted EM models and checkpoints of unfinished fits: one .npz file, NumPy arrays
plus a JSON header (no pickled objects), written atomically (a temporary file, then a rename),
refused on load when it is not one of ours."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

_FORMAT_VERSION = 1


@dataclass
class _Run:
    """One EM run's state at an iteration boundary (after an E-step)."""

    restart: int
    n_iter: int
    log_weights: np.ndarray            # (K,)
    resp: np.ndarray                   # (H, K)
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
        for p in self._param_names():
            if p in self._SKIP_PARAMS:
                continue
            v = getattr(self, p)
            if isinstance(v, np.ndarray):
                arrays[f"param/{p}"] = v
                meta[p] = {"__array__": f"param/{p}"}
            elif isinstance(v, np.random.Generator):
                meta[p] = None   # the drawn seed is stored; resume is exact anyway
            elif isinstance(v, os.PathLike):
                meta[p] = os.fspath(v)
            elif isinstance(v, (np.integer, np.floating)):
                meta[p] = v.item()
            else:
                meta[p] = v
        return meta, arrays

    # Fitted attributes written by save (those a from_parameters model lacks are skipped).
    _FITTED_SCALARS = ("loglik_", "objective_", "log_prior_", "lower_bound_", "converged_",
                       "n_iter_", "n_components_", "dropped_components_", "restarts_")

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

    @staticmethod
    def _run_arrays(prefix, run: _Run):
        return {f"{prefix}/log_weights": run.log_weights, f"{prefix}/resp": run.resp,
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
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    def _save_checkpoint(self, g, best, summaries, run, next_restart, n_runs, run_family=None):
        """In-progress state: the best finished run so far, the restart summaries, and the
        current run (None between restarts) with its family state."""
        if self.checkpoint is None:
            return
        t0 = time.perf_counter()
        meta = {"seed": self._fit_seed, "fingerprint": g.fingerprint(), "n_runs": n_runs,
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

    @classmethod
    def load(cls, path, **params):
        """Read a model written by :meth:`save`, or a checkpoint of an unfinished fit (then
        ``fit(data)`` on the result resumes it on the same data). ``params`` override or
        supply parameters that were not stored (e.g. a family object)."""
        path = os.fspath(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if "__meta__" not in arrays:
            raise ValueError(f"{path}: not an emdpo_core model file (no __meta__ entry)")
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{path}: holds a {meta.get('class')}, not a {cls.__name__}")
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{path}: format {meta.get('format')} is not supported "
                             f"(expected {_FORMAT_VERSION})")
        kw = {}
        for p, v in meta["params"].items():
            kw[p] = arrays[v["__array__"]] if isinstance(v, dict) and "__array__" in v else v
        kw.update(params)
        est = cls(**kw)
        est.family_ = est._make_family()

        def sub(prefix):
            n = len(prefix) + 1
            return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}

        if meta["status"] == "fitted":
            f = meta["fitted"]
            est.family_.load_state_dict(sub("family"))
            est.weights_ = arrays["weights"]
            est.responsibilities_ = arrays.get("responsibilities")
            if "lower_bounds" in arrays:
                est.lower_bounds_ = arrays["lower_bounds"]
            for name in cls._FITTED_SCALARS:
                if name in f:
                    setattr(est, name, f[name])
            if f.get("n_annotators_fit") is not None:
                est._n_annotators_fit = f["n_annotators_fit"]
            est._restore_fitted(f)
        elif meta["status"] == "in_progress":
            best = None
            if meta["best"] is not None:
                best = {"run": cls._run_from(meta["best"], arrays, "best"),
                        "family": sub("best_family")}
            run = cls._run_from(meta["run"], arrays, "run") if meta["run"] is not None else None
            est._pending = {"seed": meta["seed"], "fingerprint": meta["fingerprint"],
                            "n_runs": meta["n_runs"], "next_restart": meta["next_restart"],
                            "summaries": meta["summaries"], "best": best, "run": run,
                            "run_family": sub("run_family") if run is not None else None}
        else:
            raise ValueError(f"{path}: unknown status {meta['status']!r}")
        return est