"""Aggregating results over seeds, and writing them: table, JSON, PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.evaluation.runner import TaskResult

HEADLINE = ("recall@20", "ndcg@20")


def aggregate(results: Sequence[TaskResult]) -> list[dict[str, Any]]:
    """One record per (model, split, part, k): metric means over seeds, plus spread."""
    groups: dict[tuple[str, str, str, int | None], list[TaskResult]] = defaultdict(list)
    for r in results:
        groups[(r.model, r.split, r.part, r.k)].append(r)
    records = []
    for (model, split, part, k), rs in groups.items():
        metrics = sorted(rs[0].metrics)
        record: dict[str, Any] = {
            "model": model,
            "split": split,
            "part": part,
            "k": k,
            "seeds": [r.seed for r in rs],
            "users": float(np.mean([r.users for r in rs])),
            "candidates": float(np.mean([r.candidates for r in rs])),
        }
        for m in metrics:
            record[m] = float(np.mean([r.metrics[m] for r in rs]))
        record["std"] = {m: float(np.std([r.metrics[m] for r in rs])) for m in metrics}
        record["fit_seconds"] = float(np.mean([r.fit.seconds for r in rs]))
        rss = [r.fit.peak_rss_delta_mb for r in rs if r.fit.peak_rss_delta_mb is not None]
        record["peak_rss_delta_mb"] = float(max(rss)) if rss else None
        traced = [r.fit.tracemalloc_peak_mb for r in rs if r.fit.tracemalloc_peak_mb is not None]
        record["tracemalloc_peak_mb"] = float(max(traced)) if traced else None
        record["score_seconds"] = float(np.mean([r.score_seconds for r in rs]))
        record["per_seed"] = [{"seed": r.seed, **r.metrics} for r in rs]
        records.append(record)
    return records


def _column(record: dict[str, Any]) -> str:
    name = str(record["split"]) if record["k"] is None else f"{record['split']} k={record['k']}"
    return name if record["part"] == "test" else f"{name} ({record['part']})"


def _column_order(records: list[dict[str, Any]]) -> list[str]:
    rank = {"item-cold": 0, "user-cold": 1, "warm": 2, "files": 3}
    keyed = {
        _column(r): (rank.get(r["split"], 9), r["part"] != "test", r["k"] or 0) for r in records
    }
    return sorted(keyed, key=lambda c: keyed[c])


def table(records: list[dict[str, Any]], title: str = "") -> str:
    """Models x (split, k) with "R@20 / N@20" cells, then fit time and peak memory.

    Fit time is the sum over splits (one fit per split per seed, seed mean);
    peak memory the largest RSS increase seen during any of those fits.
    """
    columns = _column_order(records)
    models = list(dict.fromkeys(r["model"] for r in records))
    cells: dict[tuple[str, str], str] = {}
    fit: dict[str, dict[str, float]] = defaultdict(dict)
    peak: dict[str, float] = {}
    for r in records:
        cells[(r["model"], _column(r))] = f"{r['recall@20']:.3f}/{r['ndcg@20']:.3f}"
        fit[r["model"]][r["split"]] = r["fit_seconds"]
        if r["peak_rss_delta_mb"] is not None:
            peak[r["model"]] = max(peak.get(r["model"], 0.0), r["peak_rss_delta_mb"])
    header = ["model", *columns, "fit s", "peak MB"]
    rows = [header]
    for m in models:
        rows.append(
            [
                m,
                *(cells.get((m, c), "-") for c in columns),
                f"{sum(fit[m].values()):.1f}",
                f"{peak[m]:.0f}" if m in peak else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [title] if title else []
    lines.append("Recall@20 / NDCG@20 (mean over seeds)")
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(records: list[dict[str, Any]]) -> str:
    text = table(records).splitlines()[1:]
    rows = [line.split("  ") for line in text if not set(line) <= {"-", " "}]
    out = []
    for n, row in enumerate(rows):
        cells = [c.strip() for c in row if c.strip()]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "---|" * len(cells))
    return "\n".join(out)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def plot(records: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """recall_vs_k.png (user cold-start) and one bar chart per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    test = [r for r in records if r["part"] == "test"]
    cold = [r for r in test if r["split"] == "user-cold"]
    if cold:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for model in dict.fromkeys(r["model"] for r in cold):
            pts = sorted((r["k"], r["recall@20"]) for r in cold if r["model"] == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.set_xlabel("revealed interactions k")
        ax.set_ylabel("Recall@20")
        ax.set_title(f"{title}: user cold-start")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / "recall_vs_k.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for split in dict.fromkeys(r["split"] for r in test):
        rs = [r for r in test if r["split"] == split]
        labels = [r["model"] if r["k"] is None else f"{r['model']} k={r['k']}" for r in rs]
        x = np.arange(len(rs))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rs) + 2), 4.5))
        for offset, metric in ((-0.2, "recall@20"), (0.2, "ndcg@20")):
            ax.bar(x + offset, [r[metric] for r in rs], width=0.4, label=metric,
                   yerr=[r["std"][metric] for r in rs])  # fmt: skip
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{title}: {split}")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = folder / f"bars_{split}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
