"""EMDPOTrainer: EM-DPO on a Hugging Face causal language model, as a transformers Trainer.

The K latent annotator types are K LoRA adapters on one base model (or, for small models, K
full copies); the reference policy is the base with the adapters disabled. Training
alternates, inside one ``Trainer.train()`` (so TrainingArguments, accelerate, mixed
precision, gradient accumulation, logging, callbacks and checkpoints all work as usual):

- **M-step**: ordinary optimizer steps on the weighted listwise DPO loss of all K types
  (:func:`emdpo_core.torch.mixture_dpo_loss`), record i of annotator a weighted for type k by
  the posterior g_ak divided by the type's total weight T_k = sum_i g_{a_i k} over the whole
  training set. Each micro-batch's loss is a sum over its records, so the micro-batches of an
  epoch add up exactly to the full-data objective sum_k (1/T_k) sum_i g_{a_i k} (-ll_ik).
- **E-step** (every ``e_step_every`` optimizer steps, default every epoch, and once at the
  end): no-grad log-probabilities of every slot under every type, then the fused kernel
  :func:`emdpo_core.e_step` gives each annotator's posterior over the types from all of its
  rankings, the mixture weights and the observed-data log-likelihood (logged).

The reference log-probabilities are computed once, before the first step, and cached per
slot. The EM state (posteriors, mixture weights, iteration, cached reference, type weights)
is saved with every Trainer checkpoint and restored by ``train(resume_from_checkpoint=...)``.
See docs/hf.md.

This module is the Trainer subclass: construction, the no-grad log-probability passes, the
schedule of E- and M-steps, the loss, evaluation and checkpoints. The rows as records and
slots are in ``_records.py``; the EM computations (the start on the host; E-step and
M-step weights on the training device; held-out metrics, EM state files) in ``_em.py``.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from .. import distributed
from .._checks import to_numpy
from ..distributed import LocalComm
from ..torch import mixture_dpo_loss
from . import _em
from ._records import (ROW_COLUMNS, ROW_INDEX, IndexedRows, RowLayout, build_layout,
                       ranked_pairs, slots_of)
from ._types import FullParameterTypes, _FullTypes, _LoraTypes
from .aggregate import aggregate_types
from .collator import RankedListCollator
from .config import EMDPOConfig
from .logps import sequence_logps

_logger = logging.getLogger(__name__)

__all__ = ["EMDPOTrainer", "EMDPOConfig"]

# The EM state files of a checkpoint folder (written by save_em_state).
STATE_FILE = _em.STATE_FILE
TYPES_FILE = _em.TYPES_FILE


class _EMSchedule(TrainerCallback):
    """Runs the E-step between two M-steps (at the end of an optimizer step, before the
    Trainer logs and saves, so a checkpoint holds the posteriors of the next M-step)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if (state.global_step % t._steps_per_m_step == 0 and state.global_step < state.max_steps
                and t._em.last_e_step_at != state.global_step):
            t._between_m_steps(control)
        return control


# ----------------------------------------------------------------------------------------
# The trainer


