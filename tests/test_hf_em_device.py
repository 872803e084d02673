"""EMDPOTrainer's EM on the training device: the E-step kernel runs on the cached
log-probabilities where they are, the posteriors and the (K, N) M-step weights stay tensors
there, and per E-step only K-sized values reach the host.

The reference is the trainer's former host computation, written out here (HostEMTrainer):
the (K, M) log-probabilities copied to NumPy, the NumPy kernel, the mixture weights
(sum_h g_hk + alpha - 1) / (H + K (alpha - 1)) and the M-step weights built in NumPy and
copied to the device. Both trainers run the same tiny random Llama / GPT-2 from the same
seed; the fits must agree (see the tolerances where they are used).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from conftest import DEVICES
from hf_utils import require_hf

require_hf()
pytest.importorskip("peft")

import torch  # noqa: E402

from hf_utils import tiny_model, tiny_tokenizer  # noqa: E402
from test_hf_trainer import LORA_TARGETS, _seed, planted_rows  # noqa: E402

import emdpo_core as ec  # noqa: E402
from emdpo_core.hf import EMDPOConfig, EMDPOTrainer  # noqa: E402

LORA = {"llama": LORA_TARGETS, "gpt2": ["c_attn", "c_proj", "c_fc"]}


# Tiny models: one torch thread (see conftest.single_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _host_log_weights(resp, alpha):
    H, K = resp.shape
    eta = (resp.sum(0) + alpha - 1.0) / (H + K * (alpha - 1.0))
    return np.log(np.maximum(eta, 1e-300))


class HostEMTrainer(EMDPOTrainer):
    """The trainer's EM as it was computed on the host before it moved to the device (one
    process): every E-step copies the (K, M) table to NumPy, the M-step weights are built in
    NumPy and copied to the device."""

    def _initialize_em(self):
        super()._initialize_em()
        em = self._em
        em.responsibilities = em.responsibilities.cpu().numpy()   # the host start
        em.log_weights = _host_log_weights(em.responsibilities, self.args.mixture_alpha)
        self._set_record_weights()

    def _set_record_weights(self):
        lay = self._layout
        resp = self._em.responsibilities
        if isinstance(resp, torch.Tensor):     # set on the device by the trainer's start
            resp = resp.cpu().numpy()
        record_resp = resp[lay.annotator] * lay.record_weights[:, None]
        totals = record_resp.sum(0)
        tiny = 1e-12 * record_resp.shape[0]
        scale = np.where(totals > tiny, 1.0 / np.maximum(totals, 1e-300), 0.0)
        self._record_weights = torch.as_tensor(np.ascontiguousarray((record_resp * scale).T),
                                               dtype=torch.float32, device=self.args.device)

    def _e_step(self, log: bool = True) -> dict:
        lay, em, args = self._layout, self._em, self.args
        logps = self._pass_logps(self.train_dataset, lay, "train", reference=False, share=True)
        res = ec.e_step(logps.double().cpu().numpy()[:, lay.grouped_slots],
                        self._ref_logps.double().cpu().numpy()[lay.grouped_slots],
                        lay.grouped_offsets, lay.annotator_offsets, em.log_weights,
                        beta=args.beta, n_ranked=lay.n_ranked[lay.order],
                        record_weights=lay.record_weights[lay.order])
        em.responsibilities = np.asarray(res.responsibilities, dtype=np.float64)
        em.log_weights = _host_log_weights(em.responsibilities, args.mixture_alpha)
        em.n_e_steps += 1
        em.last_e_step_at = self.state.global_step
        entry = {"em_iteration": em.n_e_steps, "step": self.state.global_step,
                 "loglik": float(res.loglik), "loglik_per_record": float(res.loglik) / lay.n_rows,
                 "weights": np.exp(em.log_weights).tolist()}
        em.history.append(entry)
        self._set_record_weights()
        if log:
            self._log_e_step(entry)
        return entry


def _rows(kind, weighted):
    rows, _ = planted_rows(np.random.default_rng(_seed(f"em-device-{kind}")), 8, 4)
    if weighted:        # record weights c_i != 1: the kernel's and the M-step's weighted path
        w = np.random.default_rng(_seed("em-device-weights")).uniform(0.5, 2.0, len(rows))
        rows = [dict(r, weight=float(x)) for r, x in zip(rows, w)]
    return rows


def _train(cls, tmp_path, kind, device, rows, **overrides):
    from peft import LoraConfig

    kw = dict(n_types=2, beta=1.0, em_iterations=3, learning_rate=1e-2,
              per_device_train_batch_size=8, per_device_eval_batch_size=64, save_strategy="no",
              report_to=[], seed=0, disable_tqdm=True, logging_strategy="no",
              use_cpu=device == "cpu", prefix_sharing=False)
    kw.update(overrides)
    trainer = cls(model=tiny_model(kind, seed=0), args=EMDPOConfig(str(tmp_path), **kw),
                  train_dataset=rows, eval_dataset=rows[:8], processing_class=tiny_tokenizer(),
                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA[kind],
                                         lora_dropout=0.0))
    trainer.train()
    return trainer


def _em_logs(trainer):
    return [{k: v for k, v in e.items() if k.startswith("em/")}
            for e in trainer.state.log_history if any(k.startswith("em/") for k in e)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, weighted, alpha", [("llama", False, 1.0),
                                                   ("gpt2", True, 3.0)])
def test_trainer_on_the_device_equals_the_host_computation(tmp_path, device, kind, weighted,
                                                           alpha):
    rows = _rows(kind, weighted)
    dev = _train(EMDPOTrainer, tmp_path / "dev", kind, device, rows, mixture_alpha=alpha)
    host = _train(HostEMTrainer, tmp_path / "host", kind, device, rows, mixture_alpha=alpha)
    assert isinstance(dev._em.responsibilities, torch.Tensor)
    assert dev._em.responsibilities.device.type == device
    assert dev._record_weights.device.type == device
    if device == "cpu":
        # The same CPU kernel on the same float64 inputs. Mixture weights: the engine's MAP
        # formula divides by sum_k T_k (= H up to rounding) and, for alpha > 2, scales first
        # (_mixture._dirichlet_map), so log weights and through them the next posteriors
        # differ from the host formula by float64 rounding only: 1e-13 relative allows
        # ~400 ulps over 3 E-steps (measured: at most a few ulps).
        tol = dict(rtol=1e-13, atol=1e-15)
        param_tol = dict(rtol=0, atol=0)
    else:
        # The CUDA kernel against the host's CPU kernel: the CPU-vs-CUDA E-step bound of
        # test_emdpo (1e-6 relative); the M-step weights are float32 either way.
        tol = dict(rtol=1e-6, atol=1e-9)
        param_tol = dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dev.responsibilities_, host.responsibilities_, **tol)
    np.testing.assert_allclose(dev.weights_, host.weights_, **tol)
    np.testing.assert_allclose(dev.loglik_history_, host.loglik_history_, **tol)
    a, b = _em_logs(dev), _em_logs(host)
    assert len(a) == len(b) == 3 and [x.keys() for x in a] == [x.keys() for x in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], **tol)
    # M-step weights: c_i g_{a_i k} / T_k with T_k summed in another order; in float32 they
    # are the same numbers (an ulp of T_k in float64 moves w by far less than float32's).
    torch.testing.assert_close(dev._record_weights, host._record_weights, **param_tol)
    sa, sb = dev._types.state_dict(), host._types.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], **param_tol, msg=n)
    # Held-out metrics: margins' means are sums in another order.
    ma, mb = dev.evaluate(), host_evaluate(host)
    assert ma.keys() - {"epoch"} == mb.keys()       # evaluate() logs the epoch with them
    for k in mb:
        np.testing.assert_allclose(ma[k], mb[k], **tol, err_msg=k)


def host_evaluate(trainer):
    """trainer.evaluate() as computed on the host before (NumPy margins and kernel)."""
    from emdpo_core.hf._records import build_layout, ranked_pairs

    rows = trainer._eval_rows
    lay = build_layout(rows, "eval_dataset")
    key = "host-eval"
    ref = trainer._pass_logps(rows, lay, key, reference=True)
    logps = trainer._pass_logps(rows, lay, key, reference=False)
    hi, lo = ranked_pairs(lay)
    beta = trainer.args.beta
    r = (beta * (logps.double() - ref.double())).cpu().numpy()
    margins = r[:, hi] - r[:, lo]
    out = {}
    for k in range(r.shape[0]):
        out[f"eval_type{k}_accuracy"] = float((margins[k] > 0).mean())
        out[f"eval_type{k}_margin"] = float(margins[k].mean())
    res = ec.e_step(logps.double().cpu().numpy()[:, lay.grouped_slots],
                    ref.double().cpu().numpy()[lay.grouped_slots], lay.grouped_offsets,
                    lay.annotator_offsets, trainer._em.log_weights, beta=beta,
                    n_ranked=lay.n_ranked[lay.order], record_weights=lay.record_weights[lay.order])
    out["eval_loglik"] = float(res.loglik) / lay.n_rows
    for k in range(r.shape[0]):
        out[f"eval_weight_{k}"] = float(np.exp(trainer._em.log_weights[k]))
    return out


# ----------------------------------------------------------------------------------------
# What crosses to the host per E-step


class HostCopies:
    """Records every tensor -> host conversion (numpy, cpu, tolist, item) made while the
    trainer runs an E-step (its no-grad passes, the kernel, the M-step weights). On the CPU
    the ops layer's are left out: its CPU kernels run on zero-copy NumPy views of CPU
    tensors. On a GPU they count."""

    def __init__(self, monkeypatch, device):
        self.per_e_step = []
        self._inside = False
        pkg = os.path.dirname(os.path.abspath(ec.__file__)) + os.sep
        ops_dir = os.path.join(pkg, "ops") + os.sep
        skip_ops = device == "cpu"
        for name in ("numpy", "cpu", "tolist", "item"):
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, _name=name, **kw):
                if self._inside:
                    f, from_ops = sys._getframe(1), False
                    while f is not None:
                        from_ops |= f.f_code.co_filename.startswith(ops_dir)
                        f = f.f_back
                    if not (skip_ops and from_ops):
                        self.per_e_step[-1].append((_name, tuple(t.shape)))
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapped)
        e_step = EMDPOTrainer._e_step

        def watched(trainer, *a, **kw):
            self.per_e_step.append([])
            self._inside = True
            try:
                return e_step(trainer, *a, **kw)
            finally:
                self._inside = False

        monkeypatch.setattr(EMDPOTrainer, "_e_step", watched)


@pytest.mark.parametrize("device", DEVICES)
def test_only_k_sized_values_reach_the_host_per_e_step(tmp_path, device, monkeypatch):
    rows = _rows("llama", True)
    n_rows = len(rows)
    H = len({r["annotator"] for r in rows})
    M = sum(len(r["responses"]) for r in rows)
    K = 2
    with monkeypatch.context() as m:
        copies = HostCopies(m, device)
        tr = _train(EMDPOTrainer, tmp_path, "llama", device, rows, n_types=K)
    assert tr.args.em_iterations == 3 and len(copies.per_e_step) == 3
    assert any(copies.per_e_step), "the recorder saw no conversion at all"
    small = min(H, n_rows)        # K = 2 values (and the kernel's status flags) are smaller
    for i, calls in enumerate(copies.per_e_step):
        sizes = [int(np.prod(shape)) for _, shape in calls]
        # Nothing of the data's size: no (K, M) log-probability table, no (N, K) or (K, N)
        # weights, no (H, K) posteriors (on a GPU the first E-step may check the kernel's
        # index arrays once on the host; they are the same tensors afterwards).
        for (name, shape), size in zip(calls, sizes):
            assert shape not in ((K, M), (M,), (K, n_rows), (n_rows, K), (H, K)), (i, name, shape)
            if i > 0 or device == "cpu":
                assert size < small, (i, name, shape)
    # Every E-step converts the same (K-sized) values.
    assert copies.per_e_step[1] == copies.per_e_step[2]
