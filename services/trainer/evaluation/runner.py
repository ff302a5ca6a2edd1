"""The harness: fit every model on every split and seed, score, measure.

Per (model, split, seed) the model is built fresh from the registry, fitted
once on the split's training rows (fit time and peak memory measured), then
asked to score every task of the split batch by batch. Exclusions, ties and
metrics are handled here, identically for every model.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from services.trainer.baselines.base import Options, ScoreRequest, TrainData, create
from services.trainer.data.model import Dataset
from services.trainer.evaluation.metrics import KS, MetricAccumulator, top_k
from services.trainer.evaluation.splits import EvalTask, Split

Progress = Callable[[str], None]


@dataclass
class FitStats:
    seconds: float
    peak_rss_delta_mb: float | None
    tracemalloc_peak_mb: float | None


@dataclass
class TaskResult:
    model: str
    split: str
    part: str
    k: int | None
    seed: int
    users: int
    candidates: int
    metrics: dict[str, float]
    fit: FitStats
    score_seconds: float


@dataclass
class RunConfig:
    ks: Sequence[int] = KS
    batch_size: int = 256
    part: str = "test"  # or "validation" (tuning) or "all"
    tracemalloc: bool = False
    options: Mapping[str, Options] = field(default_factory=dict)  # per model name


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # psutil missing or no /proc: memory is reported as unknown
        return None


@contextmanager
def measure(use_tracemalloc: bool) -> Iterator[dict[str, Any]]:
    """Wall time, peak RSS above the starting RSS (sampled every 10 ms), and
    optionally the tracemalloc peak (Python and numpy allocations only: torch
    and the C++ of LightFM/implicit are invisible to it, RSS sees them)."""
    out: dict[str, Any] = {}
    start_rss = _rss_bytes()
    peak = [start_rss or 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            now = _rss_bytes() or 0
            peak[0] = max(peak[0], now)

    sampler = threading.Thread(target=sample, daemon=True)
    if start_rss is not None:
        sampler.start()
    if use_tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        if use_tracemalloc:
            out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        stop.set()
        if start_rss is not None:
            sampler.join()
            peak[0] = max(peak[0], _rss_bytes() or 0)
            out["peak_rss_delta_mb"] = (peak[0] - start_rss) / 2**20


def train_data(dataset: Dataset, split: Split, item_vectors: np.ndarray) -> TrainData:
    train = dataset.interactions.take(split.train_rows)
    pos = dataset.positive_mask(train)
    positives = sp.csr_matrix(
        (np.ones(int(pos.sum()), dtype=np.float32), (train.user[pos], train.item[pos])),
        shape=(dataset.n_users, dataset.n_items),
    )
    positives.sum_duplicates()
    positives.data[:] = 1.0
    return TrainData(
        dataset=dataset,
        item_vectors=item_vectors,
        train=train,
        positives=positives,
        seed=split.seed,
        info={"split": split.name},
    )


def evaluate_task(
    model: Any,
    dataset: Dataset,
    task: EvalTask,
    seed: int,
    ks: Sequence[int] = KS,
    batch_size: int = 256,
) -> dict[str, float]:
    candidates = (
        np.arange(dataset.n_items, dtype=np.int64) if task.candidates is None else task.candidates
    )
    column = np.full(dataset.n_items, -1, dtype=np.int64)
    column[candidates] = np.arange(len(candidates))
    acc = MetricAccumulator(len(candidates), ks)
    # Tie-breaking noise depends on the seed and the task, never on the model.
    rng = np.random.default_rng([seed, zlib.crc32(task.key.encode()), len(task.users)])
    categorical = dataset.users.categorical
    for start in range(0, len(task.users), batch_size):
        users = task.users[start : start + batch_size]
        history = task.history[start : start + batch_size]
        request = ScoreRequest(
            users=users,
            user_attributes={f: c.matrix[users] for f, c in categorical.items()},
            history=history,
            candidates=candidates,
            user_text=([dataset.users.text[u] for u in users] if dataset.users.text else None),
        )
        scores = np.asarray(model.score(request), dtype=np.float64)
        if scores.shape != (len(users), len(candidates)):
            raise ValueError(
                f"{model.name}: score returned shape {scores.shape}, "
                f"expected {(len(users), len(candidates))}"
            )
        if np.isnan(scores).any() or np.isposinf(scores).any():
            raise ValueError(f"{model.name}: score returned NaN or +inf")
        allowed = np.ones(scores.shape, dtype=bool)
        targets = []
        for row, i in enumerate(range(start, start + len(users))):
            masked = column[np.concatenate([task.history[i], task.exclude[i]])]
            allowed[row, masked[masked >= 0]] = False
            t = column[task.targets[i]]
            if (t < 0).any():
                raise ValueError(f"{task.key}: a target is not among the candidates")
            targets.append(t)
        scores[~allowed] = -np.inf
        acc.add(top_k(scores, max(ks), rng), allowed, targets)
    return acc.result()


def run_split(
    models: Sequence[str],
    dataset: Dataset,
    split: Split,
    item_vectors: np.ndarray,
    config: RunConfig,
    progress: Progress | None = None,
) -> list[TaskResult]:
    data = train_data(dataset, split, item_vectors)
    tasks = split.tasks if config.part == "all" else split.tasks_for(config.part)
    results = []
    for name in models:
        model = create(name, split.seed, config.options.get(name, {}))
        if progress:
            progress(f"{name}: fit on {split.name} (seed {split.seed})")
        with measure(config.tracemalloc) as m:
            model.fit(data)
        fit = FitStats(
            seconds=m["seconds"],
            peak_rss_delta_mb=m.get("peak_rss_delta_mb"),
            tracemalloc_peak_mb=m.get("tracemalloc_peak_mb"),
        )
        for task in tasks:
            if progress:
                progress(f"{name}: score {task.key} ({len(task.users)} users)")
            t0 = time.perf_counter()
            metrics = evaluate_task(model, dataset, task, split.seed, config.ks, config.batch_size)
            results.append(
                TaskResult(
                    model=name,
                    split=task.split,
                    part=task.part,
                    k=task.k,
                    seed=split.seed,
                    users=len(task.users),
                    candidates=(
                        dataset.n_items if task.candidates is None else len(task.candidates)
                    ),
                    metrics=metrics,
                    fit=fit,
                    score_seconds=time.perf_counter() - t0,
                )
            )
        del model
    return results
