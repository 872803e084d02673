"""Distributed EM on the GPU machine: NCCL collectives on CUDA tensors (run by
benchmarks/device_check.sh; one GPU suffices).

With one GPU the NCCL group has one rank, so nothing is summed across processes; the
communicator's ordered sums (all_gather_into_tensor, all_to_all_single) and the families'
M-step reductions still run through NCCL on CUDA buffers (an explicit process_group is a
communicator even with one rank). Checks:
  1. the ordered sum of a CUDA tensor through NCCL (small: all-gather; large: reduce-scatter
     by all_to_all + all-gather) equals the tensor, bitwise;
  2. the sharded E-step on CUDA tensors equals the one-process E-step;
  3. EMDPO with torch policies on the GPU, fitted with the NCCL group, equals the fit without
     a group (the M-step's gradients and normaliser go through NCCL), bitwise;
  4. PlackettLuceMixture with the group equals the fit without one, bitwise.
Prints one line per check and exits non-zero on a failure. With several GPUs run it under
torchrun (torchrun --nproc_per_node=N benchmarks/device_check_distributed.py): then the
checks compare the N-rank fit with the one-process fit to 1e-10 (1e-4 for float32 torch
policies), every rank alike.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import warnings

import numpy as np


def main(cpu: bool = False) -> int:
    import torch
    import torch.distributed as dist

    import emdpo_core as ec
    from emdpo_core import distributed
    from emdpo_core.datasets import make_population

    warnings.simplefilter("ignore")
    if not cpu and not torch.cuda.is_available():
        print("distributed device check: no CUDA device")
        return 1
    if "RANK" not in os.environ:                       # not under torchrun: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cpu:     # --cpu: the same checks on gloo and CPU tensors (to try the script anywhere)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
        dev = torch.device("cuda", local_rank)
    group = dist.group.WORLD
    P, rank = dist.get_world_size(), dist.get_rank()
    failed = []

    def check(name, ok, detail=""):
        if rank == 0:
            print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            failed.append(name)

    comm = distributed.resolve_comm(group)
    check("communicator on the group's device", isinstance(comm, distributed.TorchComm) and
          comm.device.type == dev.type, str(getattr(comm, "device", None)))
    for n in (10, 100_003):
        x = torch.randn(n, device=dev, dtype=torch.float64,
                        generator=torch.Generator(device=dev).manual_seed(rank))
        parts = [torch.randn(n, device=dev, dtype=torch.float64,
                             generator=torch.Generator(device=dev).manual_seed(r))
                 for r in range(P)]
        want = parts[0].clone()
        for p in parts[1:]:
            want += p
        got = comm.sum_tensor(x)
        check(f"ordered sum of {n} float64 ", bool(torch.equal(got, want)))

    # Sharded E-step on CUDA tensors.
    rng = np.random.default_rng(0)
    H, K = 40, 3
    per = rng.integers(1, 4, size=H)
    annot = np.repeat(np.arange(H), per)
    N = annot.shape[0]
    offsets = np.arange(N + 1) * 4
    policy = rng.normal(-30, 3, size=(K, 4 * N))
    ref = rng.normal(-30, 3, size=4 * N)
    lw = np.log(np.full(K, 1.0 / K))
    ao = np.concatenate([[0], np.cumsum(per)])
    one = ec.e_step(policy, ref, offsets, ao, lw, beta=0.5)
    mine = np.flatnonzero(distributed.shard_of(annot, P) == rank)
    lab = np.unique(annot[mine])
    order, lao = ec.group_by_annotator(np.searchsorted(lab, annot[mine]))
    rows = mine[order]
    slots = np.concatenate([np.arange(4 * i, 4 * i + 4) for i in rows])
    res = distributed.e_step(torch.as_tensor(policy[:, slots], device=dev),
                             torch.as_tensor(ref[slots], device=dev),
                             np.arange(rows.shape[0] + 1) * 4, lao, lw, beta=0.5,
                             annotator_ids=lab, process_group=group)
    got = res.responsibilities.cpu().numpy()
    check("sharded e_step = one process",
          np.allclose(got, one.responsibilities[lab], rtol=1e-10, atol=1e-12) and
          abs(res.loglik - one.loglik) <= 1e-10 * abs(one.loglik),
          f"max |diff| {np.abs(got - one.responsibilities[lab]).max():.1e}")

    # EMDPO with torch policies on the GPU.
    pop = make_population(2, n_annotators=40, records_per_annotator=4, n_prompts=16,
                          random_state=0)
    local = distributed.shard(pop.data, rank=rank, world_size=P)

    def torch_fit(data, pg):
        torch.manual_seed(0)
        fam = ec.TorchPolicies(pop.policy_module().to(dev), beta=1.0, optimizer="adam",
                               lr=0.05, steps=10)
        return ec.EMDPO(2, fam, max_iter=4, tol=0.0, random_state=0).fit(
            data, process_group=pg)

    a = torch_fit(local, group)
    alone = distributed.LocalComm()          # this process alone, although a group exists
    b = torch_fit(pop.data if P > 1 else local, alone)
    tol = 0.0 if P == 1 else 1e-4
    pa = [p.detach().cpu().numpy() for m in a.family_.modules for p in m.parameters()]
    pb = [p.detach().cpu().numpy() for m in b.family_.modules for p in m.parameters()]
    check("EMDPO torch policies: group = one process",
          all(np.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(pa, pb)) and
          np.allclose(a.weights_, b.weights_, rtol=tol, atol=tol),
          f"weights {np.round(a.weights_, 6).tolist()}")

    # PlackettLuceMixture through the NCCL communicator.
    truth = ec.PlackettLuceMixture.from_parameters([[2.0, 1, 0, -1], [-1.0, 0, 1, 2]],
                                                   [0.5, 0.5])
    data, _ = truth.sample(300, records_per_annotator=2, random_state=0)
    lp = distributed.shard(data, rank=rank, world_size=P)
    a = ec.PlackettLuceMixture(2, random_state=0).fit(lp, process_group=group)
    b = ec.PlackettLuceMixture(2, random_state=0).fit(data if P > 1 else lp,
                                                      process_group=alone)
    tol = 0.0 if P == 1 else 1e-10
    check("PlackettLuceMixture: group = one process",
          np.allclose(a.log_worths_, b.log_worths_, rtol=tol, atol=tol) and
          a.n_iter_ == b.n_iter_, f"n_iter {a.n_iter_}")
    dist.destroy_process_group()
    if rank == 0:
        print(f"distributed device check: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)}"
              f" ({P} rank(s), {'gloo' if cpu else 'NCCL'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(cpu="--cpu" in sys.argv[1:]))
