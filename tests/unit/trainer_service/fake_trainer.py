"""A stand-in for `coldstart train`: writes a candidate version through
ModelRegistry.stage whose scorer ranks items by training popularity.

``--mode`` shapes its quality so the gate can be tested: "popularity" (good),
"inverse" (least popular first: clearly worse), "random". ``--sleep`` keeps it
"training" long enough for a test to SIGKILL the trainer; ``--fail`` exits 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from services.common.registry import ModelRegistry

SCORER = "tests.unit.trainer_service.fake_trainer:load_scorer"


class PopularityScorer:
    def __init__(self, counts: dict[str, float], mode: str) -> None:
        self.counts = counts
        self.mode = mode

    def score(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        candidates: Sequence[str],
    ) -> np.ndarray:
        row = np.asarray([self.counts.get(c, 0.0) for c in candidates], dtype=np.float64)
        if self.mode == "inverse":
            row = -row
        elif self.mode == "random":
            row = np.random.default_rng(1).random(len(candidates))
        return np.tile(row, (len(user_ids), 1))


def load_scorer(version_dir: Path) -> PopularityScorer:
    state = json.loads((version_dir / "popularity.json").read_text())
    return PopularityScorer(state["counts"], state["mode"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--tag", default="")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mode", default="popularity")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args(argv)
    print(f"fake trainer: workers={args.workers} data={args.data}", flush=True)
    if args.sleep:
        time.sleep(args.sleep)
    if args.fail:
        print("fake trainer: failing on purpose", flush=True)
        return 3
    frame = pd.read_parquet(Path(args.data) / "interactions.parquet")
    counts = frame["item_id"].value_counts().astype(float).to_dict()
    manifest: dict[str, object] = {
        "scorer": SCORER,
        "metrics": {"train_rows": float(len(frame))},
        "item_count": len(counts),
    }
    with ModelRegistry(Path(args.registry)).stage(manifest, tag=args.tag) as folder:
        (folder / "popularity.json").write_text(json.dumps({"counts": counts, "mode": args.mode}))
        (folder / "weights.bin").write_bytes(b"\0" * 4096)
    print(f"fake trainer: wrote {manifest['version']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
