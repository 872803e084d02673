"""What the distributed tests run on every rank (see _dist_harness.run_group).

Every rank builds the same global data from a seed and keeps its shard, so the parent test can
compute the one-process answer on the union and compare. Imports of emdpo_core happen inside
the functions (the module is imported by freshly spawned processes)."""

from __future__ import annotations

import numpy as np


# ----------------------------------------------------------------------------------------
# Data


def estep_data(seed=0, n_annotators=23, K=3, max_records=5):
    """Global E-step inputs: records of ragged lists with partial rankings, annotator ids
    (sparse integers, records interleaved), record weights."""
    from conftest import random_layout, random_logps

    rng = np.random.default_rng(seed)
    per = rng.integers(1, max_records + 1, size=n_annotators)
    ids = 1000 + 7 * rng.permutation(n_annotators)
    annot = np.repeat(ids, per)
    annot = annot[rng.permutation(annot.shape[0])]          # records interleaved
    N = annot.shape[0]
    offsets, n_ranked = random_layout(rng, N, 2, 6)
    policy, ref = random_logps(rng, K, int(offsets[-1]))
    weights = rng.uniform(0.5, 2.0, size=N)
    log_weights = np.log(rng.dirichlet(np.ones(K) * 3))
    return dict(policy=policy, ref=ref, offsets=offsets, n_ranked=n_ranked, annot=annot,
                record_weights=weights, log_weights=log_weights, beta=0.7)


def take_records(d, rows):
    """The records ``rows`` (in that order) of estep_data's dict."""
    lengths = np.diff(d["offsets"])[rows]
    slots = np.concatenate([np.arange(d["offsets"][i], d["offsets"][i + 1]) for i in rows])
    out = dict(d)
    out.update(policy=d["policy"][:, slots], ref=d["ref"][slots],
               offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
               n_ranked=d["n_ranked"][rows], annot=d["annot"][rows],
               record_weights=d["record_weights"][rows])
    return out


def grouped(d):
    """Records grouped by annotator: (inputs of e_step, sorted distinct ids)."""
    import emdpo_core as ec

    labels, codes = np.unique(d["annot"], return_inverse=True)
    order, ao = ec.group_by_annotator(codes.reshape(-1))
    g = take_records(d, order)
    return g, ao, labels


def single_e_step(d):
    """The one-process E-step on all of d: (labels, EStepResult)."""
    import emdpo_core as ec

    g, ao, labels = grouped(d)
    r = ec.e_step(g["policy"], g["ref"], g["offsets"], ao, g["log_weights"], beta=g["beta"],
                  n_ranked=g["n_ranked"], record_weights=g["record_weights"])
    return labels, r


