"""User cold-start on the embedded synthetic data with and without the users' stated
interests (the same data otherwise): does the model read them?

    PYTHONPATH=.:scripts python scripts/interest_trials.py SEED [SEED ...]
    PRIOR_WEIGHTS="1 0.5 0" PYTHONPATH=.:scripts python scripts/interest_trials.py SEED ...

Per seed, the user-cold split of ``generate()`` as it is (70% of users state an interest)
and with every interest blanked; NDCG@20 at each k for ``coldstart`` on both, and for the
strongest baselines (which read no interest text) on the first. With PRIOR_WEIGHTS, instead
``coldstart`` at each ``prior_weight`` on the data with interests.
"""

import dataclasses
import os
import sys

import torch
from trial_common import create, evaluate_task, make_split, train_data

from services.trainer.data.synthetic import generate
from services.trainer.data.vectors import MINILM, cached_vectors


def main() -> None:
    torch.set_num_threads(1)
    ds = generate()
    blank = dataclasses.replace(ds, users=dataclasses.replace(ds.users, text=[""] * ds.n_users))
    vecs = cached_vectors(ds.items.text, MINILM)
    weights = os.environ.get("PRIOR_WEIGHTS")
    for seed in map(int, sys.argv[1:]):
        if weights:
            split = make_split("user-cold", ds, seed)
            data = train_data(ds, split, vecs)
            for w in map(float, weights.split()):
                model = create("coldstart", seed, {"prior_weight": w})
                model.fit(data)
                res = {t.k: evaluate_task(model, ds, t, seed)["ndcg@20"] for t in split.tasks}
                print(seed, "prior_weight", w, {k: round(v, 4) for k, v in res.items()})
            continue
        for label, d in (("interests", ds), ("none", blank)):
            split = make_split("user-cold", d, seed)
            data = train_data(d, split, vecs)
            names = ["popularity-segment", "lightfm", "coldstart"] if d is ds else ["coldstart"]
            for name in names:
                model = create(name, seed, {})
                model.fit(data)
                res = {t.k: evaluate_task(model, d, t, seed)["ndcg@20"] for t in split.tasks}
                print(seed, label, name, {k: round(v, 4) for k, v in res.items()}, flush=True)


if __name__ == "__main__":
    main()
