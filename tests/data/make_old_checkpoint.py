"""Writes the checkpoints that tests/test_compat.py loads: models saved by the package as it
was before its modules moved into subpackages (commit 5ec4ccc), with their predictions.

    python tests/data/make_old_checkpoint.py      # from the repository root

It writes tests/data/old_plmixture.npz (a fitted PlackettLuceMixture), old_emdpo.npz (an EMDPO
with TorchPolicies over a LinearSoftmaxPolicy) and old_predictions.npz (what the old code
predicted for both). Run it once, with the old code; the files are committed.
"""

import os

import numpy as np
import torch

import emdpo_core as ec
from emdpo_core.datasets import make_population

HERE = os.path.dirname(os.path.abspath(__file__))


def plmixture_data():
    truth = ec.PlackettLuceMixture.from_parameters(
        np.random.default_rng(0).normal(scale=1.5, size=(2, 6)), np.array([0.6, 0.4]))
    data, _ = truth.sample(60, records_per_annotator=3, candidate_size=4, random_state=1)
    return data


def population():
    return make_population(2, n_annotators=40, records_per_annotator=3, n_prompts=10,
                           n_responses=5, n_features=3, reward_scale=2.5, random_state=2)


def emdpo_family(pop):
    return ec.TorchPolicies(pop.policy_module(), beta=pop.beta, optimizer="lbfgs", lr=1.0,
                            steps=1, init_steps=3)


def main():
    torch.set_num_threads(1)
    data = plmixture_data()
    pl = ec.PlackettLuceMixture(2, max_iter=20, n_init=2, random_state=0).fit(data)
    pl.save(os.path.join(HERE, "old_plmixture.npz"))
    pop = population()
    em = ec.EMDPO(2, emdpo_family(pop), max_iter=3, random_state=0).fit(pop.data)
    em.save(os.path.join(HERE, "old_emdpo.npz"))
    np.savez(os.path.join(HERE, "old_predictions.npz"),
             pl_proba=pl.predict_proba(data), pl_labels=pl.predict(data),
             pl_score=np.array(pl.score(data)), pl_log_worths=pl.log_worths_,
             em_proba=em.predict_proba(pop.data), em_labels=em.predict(pop.data),
             em_weights=em.weights_)


if __name__ == "__main__":
    main()
