"""content-knn's Recall@20 on item cold-start for several neighbour counts (docs/EVALUATION.md).

    python scripts/content_knn_neighbors.py DATA validation|test

Seeds 42-47 for the validation half, 42-44 for the test half; the splits are the harness's
seeded ones, so each row is what ``coldstart eval --data DATA --split item-cold --part PART
--seeds ... --models content-knn --option content-knn.neighbors=K`` gives.
"""

import sys

import numpy as np

from services.trainer.baselines.base import create
from services.trainer.data.registry import load_dataset
from services.trainer.data.vectors import MINILM, cached_vectors
from services.trainer.evaluation.runner import evaluate_task, train_data
from services.trainer.evaluation.splits import make_split

NEIGHBORS = (25, 50, 100, 200, 400, 800)


def main() -> None:
    data_name, part = sys.argv[1], sys.argv[2]
    dataset = load_dataset(data_name)
    vectors = cached_vectors(dataset.items.text, MINILM)
    seeds = range(42, 48) if part == "validation" else range(42, 45)
    recalls: dict[int, list[float]] = {k: [] for k in NEIGHBORS}
    for seed in seeds:
        split = make_split("item-cold", dataset, seed)
        data = train_data(dataset, split, vectors)
        for k in NEIGHBORS:
            model = create("content-knn", seed, {"neighbors": k})
            model.fit(data)
            for task in split.tasks_for(part):
                recalls[k].append(evaluate_task(model, dataset, task, seed)["recall@20"])
    for k, values in recalls.items():
        per_seed = " ".join(f"{v:.3f}" for v in values)
        print(f"{data_name} {part} neighbours {k}: {np.mean(values):.4f} ({per_seed})", flush=True)


if __name__ == "__main__":
    main()
