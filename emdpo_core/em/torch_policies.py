"""The torch policy family: K torch modules trained by the weighted listwise DPO loss (the
M-step of :class:`~emdpo_core.EMDPO`). torch is imported only when a
:class:`TorchPolicies` is made."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, List, Optional

import numpy as np

from .. import _checks
from ..data import GroupedPreferences
from ..ops.listwise import listwise_dpo_loss_and_grad
from .family import PolicyFamily, PolicyLogps, PolicySamples

__all__ = ["TorchPolicies", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "adamw", "sgd", "lbfgs")


def _default_logp_fn(module, inputs):
    return module(**inputs)


def _default_sample_fn(module, contexts, generator):
    return module.sample(**contexts, generator=generator)


class TorchPolicies(PolicyFamily):
    """K torch policies for :class:`EMDPO`, trained by the weighted listwise DPO loss.

    Each type k has a module pi_k; ``logp_fn(module, inputs)`` returns the log-probabilities
    (B,) of a batch of slots, whose per-slot inputs (a dict of tensors, the
    :class:`~emdpo_core.PreferenceData` ``inputs`` restricted to the batch) it receives; by
    default it calls ``module(**inputs)``. Rewards are r_kj = beta (log pi_k(y_j | x_j) -
    log pi_ref(y_j | x_j)), with the reference log-probabilities from the data (cached) or
    from ``reference``.

    M-step: a fresh optimizer runs ``steps`` steps (or ``epochs`` passes over the records in
    minibatches of ``batch_size`` records) on each type's weighted listwise DPO loss

        loss_k = - sum_i w_ki ll_ki / T_k,   T_k = sum_i w_ki   (w_ki = c_i g_{a_i k}, the E-step's)

    with T_k the type's total weight over ALL records, computed once per M-step. A minibatch B
    of the N records takes loss_k(B) = - sum_{i in B} w_ki ll_ki / (T_k |B| / N): an unbiased
    estimate of loss_k on the same scale, so the minibatch gradients of one epoch add up to
    N/|B| times the full-batch gradient. (Dividing by the minibatch's own total weight of type
    k instead would rescale a minibatch with little type-k weight to unit weight, and type k
    would take a full step on other types' records.)

    (:func:`emdpo_core.torch.mixture_dpo_loss` over all K at once when ``joint``, else
    :func:`emdpo_core.torch.listwise_dpo_loss` type by type, one optimizer per type: the same
    objective, since the types share no parameters). The modules are warm-started from the
    previous M-step, or, with ``reset=True``, restored to their initial state (the reference
    policy when they start from it; the authors' choice) before every M-step. A stochastic
    M-step does not guarantee a monotone EM objective (the engine records it in
    ``lower_bounds_``); more steps bring it closer to the exact M-step.

    E-step: every slot's log-probability under every module, in batches of
    ``eval_batch_size`` slots under ``torch.no_grad()`` and ``module.eval()``, then the
    fused kernel (CPU or CUDA, where the modules are). The posteriors and the M-step weights
    stay on that device (``tensor_weights``); per EM iteration only K-sized values (type
    totals, the log-likelihood) go to the host.

    Initialization: the policies start as copies of ``policy`` (or from the factory) and are
    trained for ``init_steps`` steps on the initial responsibilities (for k-means: hard
    clusters, smoothed; see :meth:`EMDPO.fit_cluster_dpo`). The k-means start needs annotator
    features: ``annotator_features(grouped_data)`` if given, else each annotator's mean
    preference direction from the data's slot ``features`` (below).

    Args:
        policy: a torch module (every type starts as a copy of it), a list of K modules (type
            k starts as a copy of entry k) or a factory ``k -> module``.
        beta: DPO temperature, > 0.
        logp_fn: ``logp_fn(module, inputs) -> (B,) tensor``; default ``module(**inputs)``.
        reference: the frozen reference policy module (used for slot reference
            log-probabilities when the data has none, and by :meth:`EMDPO.aggregate`).
            Default: a frozen copy of ``policy`` when it is a module, else none.
        sample_fn: ``sample_fn(module, contexts, generator) -> inputs dict`` of one sampled
            response per context (for :meth:`EMDPO.aggregate`); default
            ``module.sample(**contexts, generator=generator)``.
        optimizer: "adam", "adamw", "sgd", "lbfgs" (full-batch, with its strong-Wolfe line
            search) or a callable ``params -> torch.optim.Optimizer``.
        lr: learning rate of the named optimizers; default 1.0 for "lbfgs" (its line search
            scales the step), 1e-3 for the others (torch's Adam default).
        steps: optimizer steps per M-step (default 20 when ``epochs`` is not given).
        epochs: instead of ``steps``: passes over the records per M-step.
        batch_size: records per minibatch (default: all records, full batch).
        init_steps: steps of the initial fit (default: ``steps``).
        joint: train all types together with one kernel call per step (default) or one after
            the other (needed when only one policy fits in memory at a time).
        reset: restore every policy to its initial state before each M-step.
        eval_batch_size: slots per no-grad forward pass in the E-step.
        annotator_features: optional ``f(grouped_data) -> (H, D)`` for the k-means start.

    Example:
        >>> import emdpo_core as ec
        >>> from emdpo_core.datasets import make_population
        >>> pop = make_population(2, n_annotators=60, records_per_annotator=4, n_prompts=20,
        ...                       random_state=0)
        >>> fam = ec.TorchPolicies(pop.policy_module(), beta=1.0, optimizer="lbfgs", steps=5)
        >>> model = ec.EMDPO(2, fam, max_iter=5, random_state=0).fit(pop.data)
        >>> model.responsibilities_.shape
        (60, 2)
    """

    supports_process_group = True
    tensor_weights = True     # the engine's (K, N) weights arrive on self.device

    def __init__(self, policy, *, beta: float = 0.1, logp_fn: Optional[Callable] = None,
                 reference=None, sample_fn: Optional[Callable] = None, optimizer="adam",
                 lr: Optional[float] = None, steps: Optional[int] = None,
                 epochs: Optional[int] = None,
                 batch_size: Optional[int] = None, init_steps: Optional[int] = None,
                 joint: bool = True, reset: bool = False, eval_batch_size: int = 65536,
                 annotator_features: Optional[Callable] = None):
        import torch

        self._torch = torch
        Module = torch.nn.Module
        if isinstance(policy, Module):
            self._template, self._starts, self._factory = policy, None, None
        elif isinstance(policy, (list, tuple)):
            if not policy or not all(isinstance(m, Module) for m in policy):
                raise TypeError("policy: a list must hold at least one torch.nn.Module, got "
                                f"{[type(m).__name__ for m in policy]}")
            self._template, self._starts, self._factory = None, list(policy), None
        elif callable(policy):
            self._template, self._starts, self._factory = None, None, policy
        else:
            raise TypeError(f"policy: expected a torch.nn.Module, a list of modules or a factory "
                            f"k -> module, got {type(policy).__name__}")
        self.beta = _checks.check_float("beta", beta, 0.0, strict=True)
        if reference is None and self._template is not None:
            reference = copy.deepcopy(self._template)
        if reference is not None:
            if not isinstance(reference, Module):
                raise TypeError(f"reference: expected a torch.nn.Module or None, got "
                                f"{type(reference).__name__}")
            reference.eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        self.reference = reference
        for name, fn in (("logp_fn", logp_fn), ("sample_fn", sample_fn),
                         ("annotator_features", annotator_features)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
        self.logp_fn = logp_fn or _default_logp_fn
        self.sample_fn = sample_fn or _default_sample_fn
        self._annotator_features = annotator_features
        if isinstance(optimizer, str):
            if optimizer not in OPTIMIZERS:
                raise ValueError(f"optimizer: expected one of {OPTIMIZERS} or a callable "
                                 f"params -> torch.optim.Optimizer, got {optimizer!r}")
        elif not callable(optimizer):
            raise TypeError(f"optimizer: expected a name or a callable, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        if lr is None:
            lr = 1.0 if optimizer == "lbfgs" else 1e-3
        self.lr = _checks.check_float("lr", lr, 0.0, strict=True)
        if steps is not None and epochs is not None:
            raise ValueError("steps/epochs: give one of them, not both")
        self.steps = None if steps is None else _checks.check_int("steps", steps, 1)
        self.epochs = None if epochs is None else _checks.check_int("epochs", epochs, 1)
        if self.steps is None and self.epochs is None:
            self.steps = 20
        self.batch_size = None if batch_size is None else _checks.check_int("batch_size", batch_size, 1)
        if optimizer == "lbfgs" and batch_size is not None:
            raise ValueError("batch_size: the 'lbfgs' optimizer is full-batch (its line search "
                             "needs the same objective at every evaluation); leave batch_size "
                             "None or use 'adam'")
        self.init_steps = None if init_steps is None else _checks.check_int("init_steps", init_steps, 1)
        self.joint = bool(joint)
        self.reset = bool(reset)
        self.eval_batch_size = _checks.check_int("eval_batch_size", eval_batch_size, 1)
        self.modules: List[Any] = []
        self._initial: List[dict] = []      # initial states, kept for reset=True
        self._seed = 0
        self._m_steps = 0                   # M-steps done in this run (minibatch seeds)
        self._cache: list = []              # [(grouped data, device tensors)], newest last

    def __copy__(self):
        """A copy of the configuration (template, reference, functions, optimizer settings,
        all shared) without trained policies: what :class:`EMDPO` fits."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.modules, new._initial, new._cache = [], [], []
        return new

    # ------------------------------------------------------------------------------------
    # Modules

    def _make(self, k: int):
        if self._template is not None:
            return copy.deepcopy(self._template)
        if self._starts is not None:
            if k >= len(self._starts):
                raise ValueError(f"policy: {len(self._starts)} modules were given, but the model "
                                 f"has n_components > {k}; give one module per type")
            return copy.deepcopy(self._starts[k])
        module = self._factory(k)
        if not isinstance(module, self._torch.nn.Module):
            raise TypeError(f"policy: the factory returned a {type(module).__name__} for type {k},"
                            f" not a torch.nn.Module")
        return module

    def _first_param(self):
        for m in self.modules + ([self.reference] if self.reference is not None else []):
            for p in m.parameters():
                return p
        raise ValueError("policy: the module has no parameters to train")

    @property
    def device(self):
        return self._first_param().device

    @property
    def dtype(self):
        p = self._first_param()
        return p.dtype if p.dtype.is_floating_point else self._torch.float32

    @property
    def n_components(self) -> int:
        return len(self.modules)

    def n_parameters(self) -> int:
        return sum(p.numel() for m in self.modules for p in m.parameters() if p.requires_grad)

    def keep_components(self, keep) -> None:
        self.modules = [self.modules[int(i)] for i in keep]
        if self._initial:
            self._initial = [self._initial[int(i)] for i in keep]

    # ------------------------------------------------------------------------------------
    # Data on the device

    def check_data(self, data, *, fitting: bool) -> None:
        if not isinstance(data, GroupedPreferences):
            raise TypeError(f"data: TorchPolicies fit PreferenceData, got "
                            f"{type(data).__name__}")
        if data.ref_logps is None and self.reference is None:
            raise ValueError("data: has no ref_logps and the family has no reference module; "
                             "give PreferenceData(ref_logps=...) or TorchPolicies(reference=...)")

    def _tensors(self, g):
        """Device tensors of grouped data: inputs, offsets, n_ranked, ref (model dtype),
        computed once per data object and kept (the two most recent)."""
        for data, t in self._cache:
            if data is g:
                return t
        torch = self._torch
        dev = self.device
        inputs = {}
        for k, v in g.inputs.items():
            inputs[k] = v.to(dev) if isinstance(v, torch.Tensor) else torch.as_tensor(v,
                                                                                      device=dev)
        t = {"inputs": inputs,
             "offsets": torch.as_tensor(g.offsets, device=dev),
             "n_ranked": torch.as_tensor(g.n_ranked, device=dev)}
        if g.ref_logps is not None:
            t["ref"] = torch.as_tensor(g.ref_logps, device=dev).to(self.dtype)
        else:
            t["ref"] = self._eval_logps(self.reference, inputs, g.n_slots)
        self._cache = [c for c in self._cache[-1:]] + [(g, t)]
        return t

    def _eval_logps(self, module, inputs, M):
        """(M,) log-probabilities of every slot under ``module``, no gradients, batched."""
        torch = self._torch
        was_training = module.training
        module.eval()
        out = []
        with torch.no_grad():
            for a in range(0, M, self.eval_batch_size):
                b = min(M, a + self.eval_batch_size)
                batch = {k: v[a:b] for k, v in inputs.items()}
                out.append(self._call_logp(module, batch, b - a))
        module.train(was_training)
        return torch.cat(out).to(self.dtype)

    def _call_logp(self, module, batch, B):
        lp = self.logp_fn(module, batch)
        if not isinstance(lp, self._torch.Tensor) or tuple(lp.shape) != (B,):
            raise ValueError(f"logp_fn: expected a tensor of shape ({B},) (one log-probability "
                             f"per slot), got {getattr(lp, 'shape', type(lp).__name__)}")
        return lp

    # ------------------------------------------------------------------------------------
    # The engine's calls

    def annotator_features(self, data) -> np.ndarray:
        """(H, D) features for the k-means start: ``annotator_features(data)`` when given,
        else each annotator's mean preference direction

            x_h = (1 / n_h) sum_{i of h} sum_j (d ll_i / d r_j at r = 0) phi_j,

        the gradient of the annotator's Plackett-Luce log-likelihood with respect to a linear
        reward on the slot ``features`` phi, at zero reward (for a pair: phi(chosen) -
        phi(rejected), halved). Annotators of one type point, on average, along that type's
        reward direction."""
        if self._annotator_features is not None:
            return np.asarray(self._annotator_features(data), dtype=np.float64)
        if data.features is None:
            raise NotImplementedError(
                "init_params='kmeans' needs annotator features: give PreferenceData(features=...)"
                " (one vector per slot), TorchPolicies(annotator_features=...), or use "
                "init_params='random', 'dirichlet' or given responsibilities")
        zeros = np.zeros(data.n_slots)
        weights = data.record_weight if not data.unit_record_weight else None
        _, grad = listwise_dpo_loss_and_grad(zeros, zeros, data.offsets, weights, beta=1.0,
                                             n_ranked=data.n_ranked, reduction="sum")
        # grad = d(-sum_i c_i ll_i) / d r_j: minus the direction.
        contrib = -grad[:, None] * data.features
        starts = data.offsets[data.annotator_offsets[:-1]]
        per = np.add.reduceat(contrib, starts, axis=0)
        counts = np.add.reduceat(data.record_weight, data.annotator_offsets[:-1])
        return per / counts[:, None]

    def initialize(self, data, weights, rng) -> None:
        K = weights.shape[0]
        self.modules = [self._make(k) for k in range(K)]
        # Distributed: every rank starts from rank 0's modules (as DDP does).
        self.comm.broadcast_tensors([t for m in self.modules
                                     for t in list(m.parameters()) + list(m.buffers())])
        self._initial = [self._state_of(m) for m in self.modules] if self.reset else []
        self._seed = int(rng.integers(0, 2 ** 62))
        self._m_steps = 0
        self._cache = []
        if self.init_steps is not None:
            self._optimize(data, weights, steps=self.init_steps, epochs=None, reset=False)
        else:
            self._optimize(data, weights, steps=self.steps, epochs=self.epochs, reset=False)

    def m_step(self, data, weights) -> None:
        self._optimize(data, weights, steps=self.steps, epochs=self.epochs, reset=self.reset)

    def logps(self, data) -> PolicyLogps:
        t = self._tensors(data)
        policy = self._torch.stack([self._eval_logps(m, t["inputs"], data.n_slots)
                                    for m in self.modules])
        return PolicyLogps(policy, t["ref"], self.beta)

    # ------------------------------------------------------------------------------------
    # The M-step

    def _make_optimizer(self, params):
        torch = self._torch
        opt = self.optimizer
        if callable(opt):
            return opt(params)
        if opt == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        if opt == "adamw":
            return torch.optim.AdamW(params, lr=self.lr)
        if opt == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.LBFGS(params, lr=self.lr, max_iter=20, history_size=20,
                                 line_search_fn="strong_wolfe")

    def _batches(self, N, steps, epochs):
        """Record index arrays of the minibatches of one M-step (None = full batch): ``steps``
        minibatches, or ``epochs`` passes over the N records. In a distributed fit each rank
        draws minibatches of its own records and every rank takes as many steps as the rank
        with the most (its ``epochs`` passes)."""
        full = self.batch_size is None or self.batch_size >= N
        if epochs is None:
            n = steps
        else:
            n = epochs * (1 if full else math.ceil(N / self.batch_size))
            if self.comm.world_size > 1:
                n = int(self.comm.max(np.float64(n)))
        if full:
            return [None] * n
        key = [self._seed, self._m_steps] + ([self.comm.rank] if self.comm.world_size > 1 else [])
        rng = np.random.default_rng(key)
        out = []
        while len(out) < n:
            perm = rng.permutation(N)
            out += [np.sort(perm[a:a + self.batch_size]) for a in range(0, N, self.batch_size)]
        return out[:n]

    def _batch(self, t, g, idx):
        """(inputs, ref, offsets, n_ranked) of the records idx (None: all)."""
        torch = self._torch
        if idx is None:
            return t["inputs"], t["ref"], t["offsets"], t["n_ranked"]
        lengths = np.diff(g.offsets)[idx]
        slots = np.repeat(g.offsets[idx] - np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                          lengths) + np.arange(int(lengths.sum()))
        dev = self.device
        s = torch.as_tensor(slots, device=dev)
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), device=dev)
        return ({k: v[s] for k, v in t["inputs"].items()}, t["ref"][s], offsets,
                t["n_ranked"][torch.as_tensor(idx, device=dev)])

    def _type_totals(self, W):
        """(T (K,), N): each type's total weight over all records of the M-step, and the
        number of records; the normalisers of every minibatch loss. Computed here, once per
        M-step: with records sharded across processes, both are sums over the shards."""
        T, N = W.sum(dim=1), float(W.shape[1])
        if self.comm.world_size > 1:
            T = self.comm.sum_tensor(T)
            N = float(self.comm.sum(np.float64(N)))
        return T, N

    def _optimize(self, g, weights, *, steps, epochs, reset):
        from .. import torch as et

        torch = self._torch
        if reset and self._initial:
            for m, state in zip(self.modules, self._initial):
                m.load_state_dict(state)
        t = self._tensors(g)
        comm = self.comm
        W = torch.as_tensor(weights, device=self.device).to(self.dtype)
        totals, n_total = self._type_totals(W)
        # A type without weight has a zero loss; any positive divisor keeps it zero.
        totals = totals.clamp_min(torch.finfo(totals.dtype).tiny)
        K = len(self.modules)
        groups = [list(range(K))] if self.joint else [[k] for k in range(K)]
        batches = self._batches(g.n_records, steps, epochs)
        for grp in groups:
            mods = [self.modules[k] for k in grp]
            for m in mods:
                m.train()
            params = [p for m in mods for p in m.parameters() if p.requires_grad]
            if not params:
                raise ValueError("policy: the module has no parameters that require grad")
            opt = self._make_optimizer(params)
            for idx in batches:
                inputs, ref, offsets, n_ranked = self._batch(t, g, idx)
                w = W[grp] if idx is None else W[grp][:, torch.as_tensor(idx, device=W.device)]
                # T_k |B| / N: type k's expected weight in a minibatch of |B| records
                # (distributed: T and N over every rank's records, see _type_totals).
                total = totals[grp] * (1.0 if idx is None else len(idx) / n_total)
                B = int(ref.shape[0])

                def closure():
                    opt.zero_grad()
                    policy = torch.stack([self._call_logp(m, inputs, B) for m in mods])
                    if len(mods) > 1:
                        loss = et.mixture_dpo_loss(policy, ref, offsets, weights=w,
                                                   beta=self.beta, n_ranked=n_ranked,
                                                   reduction="weighted_mean",
                                                   total_weight=total)
                    else:
                        loss = et.listwise_dpo_loss(policy[0], ref, offsets, w[0],
                                                    beta=self.beta, n_ranked=n_ranked,
                                                    reduction="weighted_mean",
                                                    total_weight=total[0])
                    loss.backward()
                    if comm.world_size > 1:
                        # The ranks' losses are sums over their records: add the gradients
                        # and the value over the ranks (rank order: the same bits everywhere).
                        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                                 for p in params]
                        flat = comm.sum_tensor(torch.cat([x.reshape(-1) for x in grads]))
                        start = 0
                        for p, x in zip(params, grads):
                            p.grad = flat[start:start + x.numel()].view_as(p).clone()
                            start += x.numel()
                        loss = comm.sum_tensor(loss.detach().reshape(1))[0]
                    return loss

                opt.step(closure)
        self._m_steps += 1

    # ------------------------------------------------------------------------------------
    # State

    def _state_of(self, module) -> dict:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def _host(self, v) -> np.ndarray:
        torch = self._torch
        v = v.detach().cpu()
        if v.dtype in (torch.bfloat16, torch.float16):
            v = v.float()     # NumPy has no bfloat16; float32 holds both exactly
        return v.numpy().copy()

    def state_dict(self):
        out = {"m_steps": np.array([self._m_steps]), "seed": np.array([self._seed])}
        for k, m in enumerate(self.modules):
            for name, v in m.state_dict().items():
                out[f"policy{k}/{name}"] = self._host(v)
        for k, state in enumerate(self._initial):
            for name, v in state.items():
                out[f"initial{k}/{name}"] = self._host(v)
        return out

    def load_state_dict(self, state) -> None:
        torch = self._torch
        K = len({k.split("/", 1)[0] for k in state if k.startswith("policy")})
        if K == 0:
            raise ValueError(f"state: no 'policy<k>/...' entries, so not the state of "
                             f"TorchPolicies (entries: {sorted(state)[:4]}); was the model "
                             f"fitted with another policy family? Load it with that family")
        if len(self.modules) != K:
            self.modules = [self._make(k) for k in range(K)]

        def states(prefix):
            out = [{} for _ in range(K)]
            for key, v in state.items():
                head, _, name = key.partition("/")
                if head.startswith(prefix) and head[len(prefix):].isdigit():
                    out[int(head[len(prefix):])][name] = torch.from_numpy(np.array(v))
            return out

        for m, s in zip(self.modules, states("policy")):
            m.load_state_dict(s)
        self._initial = []
        if any(k.startswith("initial") for k in state):
            self._initial = []
            for s, m in zip(states("initial"), self.modules):
                current = m.state_dict()
                self._initial.append({name: v.to(device=current[name].device,
                                                 dtype=current[name].dtype)
                                      for name, v in s.items()})
        self._m_steps = int(state["m_steps"][0]) if "m_steps" in state else 0
        self._seed = int(state["seed"][0]) if "seed" in state else 0
        self._cache = []

    # ------------------------------------------------------------------------------------
    # Sampling for MMRA

    def policy_samples(self, contexts, n_samples, rng) -> PolicySamples:
        """``n_samples`` responses per context from each policy (``sample_fn``), and every
        policy's and the reference's log-probabilities of them (``logp_fn``). ``contexts``:
        a dict of per-context arrays or tensors (first axis C), passed to ``sample_fn``."""
        torch = self._torch
        if not isinstance(contexts, dict) or not contexts:
            raise TypeError(f"contexts: expected a non-empty dict of per-context arrays or "
                            f"tensors (e.g. {{'prompt': ...}}), got {type(contexts).__name__}")
        dev = self.device
        ctx = {k: v.to(dev) if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=dev)
               for k, v in contexts.items()}
        n_contexts = {k: (int(v.shape[0]) if v.dim() else None) for k, v in ctx.items()}
        for k, n in n_contexts.items():
            if n is None or n == 0:
                raise ValueError(f"contexts: expected at least one context, but "
                                 f"contexts[{_checks.clip(k)}] has "
                                 f"{'no first axis' if n is None else 'a first axis of 0'}")
        if len(set(n_contexts.values())) > 1:
            raise ValueError(f"contexts: every entry needs the same number of contexts (first "
                             f"axis), got {_checks.clip(n_contexts)}")
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(rng.integers(0, 2 ** 62)))
        samples, sizes = [], []
        for m in self.modules:
            was_training = m.training
            m.eval()
            with torch.no_grad():
                for _ in range(n_samples):
                    s = self.sample_fn(m, ctx, gen)
                    if not isinstance(s, dict) or not s:
                        raise ValueError(f"sample_fn: expected a dict of per-sample inputs, got "
                                         f"{type(s).__name__}")
                    samples.append(s)
                    sizes.append(int(next(iter(s.values())).shape[0]))
            m.train(was_training)
        keys = list(samples[0])
        inputs = {k: torch.cat([s[k] for s in samples]) for k in keys}
        S = int(sum(sizes))
        per_policy = np.add.reduceat(np.array(sizes), np.arange(0, len(sizes), n_samples))
        logps = torch.stack([self._eval_logps(m, inputs, S) for m in self.modules])
        ref = None if self.reference is None else self._eval_logps(self.reference, inputs, S)
        return PolicySamples(logps=logps, ref=ref,
                             source_offsets=np.concatenate([[0], np.cumsum(per_policy)]),
                             weights=None, beta=self.beta)
