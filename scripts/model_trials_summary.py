"""Summarise scripts/model_trials.py results: per (data, task, model, label) the mean over
seeds, and the *paired* difference to a reference label on the seeds both have (mean, its
standard error over seeds, and how many seeds it won), which is the yardstick of run 4
(docs/MODEL.md): the item-cold halves vary by more than the effects between seeds, but
two option sets on the same split share most of that noise.

    python scripts/model_trials_summary.py RESULTS.jsonl [REFERENCE_LABEL] [METRIC]

METRIC is r20 (default) or n20.
"""

import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def main() -> None:
    path = Path(sys.argv[1])
    ref = sys.argv[2] if len(sys.argv) > 2 else "base"
    metric = sys.argv[3] if len(sys.argv) > 3 else "r20"
    cells: dict[tuple[str, str, str, str], dict[int, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        part = rec.get("part", "test")
        for r in rec["results"]:
            key = (rec["data"], f"{r['task']}", r["model"], rec["label"])
            if part not in r["task"]:
                key = (rec["data"], f"{r['task']}:{part}", r["model"], rec["label"])
            cells[key][int(rec["seed"])] = float(r[metric])
    rows = []
    for (data, task, model, label), by_seed in sorted(cells.items()):
        base = cells.get((data, task, model, ref), {})
        common = sorted(set(by_seed) & set(base))
        mean = sum(by_seed.values()) / len(by_seed)
        line = f"{data:16} {task:28} {model:20} {label:24} n={len(by_seed):2} {mean:.4f}"
        if label != ref and len(common) >= 2:
            diffs = [by_seed[s] - base[s] for s in common]
            d = sum(diffs) / len(diffs)
            sd = math.sqrt(sum((x - d) ** 2 for x in diffs) / (len(diffs) - 1))
            se = sd / math.sqrt(len(diffs))
            wins = sum(x > 0 for x in diffs)
            line += (
                f"  vs {ref} ({len(common)} seeds): {d:+.4f} +- {se:.4f}  won {wins}/{len(common)}"
            )
        rows.append(line)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
