"""User cold-start mixing trials: does an attribute-only prior lift short histories?

    OUT=DIR python scripts/user_cold_mix_trials.py DATA PART SEED [SEED ...]

Per seed, on the user-cold split's ``PART`` tasks (k = 0, 1, 3, 5), fits ``coldstart``
and ``popularity-segment`` once, records their scores and the model's own scores with
the history emptied ("m0": what it gives a user with no events), then replays
z(model) + b z(prior) for prior in {m0, seg (log segment popularity)} over a grid of b.
One JSON line per seed goes to OUT/results.jsonl.
"""

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from trial_common import create, evaluate_task, make_split, open_data, train_data, z

OUT = Path(os.environ.get("OUT", ".run/trials/ucmix"))
B = [float(b) for b in os.environ.get("BS", "0,0.5,0.7,1,1.5").split(",")]
HEADS = [int(h) for h in os.environ.get("HEADS", "100").split(",")]
PRIORS = os.environ.get("PRIORS", "seg,gpop").split(",")
SPLIT = os.environ.get("SPLIT", "user-cold")


class Recorder:
    name = "recorder"

    def __init__(self, model: Any, seg: Any, pop: Any) -> None:
        self.model, self.seg, self.pop = model, seg, pop
        self.batches: list[dict[str, np.ndarray]] = []

    def _segment_prior(self, req: Any, small: bool = False) -> np.ndarray:
        from services.common.recsys_features import segment_prior

        inner = self.model._model  # the ScoringModel: its ranker tables and feature spec
        spec = inner.data.spec
        attrs = spec.user_vocab.from_blocks(len(req), req.user_attributes)
        cands = np.broadcast_to(np.asarray(req.candidates), (len(req), len(req.candidates)))
        fields = None
        if small:  # the popularity-segment baseline's fields: the two with fewest values
            sizes = {name: len(values) for name, values in spec.user_vocab.fields}
            fields = sorted((f for f in spec.segment_fields if sizes[f] <= 12), key=sizes.get)[:2]
        return segment_prior(spec, inner.tables, attrs, cands, fields)

    def score(self, req: Any) -> np.ndarray:
        empty = [np.zeros(0, dtype=np.int64) for _ in req.history]
        got = {
            "m": np.asarray(self.model.score(req), dtype=np.float64),
            "m0": np.asarray(self.model.score(replace(req, history=empty)), dtype=np.float64),
            "seg": np.log1p(np.maximum(np.asarray(self.seg.score(req), dtype=np.float64), 0) * 1e4),
            "gpop": np.log1p(np.asarray(self.pop.score(req), dtype=np.float64)),
            "nb": self._segment_prior(req),
            "nb2": self._segment_prior(req, small=True),
        }
        self.batches.append(got)
        return got["m"]


class Replay:
    name = "replay"

    def __init__(
        self, batches: list[dict[str, np.ndarray]], prior: str, b: float, head: int
    ) -> None:
        self.batches, self.prior, self.b, self.head, self.i = batches, prior, b, head, 0

    def score(self, req: Any) -> np.ndarray:
        got = self.batches[self.i]
        self.i += 1
        m = np.where(np.isfinite(got["m"]), got["m"], -1e9)
        if self.head >= m.shape[1]:
            return z(m) + self.b * z(got[self.prior])
        # The ranker re-scores only the towers' head, so mixing is confined to the
        # model's top ``head`` (a z over the whole row would flatten the head).
        out = m - 1e10
        for r in range(len(m)):
            top = np.argsort(-m[r], kind="stable")[: self.head]
            out[r, top] = z(m[r, top]) + self.b * z(got[self.prior][r, top])
        return out


def main() -> None:
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    for seed in map(int, sys.argv[3:]):
        t0 = time.time()
        split = make_split(SPLIT, ds, seed)
        data = train_data(ds, split, vecs)
        model = create("coldstart", seed, {})
        model.fit(data)
        seg = create("popularity-segment", seed, {})
        seg.fit(data)
        pop = create("popularity", seed, {})
        pop.fit(data)
        rows = []
        for task in split.tasks_for(part):
            rec = Recorder(model, seg, pop)
            evaluate_task(rec, ds, task, seed)
            for head in HEADS:
                for prior in PRIORS:
                    for b in B:
                        rep = Replay(rec.batches, prior, b, head)
                        r = evaluate_task(rep, ds, task, seed)
                        rows.append({"prior": prior, "b": b, "head": head, "task": task.key,
                                     "r20": r["recall@20"], "n20": r["ndcg@20"]})  # fmt: skip
            r = evaluate_task(seg, ds, task, seed)
            rows.append({"prior": "seg-alone", "b": 0, "head": 0, "task": task.key,
                         "r20": r["recall@20"], "n20": r["ndcg@20"]})  # fmt: skip
        line = {"data": d, "split": SPLIT, "part": part, "seed": seed, "secs": round(time.time() - t0, 1),
                "rows": rows}  # fmt: skip
        with open(OUT / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(d, seed, line["secs"], flush=True)


if __name__ == "__main__":
    main()