class EMDPOTrainer(Trainer):
    """EM-DPO over K latent annotator types on a Hugging Face causal LM.

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel``), not yet wrapped by peft.
        args: an :class:`EMDPOConfig`.
        train_dataset: ranked rows (a ``datasets.Dataset`` or a list of dicts) with
            ``prompt``, ``responses`` (best first), optional ``n_ranked`` and ``annotator``.
        eval_dataset: optional ranked rows for :meth:`evaluate` (per-type implicit-reward
            accuracy and margins, held-out mixture log-likelihood).
        processing_class: the tokenizer.
        peft_config: a ``peft.LoraConfig``: each type is one adapter with this config.
            Required unless ``args.full_parameter_types``.
        init_responsibilities: optional start, (H, K) posteriors with rows following
            ``trainer.annotator_ids_`` (the sorted annotator ids) or a dict
            {annotator id: K weights}; overrides ``args.init``.
        data_collator: default :class:`RankedListCollator` (``max_length``,
            ``max_prompt_length`` from ``args``).
        callbacks, optimizers: as for ``transformers.Trainer``.

    Why the types start different: a fresh LoRA adapter (B = 0) leaves the base model
    unchanged, so K fresh adapters are K copies of the base and a first E-step would give
    every annotator uniform posteriors. The first M-step therefore starts from given or
    clustered posteriors instead of an E-step: ``init="kmeans"`` clusters the annotators by
    their preference direction in the base model's response embeddings (mean over an
    annotator's rankings of sum_j (d ll / d r_j at r = 0) * embedding_j; for a pair that is
    (chosen - rejected) / 2), ``"random"`` draws Dirichlet posteriors, and
    ``init_responsibilities`` takes yours. Each type's first M-step is then trained on a
    different weighting of the data, which breaks the symmetry.

    Fitted attributes (after ``train()``): ``responsibilities_`` (H, K) posteriors from the
    final E-step, rows following ``annotator_ids_``; ``weights_`` (K,) mixture weights;
    ``loglik_`` the observed-data log-likelihood; ``loglik_history_`` per E-step;
    ``n_iter_`` M-steps done; ``converged_`` (with ``em_tol``).
    """

    def __init__(self, model=None, args: Optional[EMDPOConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None,
                 init_responsibilities=None, data_collator=None, callbacks=None,
                 optimizers=(None, None), **kwargs):
        if args is None:
            raise ValueError("args: pass an EMDPOConfig(output_dir, n_types=..., beta=...)")
        if not isinstance(args, EMDPOConfig):
            raise TypeError(f"args: expected an EMDPOConfig, got {type(args).__name__}")
        if model is None or isinstance(model, str):
            raise TypeError("model: pass an instantiated transformers causal LM (for example "
                            "AutoModelForCausalLM.from_pretrained(name))")
        if train_dataset is None:
            raise ValueError("train_dataset: ranked rows are required")
        if processing_class is None:
            raise ValueError("processing_class: pass the tokenizer")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer_ = tokenizer
        K = args.n_types

        self._layout = build_layout(train_dataset, "train_dataset")
        self.annotator_ids_ = list(self._layout.annotator_ids)
        H = self._layout.n_annotators
        self._init_resp = None
        if init_responsibilities is not None:
            self._init_resp = _em.check_init_responsibilities(init_responsibilities, H, K)
        elif K > H:
            raise ValueError(f"n_types={K} exceeds the number of annotators H={H}")

        self._types = self._make_types(model, peft_config, args)

        if data_collator is None:
            # prefix_sharing=None (the default): the prompt is encoded once per ranked list
            # wherever the model supports it (supports_prefix_sharing), else the padded layout.
            data_collator = RankedListCollator.for_model(
                tokenizer, self._types.model, max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                **({} if args.prefix_sharing is None else {"prefix_sharing": args.prefix_sharing}))
        # Which layout the trainer's own passes take ("prefix_shared" or "padded"), said once.
        self.layout_ = getattr(data_collator, "layout", "custom collator")
        _logger.info("EMDPOTrainer: %s layout (%s)", self.layout_,
                     "the prompt encoded once per ranked list" if self.layout_ == "prefix_shared"
                     else "one padded sequence per response")
        self._eval_rows = eval_dataset
        pretokenize = data_collator if isinstance(data_collator, RankedListCollator) else None
        super().__init__(model=self._types.model, args=args, data_collator=data_collator,
                         train_dataset=IndexedRows(train_dataset, pretokenize),
                         eval_dataset=None if eval_dataset is None else IndexedRows(eval_dataset),
                         processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, **kwargs)
        # compute_loss returns the loss already scaled for gradient accumulation.
        self.loss_is_scaled_for_ga = True
        self.add_callback(_EMSchedule(self))
        self._em: Optional[_em.EMState] = None
        self._ref_logps = None           # (M,) device tensor, cached once
        self._record_weights = None      # (K, N) device tensor, g_{a_i k} / T_k
        self._grouping = None            # all training rows grouped by annotator
        self._my_grouping = None         # this process's rows, for the E-step
        self._slot_offsets = torch.as_tensor(self._layout.offsets)
        self._batches_cache = {}
        self._eval_cache = {}
        self._initial_types = None
        self._steps_per_m_step = None

    # ------------------------------------------------------------------------------------
    # Construction helpers

    def _make_types(self, model, peft_config, args):
        K = args.n_types
        names = [f"type_{k}" for k in range(K)]
        if args.full_parameter_types:
            if peft_config is not None:
                raise ValueError("peft_config: not used with full_parameter_types=True; pass one "
                                 "or the other")
            return _FullTypes(FullParameterTypes(model, K))
        if peft_config is None:
            raise ValueError("peft_config: pass a peft.LoraConfig (each type is one LoRA "
                             "adapter on the shared base), or set full_parameter_types=True "
                             "in the config for small models")
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            raise ValueError("model: pass the base model, not a PeftModel; the trainer adds one "
                             "adapter per type from peft_config")
        # Seeded so that the adapters' random initialisation (LoRA A) is reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            peft_model = get_peft_model(model, peft_config, adapter_name=names[0])
            for name in names[1:]:
                peft_model.add_adapter(name, peft_config)
        return _LoraTypes(peft_model, names)

    def _set_signature_columns_if_needed(self):
        # The ranked rows are tokenized by the collator: keep their columns.
        if self._signature_columns is None:
            self._signature_columns = list(ROW_COLUMNS) + ["prompt_ids", "response_ids"]

    # ------------------------------------------------------------------------------------
    # Batches and no-grad passes

    def _logps_batch_size(self) -> int:
        return self.args.logps_batch_size or self.args.per_device_eval_batch_size

    def _fixed_batches(self, rows, layout: RowLayout, key: str, part=(0, 1)):
        """Collated batches of all rows (longest first, so padding is small), kept on the
        host and reused by every no-grad pass over the same data. ``part=(r, P)``: only every
        P-th row from the r-th (process r's share)."""
        if part != (0, 1):
            key = (key, part)
        if key not in self._batches_cache:
            order = np.argsort(-layout.lengths, kind="stable")[part[0]::part[1]]
            bs = self._logps_batch_size()
            indexed = rows if isinstance(rows, IndexedRows) else IndexedRows(
                rows, self.train_dataset.tokenizer)
            batches = []
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                batch = self.data_collator([indexed[i] for i in idx])
                batches.append((batch, slots_of(batch, layout)))
            self._batches_cache[key] = batches
        return self._batches_cache[key]

    @contextmanager
    def _no_grad_pass(self):
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                yield
        finally:
            model.train(was_training)

    def _comm(self):
        """The communicator of the training processes (DDP under accelerate / torchrun):
        :class:`~emdpo_core.distributed.LocalComm` for one process."""
        if self.args.world_size > 1:
            return distributed.resolve_comm(None)
        return LocalComm()

    def _pass_logps(self, rows, layout: RowLayout, key: str, reference: bool,
                    share: bool = False) -> torch.Tensor:
        """(M,) reference or (K, M) type log-probabilities of every slot, float32 on the
        training device. ``share``: with several processes, each computes the slots of its
        share of the batches (every P-th, from its rank), the others stay 0; see
        :meth:`_my_rows`."""
        K = len(self._types.names)
        out = torch.zeros((1 if reference else K, layout.n_slots), dtype=torch.float32,
                          device=self.args.device)
        comm = self._comm()
        part = (comm.rank, comm.world_size) if share else (0, 1)
        batches = self._fixed_batches(rows, layout, key, part)
        with self._no_grad_pass():
            for batch, slots in batches:
                b = self._prepare_inputs(batch)
                slots = slots.to(out.device)
                if reference:
                    with self._types.reference(self.model) as ref_model:
                        out[0, slots] = sequence_logps(ref_model, b).float()
                else:
                    for k in range(K):
                        out[k, slots] = sequence_logps(self._types.module_for(k, self.model),
                                                       b).float()
        self._types.make_trainable()
        return out[0] if reference else out

    # ------------------------------------------------------------------------------------
    # Initialisation

    def _annotator_features(self) -> np.ndarray:
        """(H, D) preference directions of the annotators in the base model's response
        embeddings (mean over response tokens of the last hidden state)."""
        lay = self._layout
        emb = None
        with self._no_grad_pass():
            for batch, slots in self._fixed_batches(self.train_dataset, lay, "train"):
                b = self._prepare_inputs(batch)
                with self._types.reference(self.model) as ref_model:
                    h = _em.response_embeddings(ref_model, b)
                if emb is None:
                    emb = np.zeros((lay.n_slots, h.shape[1]))
                emb[slots.numpy()] = h.double().cpu().numpy()
        return _em.preference_features(emb, lay)

    def _initial_responsibilities(self) -> np.ndarray:
        K, H = self.args.n_types, self._layout.n_annotators
        if self._init_resp is not None:
            return self._init_resp
        rng = np.random.default_rng(self.args.seed)
        if K == 1:
            return np.ones((H, 1))
        if self.args.init == "random":
            return rng.dirichlet(np.ones(K), size=H)
        return _em.smoothed_assignments(_em.kmeans(self._annotator_features(), K, rng), K)

    def _my_rows(self, rows, layout: RowLayout, key: str) -> np.ndarray:
        """Rows whose slots this process computes in a shared pass (all rows for one)."""
        comm = self._comm()
        if layout.n_rows < comm.world_size:
            raise ValueError(f"train_dataset: {layout.n_rows} rows for {comm.world_size} "
                             f"processes; every process needs at least one")
        return np.argsort(-layout.lengths, kind="stable")[comm.rank::comm.world_size]

    def _initialize_em(self):
        # Each process computes its share of the reference log-probabilities; their sum over
        # the processes is exact (every slot is computed by one of them, 0 elsewhere), and
        # every process keeps all of them (its M-step batches can hold any row).
        ref = self._pass_logps(self.train_dataset, self._layout, "train", reference=True,
                               share=True)
        self._ref_logps = self._comm().sum_tensor(ref)
        self._em = _em.initial_state(self._initial_responsibilities(), self.args.mixture_alpha,
                                     self.args.device)
        self._set_record_weights()
        if self.args.reinit_types:
            self._initial_types = self._types.state_dict()

    # ------------------------------------------------------------------------------------
    # E-step and M-step weights, on the training device: the posteriors and the (K, N)
    # weights stay tensors there; per E-step the log-likelihood and K-sized totals reach the
    # host. Several processes (DDP under accelerate launch / torchrun): each computes the
    # log-probabilities of its share of the rows (_pass_logps(share=True)); the E-step adds
    # the processes' per-annotator sums S_hk (emdpo_core.e_step on the process group, through
    # the host), so every process holds all posteriors, and with them the global per-type
    # totals T_k of the M-step (_type_totals); the reference log-probabilities are summed
    # once. The M-step's gradients are averaged by DDP as usual.

    def _groupings(self):
        """(all rows, this process's rows) grouped by annotator, built once."""
        if self._grouping is None:
            self._grouping = _em.Grouping(self._layout)
        if self._my_grouping is None:
            comm = self._comm()
            self._my_grouping = (self._grouping if comm.world_size == 1 else _em.Grouping(
                self._layout, self._my_rows(self.train_dataset, self._layout, "train")))
        return self._grouping, self._my_grouping

    def _gather_slot_logps(self, logps: torch.Tensor) -> torch.Tensor:
        """Hook on the (K, M) slot log-probabilities of an E-step pass (this process's share
        of the slots; 0 elsewhere). The identity: the E-step reduces per-annotator sums,
        not log-probabilities."""
        return logps

    def _type_totals(self, record_resp: torch.Tensor) -> np.ndarray:
        """(K,) T_k = sum over all training records of c_i g_{a_i k}, on the host, from the
        (K, N) c_i g_{a_i k} on the device: every process holds all posteriors after the
        E-step's reduction, so this is the global normaliser on every process, bitwise
        alike."""
        return to_numpy(record_resp.sum(dim=1))

    def _set_record_weights(self):
        """w_ik = c_i g_{a_i k} / T_k for every record, on the device, for the M-step."""
        record_resp = self._groupings()[0].record_responsibilities(self._em.responsibilities)
        self._record_weights = _em.m_step_weights(record_resp, self._type_totals(record_resp))

    def _e_step(self, log: bool = True) -> dict:
        logps = self._gather_slot_logps(
            self._pass_logps(self.train_dataset, self._layout, "train", reference=False,
                             share=True))
        em = self._em
        entry = _em.e_step(em, self._groupings()[1], logps, self._ref_logps,
                           beta=self.args.beta, mixture_alpha=self.args.mixture_alpha,
                           comm=self._comm(), step=self.state.global_step)
        self._set_record_weights()
        if log:
            self._log_e_step(entry)
        return entry

    def _log_e_step(self, entry: dict) -> None:
        """em/iteration, em/loglik (per record) and em/weight_k into the Trainer's log."""
        logs = {"em/iteration": entry["em_iteration"], "em/loglik": entry["loglik_per_record"]}
        for k, w in enumerate(entry["weights"]):
            logs[f"em/weight_{k}"] = w
        self.log(logs)

    def _between_m_steps(self, control):
        history = self._em.history
        entry = self._e_step()
        tol = self.args.em_tol
        if tol is not None and len(history) >= 2:
            if entry["loglik_per_record"] - history[-2]["loglik_per_record"] < tol:
                self._em.converged = True
                control.should_training_stop = True
                return
        if self.args.reinit_types:
            self._reinitialize_types()

    def _reinitialize_types(self):
        """The authors' option: every type restarts from its initial weights (the base, for
        LoRA: B = 0) with a fresh optimizer state."""
        self._types.load_state_dict(self._initial_types)
        if self.optimizer is not None:
            for k in range(len(self._types.names)):
                for p in self._types.type_params(k):
                    self.optimizer.state.pop(p, None)

    # ------------------------------------------------------------------------------------
    # Loss

    def _m_step_objective(self, model, inputs) -> torch.Tensor:
        """sum over the batch's records of sum_k w_ik (-ll_ik), w_ik = g_{a_i k} / T_k.

        Summed over the micro-batches of an epoch this is exactly the full-data M-step
        objective sum_k (1/T_k) sum_i g_{a_i k} (-ll_ik)."""
        K = len(self._types.names)
        rows = inputs[ROW_INDEX]
        policy = torch.stack([sequence_logps(self._types.module_for(k, model), inputs)
                              for k in range(K)])
        self._types.make_trainable()
        slots = slots_of(inputs, self._slot_offsets.to(rows.device))
        ref = self._ref_logps[slots]
        weights = self._record_weights[:, rows]
        return mixture_dpo_loss(policy, ref, inputs["offsets"], weights=weights,
                                beta=self.args.beta, n_ranked=inputs["n_ranked"],
                                reduction="sum")

    def _records_per_step(self) -> int:
        """Records per optimizer step in one process: with DDP, gradient averaging over
        processes makes each step an average over the global batch."""
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._em is None:
            raise RuntimeError("EMDPOTrainer.compute_loss: call train() (the EM state is set "
                               "up there)")
        # Scaled so that an optimizer step's gradient is an unbiased estimate of the full
        # M-step objective's (records drawn uniformly); for K = 1 it is the mean DPO loss.
        loss = self._m_step_objective(model, inputs) * (self._layout.n_rows
                                                        / self._records_per_step())
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------------------------
    # Training

    def _steps_per_epoch(self) -> int:
        n_batches = len(self.get_train_dataloader())
        ga = self.args.gradient_accumulation_steps
        return max(n_batches // ga + int(n_batches % ga > 0), 1)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """EM-DPO: ``em_iterations`` M-steps with E-steps between them and after the last.
        ``resume_from_checkpoint`` restores the whole EM state with the Trainer's."""
        args = self.args
        self._steps_per_m_step = args.e_step_every or self._steps_per_epoch()
        args.max_steps = args.em_iterations * self._steps_per_m_step
        if not resume_from_checkpoint:
            self._initialize_em()
        out = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                            ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        if self._em.last_e_step_at != self.state.global_step:
            self._e_step()
        self._set_fitted()
        return out

    def _set_fitted(self):
        em = self._em
        self.responsibilities_ = np.array(to_numpy(em.responsibilities))  # once per fit
        self.weights_ = np.exp(em.log_weights)
        self.loglik_ = em.history[-1]["loglik"] if em.history else None
        self.loglik_history_ = [h["loglik"] for h in em.history]
        self.converged_ = bool(em.converged)
        self.n_iter_ = int(math.ceil(self.state.global_step / self._steps_per_m_step))
        self.em_history_ = list(em.history)

    def predict_types(self) -> np.ndarray:
        """(H,) most likely type of each annotator (rows follow ``annotator_ids_``)."""
        return self.responsibilities_.argmax(1)

    # ------------------------------------------------------------------------------------
    # Evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Per-type implicit-reward accuracy and margin over the ranked pairs of the eval
        rows (every position t < L against every lower slot), the mixture weights, and the
        held-out observed-data log-likelihood per record under the current mixture."""
        rows = eval_dataset if eval_dataset is not None else self._eval_rows
        if rows is None:
            raise ValueError("evaluate: no eval_dataset given here or to the trainer")
        if isinstance(rows, IndexedRows):
            rows = rows.rows
        key = f"eval-{id(rows)}"
        if key not in self._eval_cache:
            lay = build_layout(rows, "eval_dataset")
            ref = self._pass_logps(rows, lay, key, reference=True)
            self._eval_cache[key] = (lay, _em.Grouping(lay), ref, ranked_pairs(lay))
        lay, grouping, ref, pairs = self._eval_cache[key]
        K = len(self._types.names)
        logps = self._pass_logps(rows, lay, key, reference=False)
        log_weights = (self._em.log_weights if self._em is not None
                       else np.log(np.full(K, 1.0 / K)))
        metrics = _em.heldout_metrics(grouping, pairs, logps, ref, log_weights,
                                      beta=self.args.beta, prefix=metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics)
        return metrics

    # ------------------------------------------------------------------------------------
    # Checkpoints: the EM state and all K types travel with every Trainer checkpoint.

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:          # one writer under DDP; every process resumes
            self.save_em_state(folder)

    def save_em_state(self, folder: str) -> None:
        """Write the EM state (posteriors, mixture weights, iteration, history, cached
        reference log-probabilities) and the weights of all K types into ``folder``."""
        _em.save_state(folder, self._em, self._layout, self._types, self._initial_types,
                       self._ref_logps)

    def load_em_state(self, folder: str) -> None:
        """Restore what :meth:`save_em_state` wrote; refuses damaged files and a checkpoint
        of another training set."""
        self._em, self._initial_types, self._ref_logps = _em.load_state(
            folder, self._layout, self._types, reinit_types=self.args.reinit_types,
            device=self.args.device)
        self._set_record_weights()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # All K types come from the EM state file (the Trainer's own PEFT loading would
        # restore only the active adapter).
        self.load_em_state(resume_from_checkpoint)

    # ------------------------------------------------------------------------------------
    # Aggregation

    def aggregate(self, prompts, *, n_samples: int = 4, kind: str = "reward",
                  max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                  batch_size: Optional[int] = None, group_weights=None, solver=None,
                  random_state=0):
        """MinMax Regret Aggregation of the trained types by generation.

        Samples ``n_samples`` responses per prompt from every type with ``generate``,
        scores every sample under every type and the reference, builds the regret matrix
        (:func:`emdpo_core.regret_matrix`) and solves the MMRA LP (:func:`emdpo_core.mmra`).
        Returns a :class:`~emdpo_core.hf.MixtureLM`: ``.weights`` (K,), ``.regret_matrix``,
        ``.max_regret``; ``.generate(prompt)`` answers with one type drawn by the weights;
        ``.save(path)``.
        """
        return aggregate_types(self._types, self.tokenizer_, self.data_collator, prompts,
                               n_samples=n_samples, kind=kind, beta=self.args.beta,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, batch_size=batch_size or self._logps_batch_size(),
                               group_weights=group_weights, solver=solver,
                               random_state=random_state, device=self.args.device)
