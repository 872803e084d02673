"""EMDPOTrainer under DDP: run by tests/test_distributed.py with
``python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_trainer.py OUT`` (what
``accelerate launch`` does). Trains with a checkpoint at every step, then resumes a second
trainer from the middle of the second M-step; rank 0 writes both results to OUT/result.json."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402


def rows_and_params():
    from test_hf_trainer import _seed, planted_rows

    rows, _ = planted_rows(np.random.default_rng(_seed("ddp")), 8, 4)
    # 32 rows, a global batch of 8 (per process: 8 / processes): 4 steps per M-step.
    # The padded layout: what is compared is DDP against one process, not the two layouts.
    # With the prefix-shared default, a per-process batch of 8 / P lists packs into other
    # sequence lengths than a batch of 8, and float32 rounding moved one LoRA weight sum by
    # 1.2e-4 relative (measured with P = 2), above the 1e-4 this test allows for DDP itself.
    params = dict(em_iterations=2, save_strategy="steps", save_steps=1, use_cpu=True,
                  prefix_sharing=False)
    return rows, params


def summary(t):
    s = t._types.state_dict()
    return {"weights": t.weights_.tolist(), "resp": t.responsibilities_.tolist(),
            "loglik": [h["loglik"] for h in t._em.history],
            "params": {n: float(v.double().sum()) for n, v in sorted(s.items())}}


def main(out):
    import torch

    from test_hf_trainer import make_trainer

    torch.set_num_threads(1)
    P = int(os.environ.get("WORLD_SIZE", "1"))
    rows, params = rows_and_params()
    a = make_trainer(os.path.join(out, "a"), rows, per_device_train_batch_size=8 // P, **params)
    a.train()
    b = make_trainer(os.path.join(out, "b"), rows, per_device_train_batch_size=8 // P, **params)
    b.train(resume_from_checkpoint=os.path.join(out, "a", "checkpoint-6"))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"a": summary(a), "b": summary(b), "world_size": a.args.world_size}, f)


if __name__ == "__main__":
    main(sys.argv[1])