def shard_rows(d, rank, world_size, how):
    """This rank's record indices: "annotator" (by shard_of), "block" (contiguous records,
    so annotators straddle ranks)."""
    from emdpo_core.distributed import shard_of

    N = d["annot"].shape[0]
    if how == "annotator":
        return np.flatnonzero(shard_of(d["annot"], world_size) == rank)
    return np.arange(N * rank // world_size, N * (rank + 1) // world_size)


# ----------------------------------------------------------------------------------------
# Jobs: fn(rank, world_size, **kwargs)


def job_e_step(rank, world_size, how, sharding="auto", seed=0, torch_input=False):
    from emdpo_core import distributed

    d = estep_data(seed)
    local = take_records(d, shard_rows(d, rank, world_size, how))
    g, ao, labels = grouped(local)
    policy, ref = g["policy"], g["ref"]
    if torch_input:
        import torch

        policy, ref = torch.from_numpy(policy), torch.from_numpy(ref)
    r = distributed.e_step(policy, ref, g["offsets"], ao, g["log_weights"], beta=g["beta"],
                           n_ranked=g["n_ranked"], record_weights=g["record_weights"],
                           annotator_ids=labels, sharding=sharding)
    conv = (lambda x: x.numpy() if hasattr(x, "numpy") else x)
    return dict(labels=labels, resp=conv(r.responsibilities), S=conv(r.annotator_loglik),
                loglik=r.loglik)


def job_e_step_global_csr(rank, world_size, seed=0):
    """Record-sharded with a global annotator index: every rank's annotator_offsets has all
    H annotators (empty where the rank has none of their records)."""
    import emdpo_core as ec
    from emdpo_core import distributed

    d = estep_data(seed)
    labels = np.unique(d["annot"])
    local = take_records(d, shard_rows(d, rank, world_size, "block"))
    codes = np.searchsorted(labels, local["annot"])
    order, ao = ec.group_by_annotator(codes, labels.shape[0])
    g = take_records(local, order)
    r = distributed.e_step(g["policy"], g["ref"], g["offsets"], ao, g["log_weights"],
                           beta=g["beta"], n_ranked=g["n_ranked"],
                           record_weights=g["record_weights"])
    return dict(labels=labels, resp=r.responsibilities, S=r.annotator_loglik, loglik=r.loglik)


def job_e_step_bad_k(rank, world_size):
    """Rank 1 has K = 2, the others K = 3."""
    from emdpo_core import distributed

    d = estep_data(0)
    local = take_records(d, shard_rows(d, rank, world_size, "annotator"))
    g, ao, labels = grouped(local)
    K = 2 if rank == 1 else 3
    return distributed.e_step(g["policy"][:K], g["ref"], g["offsets"], ao,
                              np.log(np.full(K, 1.0 / K)), beta=1.0, annotator_ids=labels)


def job_straddle_annotator_mode(rank, world_size):
    """Annotators straddle ranks but sharding='annotator' is demanded."""
    return job_e_step(rank, world_size, how="block", sharding="annotator")


def job_reductions(rank, world_size):
    """Statistics.sync: sums in rank order (small and large buffers) and max."""
    from emdpo_core.distributed import Statistics, resolve_comm

    comm = resolve_comm(None)
    rng = np.random.default_rng(100 + rank)
    small = rng.normal(size=(3, 4))
    large = rng.normal(size=10_001)      # above GATHER_MAX: ordered reduce-scatter
    top = rng.normal(size=5)
    st = Statistics().add("small", small).add("large", large).add("top", top, reduce="max")
    st.add("scalar", float(rank + 1))
    st.sync(comm)
    return dict(small=st["small"], large=st["large"], top=st["top"],
                scalar=float(st["scalar"]), world=comm.world_size, rank=comm.rank)


# ----------------------------------------------------------------------------------------
# EM fits


def pl_data(seed=0, n_annotators=60, records=3, n_items=6):
    """Rankings from a planted 2-type Plackett-Luce mixture; string annotator ids."""
    import emdpo_core as ec

    truth = ec.PlackettLuceMixture.from_parameters(
        [[2.0, 1.2, 0.4, 0, -0.5, -1.5][:n_items], [-1.5, -0.5, 0, 0.4, 1.2, 2.0][:n_items]],
        [0.6, 0.4])
    data, _ = truth.sample(n_annotators, records_per_annotator=records, candidate_size=4,
                           random_state=seed)
    ids = np.array([f"user{a:03d}" for a in data.annotator_labels[data.annotator]])
    return ec.RankingData(data.items, data.offsets, data.n_ranked, annotator=ids,
                          n_items=data.n_items)


PL_PARAMS = dict(n_components=2, n_init=2, random_state=3, max_iter=200, tol=1e-10)


def fitted(model):
    """What must agree between fits (responsibilities keyed by annotator id)."""
    return dict(weights=model.weights_, log_worths=model.log_worths_, loglik=model.loglik_,
                lower_bounds=model.lower_bounds_, n_iter=model.n_iter_,
                converged=model.converged_, restarts=model.restarts_,
                resp=model.responsibilities_, comm_calls=None)


def job_pl_fit(rank, world_size, how="annotator", init_params="kmeans"):
    import emdpo_core as ec
    from emdpo_core import distributed

    data = pl_data()
    local = shard_local(data, rank, world_size, how)
    model = ec.PlackettLuceMixture(init_params=init_params, **PL_PARAMS).fit(local)
    out = fitted(model)
    out["labels"] = local.annotator_labels
    return out


def shard_local(data, rank, world_size, how):
    from emdpo_core import distributed

    if how == "annotator":
        return distributed.shard(data, rank=rank, world_size=world_size)
    N = data.n_records                               # contiguous records: annotators straddle
    return distributed.take_records(data, np.arange(N * rank // world_size,
                                                    N * (rank + 1) // world_size))


def job_pl_warm_start(rank, world_size):
    import emdpo_core as ec
    from emdpo_core import distributed

    local = distributed.shard(pl_data(), rank=rank, world_size=world_size)
    start = ec.PlackettLuceMixture.from_parameters(
        [[1.0, 0.5, 0, 0, 0, -1], [-1.0, 0, 0, 0, 0.5, 1]], [0.5, 0.5], warm_start=True,
        max_iter=30, tol=1e-10)
    start.fit(local)
    out = fitted(start)
    out["labels"] = local.annotator_labels
    return out


def job_select(rank, world_size):
    import emdpo_core as ec
    from emdpo_core import distributed

    local = distributed.shard(pl_data(), rank=rank, world_size=world_size)
    sel = ec.select_n_components(local, [1, 2, 3], random_state=0, max_iter=100)
    return dict(best=sel.best_n_components, bic=[r["bic"] for r in sel.rows])


def job_pl_bad_items(rank, world_size):
    """Rank 1 declares one more item than the others."""
    import emdpo_core as ec
    from emdpo_core import distributed

    local = distributed.shard(pl_data(), rank=rank, world_size=world_size)
    if rank == 1:
        local = ec.RankingData(local.items, local.offsets, local.n_ranked,
                               annotator=local.annotator_labels[local.annotator], n_items=7)
    return ec.PlackettLuceMixture(2, random_state=0, max_iter=5).fit(local)


def job_pl_bad_k(rank, world_size):
    import emdpo_core as ec
    from emdpo_core import distributed

    local = distributed.shard(pl_data(), rank=rank, world_size=world_size)
    return ec.PlackettLuceMixture(3 if rank == 1 else 2, random_state=0, max_iter=5).fit(local)


def job_pl_checkpoint(rank, world_size, path, die_at=None):
    """A fit with checkpoints; with die_at, rank world_size-1 exits hard at that iteration
    (os._exit: no exception handler runs, as when a process is killed)."""
    import os

    import emdpo_core as ec
    from emdpo_core import distributed

    local = distributed.shard(pl_data(), rank=rank, world_size=world_size)
    if die_at is None and os.path.exists(path):
        model = ec.PlackettLuceMixture.load(path)
        resumed = model._pending is not None
    else:
        model = ec.PlackettLuceMixture(checkpoint=path, checkpoint_every=3, **PL_PARAMS)
        resumed = False

    def callback(info):
        if die_at is not None and rank == world_size - 1 and info["restart"] == 1 and \
                info["iteration"] == die_at:
            os._exit(3)

    model.fit(local, callback=callback)
    out = fitted(model)
    out["labels"] = local.annotator_labels
    out["resumed"] = resumed
    return out


def torch_population():
    from emdpo_core.datasets import make_population

    return make_population(2, n_annotators=24, records_per_annotator=4, n_prompts=12,
                           random_state=0)


def torch_model(pop, **kw):
    import emdpo_core as ec
    import torch

    torch.manual_seed(0)
    fam = ec.TorchPolicies(pop.policy_module(), beta=1.0, **kw)
    return ec.EMDPO(2, fam, max_iter=4, random_state=0, tol=0.0)


TORCH_FAMILIES = {"lbfgs": dict(optimizer="lbfgs", steps=3),
                  "adam": dict(optimizer="adam", lr=0.05, steps=10)}


def job_emdpo_torch(rank, world_size, optimizer):
    import torch

    from emdpo_core import distributed

    torch.set_num_threads(1)
    pop = torch_population()
    local = distributed.shard(pop.data, rank=rank, world_size=world_size)
    model = torch_model(pop, **TORCH_FAMILIES[optimizer])
    model.fit(local)
    params = [p.detach().numpy().copy() for m in model.family_.modules for p in m.parameters()]
    return dict(weights=model.weights_, loglik=model.loglik_, lower_bounds=model.lower_bounds_,
                resp=model.responsibilities_, labels=local.annotator_labels, params=params)
