"""What the scoring-trial scripts (mix_trials, fusion_trials, user_cold_mix_trials) share:
the harness functions they call, the per-row standardisation they mix with, and the set-up.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.baselines.base import create
from services.trainer.data.model import Dataset
from services.trainer.evaluation.runner import evaluate_task, train_data
from services.trainer.evaluation.splits import make_split

__all__ = [
    "append_result",
    "create",
    "evaluate_task",
    "fit_towers",
    "head_mix",
    "make_split",
    "open_data",
    "train_data",
    "z",
]


def z(s: np.ndarray) -> np.ndarray:
    """Standardised along the last axis; a non-finite score (a model's -inf for the user's
    own items) first gets its row's floor minus 1."""
    s = np.asarray(s, dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.all():
        floor = np.where(finite, s, np.inf).min(axis=-1, keepdims=True) - 1.0
        s = np.where(finite, s, floor)
    mu = s.mean(axis=-1, keepdims=True)
    sd = s.std(axis=-1, keepdims=True) + 1e-9
    out: np.ndarray = (s - mu) / sd
    return out


def head_mix(
    base: np.ndarray,
    terms: list[tuple[np.ndarray, float]],
    histories: list[np.ndarray],
    candidates: np.ndarray,
    head: int = 100,
) -> np.ndarray:
    """``base`` (users x candidates) with each user's top ``head`` by it (their history
    excluded) re-scored as z(base) + sum of weight x z(term) over that head, the rest kept
    below in base order: what a serving re-rank of the head can do."""
    out = base - 1e4
    for r, h in enumerate(histories):
        b = base[r].copy()
        b[np.isin(candidates, h)] = -np.inf
        top = np.argsort(-b, kind="stable")[: min(head, len(candidates))]
        s = z(base[r, top])
        for term, weight in terms:
            if weight:
                s = s + weight * z(term[r, top])
        out[r, top] = s
    return out


def open_data(name: str, out: Path) -> tuple[Dataset, np.ndarray]:
    """The dataset and its MiniLM text vectors, one torch thread, ``out`` created."""
    import torch

    from services.trainer.data.registry import load_dataset
    from services.trainer.data.vectors import MINILM, cached_vectors

    torch.set_num_threads(1)
    ds = load_dataset(name)
    out.mkdir(parents=True, exist_ok=True)
    return ds, cached_vectors(ds.items.text, MINILM)


def fit_towers(data: Any, seed: int, options: dict[str, Any] | None = None) -> Any:
    """The towers alone (``coldstart-no-ranker``) fitted on the harness's ``data``: the
    fitted ``ScoringModel`` (``.result.towers``, ``.data``, ``.thresholds``, ``.cfg``)."""
    model = create("coldstart-no-ranker", seed, options or {})
    model.fit(data)
    return model._model  # type: ignore[attr-defined]


def append_result(out: Path, line: dict[str, Any], echo: bool = True) -> None:
    """One JSON line appended to ``out``/results.jsonl (and printed, unless ``echo`` is
    off for a caller that prints its own summary)."""
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    if echo:
        print(json.dumps(line), flush=True)
