"""Parallel model trials on the harness's saved splits (how the run-3 trials of docs/experiments/model-runs.md ran).

    python scripts/model_trials.py JOBS.json [WORKERS]      # results: $OUT/results.jsonl

JOBS.json is a list of jobs, e.g.
    {"label": "cold32", "data": "ml-latest-small", "split": "item-cold", "part": "validation",
     "seed": 42, "models": ["coldstart-no-ranker"], "opts": {"cold_content_dims": 32}}
(optional "ensemble": n sums the scores of n fits seeded seed, seed+1000, ...).
Each job is one fit and scoring per model with the harness's own ``train_data`` and
``evaluate_task``, so a job gives what ``coldstart eval --data D --split S --part P --seeds N
--models M --option M.key=value --splits-dir $SPLITS`` gives for that seed; the split is read
from $SPLITS/<data>-<split>-seed<N>.npz when there, else made with the same seeded function.
One torch thread per worker; TRIAL_DEADLINE (seconds) stops starting new jobs.
"""

import json
import os
import sys
import time
import traceback
from multiprocessing import get_context
from pathlib import Path
from typing import Any

T0 = time.time()
DEADLINE = float(os.environ.get("TRIAL_DEADLINE", "1e9"))
OUT = Path(os.environ.get("OUT", ".run/trials/out"))
_DS: dict[str, Any] = {}


def job(spec: dict[str, Any]) -> dict[str, Any] | None:
    import numpy as np
    import torch

    from services.trainer.baselines.base import create
    from services.trainer.data.registry import load_dataset
    from services.trainer.data.vectors import MINILM, cached_vectors
    from services.trainer.evaluation.runner import evaluate_task, train_data
    from services.trainer.evaluation.splits import load_split, make_split

    torch.set_num_threads(1)
    if time.time() - T0 > DEADLINE:
        return None
    d = spec["data"]
    if d not in _DS:
        ds = load_dataset(d)
        _DS[d] = (ds, cached_vectors(ds.items.text, MINILM))
    ds, vecs = _DS[d]
    seed = spec["seed"]
    path = Path(os.environ.get("SPLITS", ".")) / f"{d}-{spec['split']}-seed{seed}.npz"
    split = load_split(path, ds) if path.is_file() else make_split(spec["split"], ds, seed)
    data = train_data(ds, split, vecs)
    out = []
    t0 = time.time()
    for name in spec["models"]:
        models = []
        for e in range(spec.get("ensemble", 1)):
            m = create(name, seed + 1000 * e, dict(spec["opts"]))
            m.fit(data)
            models.append(m)

        class Sum:
            def __init__(self, ms: list[Any]) -> None:
                self.ms, self.name = ms, ms[0].name

            def score(self, req: Any) -> Any:
                return sum(np.asarray(m.score(req), dtype=np.float64) for m in self.ms)

        model = Sum(models)
        for task in split.tasks_for(spec["part"]):
            r = evaluate_task(model, ds, task, seed)
            out.append(
                {"model": name, "task": task.key, "r20": r["recall@20"], "n20": r["ndcg@20"]}
            )
    rec = {**spec, "secs": round(time.time() - t0, 1), "results": out}
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(spec["label"], d, seed, rec["secs"], out, flush=True)
    return rec


def run_job(spec: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return job(spec)
    except Exception:
        traceback.print_exc()
        return None


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(run_job, jobs, chunksize=1):
            pass
    print("done", round(time.time() - T0), flush=True)
