"""User cold-start at k = 0: how far can a list that is the same for every new user go?

    python scripts/static_ceiling.py DATA [DATA ...] [--seeds 42 43 44]

At k = 0 a new user has no history; on ml-latest-small there are no user attributes and
no interest text either, so every model's list is the same for every user: a static
ranking. NDCG@20 (binary relevance) summed over users is a sum over items of
``w_i * discount(rank of i)`` with ``w_i = sum over users with i among their targets of
1 / IDCG_u``, so sorting items by ``w_i`` maximises the mean NDCG@20 of a static ranking
exactly (rearrangement inequality). Computed from the evaluated users' own targets, it is
an in-sample ceiling no static ranking, trained or not, can pass. Printed beside training
popularity (the harness's ``popularity`` baseline) per seed and as the mean ratio.

On a catalog with user attributes the per-segment version is printed too, but there it is
no ceiling: fitted on the users it scores, a fine segmentation overfits (each user alone
would score 1.0).
"""

import argparse

import numpy as np
from trial_common import make_split, train_data

from services.trainer.baselines.common import popularity_scores
from services.trainer.data.registry import load_dataset
from services.trainer.evaluation.metrics import evaluate_ranking

IDEAL = np.cumsum(1.0 / np.log2(np.arange(2, 22)))  # IDCG@20 by number of targets


def best_static(targets: list[np.ndarray], n_items: int) -> np.ndarray:
    w = np.zeros(n_items)
    for t in targets:
        w[t] += 1.0 / IDEAL[min(len(t), 20) - 1]
    return w


def ndcg20(scores: np.ndarray, targets: list[np.ndarray]) -> float:
    return evaluate_ranking(scores, targets, ks=(20,))["ndcg@20"]


def segment_codes(ds: object, users: np.ndarray) -> np.ndarray | None:
    """Gender x age band where the catalog has both (the popularity-segment baseline's
    segments on ML-100K), else None."""
    cats = ds.users.categorical  # type: ignore[attr-defined]
    if not {"gender", "age_band"} <= set(cats):
        return None
    g = np.asarray(cats["gender"].matrix.argmax(axis=1)).ravel()
    a = np.asarray(cats["age_band"].matrix.argmax(axis=1)).ravel()
    return (g * 100 + a)[users]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    args = parser.parse_args()
    for name in args.data:
        ds = load_dataset(name)
        ratios = []
        for seed in args.seeds:
            split = make_split("user-cold", ds, seed)
            task = next(t for t in split.tasks if t.k == 0)
            n = len(task.users)
            data = train_data(ds, split, np.zeros((ds.n_items, 1), dtype=np.float32))
            pop = ndcg20(np.tile(popularity_scores(data), (n, 1)), task.targets)
            ceiling = ndcg20(np.tile(best_static(task.targets, ds.n_items), (n, 1)), task.targets)
            ratios.append(ceiling / pop)
            line = (f"{name} seed {seed}: {n} users, popularity {pop:.4f}, "
                    f"best static ranking (in sample) {ceiling:.4f} ({ceiling / pop:.3f}x)")  # fmt: skip
            seg = segment_codes(ds, task.users)
            if seg is not None:
                scores = np.zeros((n, ds.n_items))
                for s in np.unique(seg):
                    rows = np.flatnonzero(seg == s)
                    scores[rows] = best_static([task.targets[r] for r in rows], ds.n_items)
                line += f", per gender x age band (in sample, no ceiling) {ndcg20(scores, task.targets):.4f}"
            print(line, flush=True)
        print(f"{name}: best static / popularity, mean over seeds {np.mean(ratios):.3f}x")


if __name__ == "__main__":
    main()
