"""Per-user cost of the new-item head's blend against the history window's size.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/new_item_head_timing.py

``recsys_features.new_item_head_scores`` over 100 candidates with H liked and H unliked
history items (H 50 and 200: the fusion service's history_length before and since run 9),
384-d content, a 64-d content map; random unit vectors (the cost does not depend on them).
"""

import time

import numpy as np

from services.common.recsys_features import new_item_head_scores


def main() -> None:
    rng = np.random.default_rng(0)
    content = rng.normal(size=(2000, 384)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    thresholds = np.full(2000, 0.2, np.float32)
    cands, tower = np.arange(100), rng.normal(size=100).astype(np.float32)
    user, cmap = (
        rng.normal(size=64).astype(np.float32),
        rng.normal(size=(384, 64)).astype(np.float32),
    )
    for h in (50, 200):
        liked, low = np.arange(200, 200 + h), np.arange(600, 600 + h)
        n, t = 2000, time.perf_counter()
        for _ in range(n):
            new_item_head_scores(
                content, cands, thresholds[cands], tower, liked, 0.7, user, cmap, 0.7, low, 0.2
            )
        print(f"history {h} + {h}: {(time.perf_counter() - t) / n * 1e6:.0f} us per user head")


if __name__ == "__main__":
    main()
