"""Runs benchmarks by name and writes/prints their results.

Each benchmark module has ``main(argv) -> int`` and writes its own
``bench/results/<name>.json`` via ``write_results`` (JSON + a printed table).
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(
    name: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None
) -> Path:
    """Write ``bench/results/<name>.json`` and print ``rows`` as a table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        **(meta or {}),
        "rows": rows,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print_table(name, rows)
    print(f"-> {path}")
    return path


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print(f"{title}: no rows")
        return
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    print(f"\n== {title} ==")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(cell(row.get(c)).ljust(widths[c]) for c in columns))


def run(benchmarks: Sequence[tuple[str, str]], name: str, argv: list[str]) -> int:
    selected = [(n, m) for n, m in benchmarks if name in (n, "all")]
    failures = 0
    for bench_name, module in selected:
        try:
            entry = importlib.import_module(module).main
        except ModuleNotFoundError as exc:
            if name == "all" and exc.name == module:
                print(f"bench {bench_name}: not part of this build yet, skipped")
                continue
            raise
        print(f"--- bench {bench_name} ---", flush=True)
        code = int(entry(argv))
        if code != 0:
            print(f"bench {bench_name}: exit {code}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0
