"""Time the fusion service's rank_batch for new users (k = 0) with and without the
short-history prior, and for users with history over new items with and without the
content map, on a version trained on the synthetic data (seconds to build).

    PYTHONPATH=. python scripts/fusion_prior_timing.py
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from services.trainer.model.bundle import load_bundle, save_bundle
from services.trainer.model.distributed import DistContext
from services.trainer.model.export import publish
from services.trainer.model.synthetic import small_config, synthetic_model_data
from services.trainer.model.train import RunOptions, train
from tests.integration.test_fusion_recsys import (
    ModelHolder,
    ModelRegistry,
    ModelVersion,
    Recommender,
    UserQuery,
    UserStore,
    item_id,
)

torch.set_num_threads(1)
data = synthetic_model_data()
result = train(data, small_config(epochs=1), DistContext.single(), RunOptions())
d = Path(tempfile.mkdtemp())
save_bundle(
    d / "model",
    result,
    [item_id(i) for i in range(data.n_items)],
    [f"u{u}" for u in range(data.n_users)],
    {},
)
publish(load_bundle(d / "model"), d / "registry")
holder = ModelHolder(ModelRegistry(d / "registry"), ModelVersion.load)
core = Recommender(holder, UserStore())
holder.load_initial()
model = holder.current
users = [core._prepare(UserQuery(recent_item_ids=[]), 10).user for _ in range(32)]
vecs = model.user_vector_batch(users)
rows = [
    np.sort(np.random.default_rng(i).choice(len(model.index), 100, replace=False))
    for i in range(32)
]


def time_weights(attr: str, users: list, vecs: np.ndarray, what: str) -> None:
    """rank_batch timed with the version's ``attr`` at 0 and at its own value, twice."""
    own = getattr(model, attr)
    for w in (0.0, own, 0.0, own):
        setattr(model, attr, w)
        t = time.perf_counter()
        for _ in range(200):
            model.rank_batch(users, rows, vecs)
        print(f"{attr} {w}: {(time.perf_counter() - t) / 200 * 1e6:.0f} us per batch of {what}")


time_weights("prior_weight", users, vecs, "32 k=0 users x 100 candidates")

# A head of new items (every count emptied) for users with 3 items: the new-item blend,
# with and without its content-map term.
model.prior_weight = 0.0
model.tables.pop[:] = 0
users = [
    core._prepare(UserQuery(recent_item_ids=[item_id(i + j) for j in range(3)]), 10).user
    for i in range(32)
]
vecs = model.user_vector_batch(users)
time_weights("new_item_map_weight", users, vecs, "32 users with 3 items x 100 new candidates")
