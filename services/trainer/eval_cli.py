"""``coldstart eval``: run the evaluation harness and write table, JSON and plots.

    coldstart eval --data ml-100k --split all --seeds 42 43 44 --out .run/eval/ml-100k

Bad input (unknown dataset, malformed file, unknown model or option) prints a
single ``error: ...`` line naming the file/line/option and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_MODELS = (
    "random",
    "popularity",
    "popularity-segment",
    "content-knn",
    "als",
    "lightfm",
    "dropoutnet",
)


class UsageError(Exception):
    """Bad command-line input; the message names the option."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="coldstart eval", description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        required=True,
        help="synthetic | ml-100k | ml-latest-small | a folder (MovieLens or generic format)",
    )
    p.add_argument(
        "--split",
        default="all",
        choices=("item-cold", "user-cold", "warm", "all"),
        help="which split(s) to evaluate",
    )
    p.add_argument(
        "--split-files",
        type=Path,
        help="a folder with train/validation/test files: evaluate that published split instead",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], metavar="SEED")
    p.add_argument("--out", type=Path, help="output folder (default .run/eval/<data>)")
    p.add_argument("--part", default="test", choices=("test", "validation", "all"))
    p.add_argument("--positive-threshold", type=float, help="positive when value >= this")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="MODEL.KEY=VALUE",
        help="model hyper-parameter, e.g. lightfm.epochs=30 (repeatable; JSON values)",
    )
    p.add_argument(
        "--embedder",
        default="minilm",
        choices=("minilm", "onnx-fp32", "onnx-int8", "hashing"),
        help="item text vectors: pretrained MiniLM with torch (cached), the encoder service's "
        "ONNX export in fp32 or INT8, or a cheap hashing stand-in",
    )
    p.add_argument(
        "--splits-dir",
        type=Path,
        help="reuse splits saved here (made and saved on first use); default <out>/splits",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_options(values: list[str], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        model, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UsageError(f"--option {raw!r}: expected MODEL.KEY=VALUE")
        if model not in models:
            raise UsageError(f"--option {raw!r}: model {model!r} is not in --models")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(model, {})[name] = parsed
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.common.paths import run_dir
    from services.trainer.baselines.base import available
    from services.trainer.data.registry import load_dataset
    from services.trainer.data.vectors import (
        MINILM,
        ONNX_FP32,
        ONNX_INT8,
        cached_vectors,
        hashing_spec,
    )
    from services.trainer.evaluation import report
    from services.trainer.evaluation.runner import RunConfig, run_split
    from services.trainer.evaluation.splits import (
        SPLITS,
        load_split,
        make_split,
        save_split,
        split_from_files,
    )

    known = available()
    for name in args.models:
        if name not in known:
            raise UsageError(f"--models: unknown model {name!r} (known: {', '.join(known)})")
    options = parse_options(args.option, args.models)
    if args.batch_size < 1:
        raise UsageError("--batch-size: must be >= 1")

    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # the harness runs without torch; only dropoutnet needs it
        pass

    dataset = load_dataset(args.data)
    if args.positive_threshold is not None:
        dataset = dataset.with_threshold(args.positive_threshold)
    out = args.out or run_dir() / "eval" / Path(str(args.data)).name
    out.mkdir(parents=True, exist_ok=True)
    print(dataset.summary(), file=sys.stderr)
    for what, count in dataset.skipped.items():
        print(f"skipped: {count} {what}", file=sys.stderr)

    spec = {"minilm": MINILM, "onnx-fp32": ONNX_FP32, "onnx-int8": ONNX_INT8}.get(
        args.embedder
    ) or hashing_spec()
    vectors = cached_vectors(dataset.items.text, spec)

    if args.split_files is not None:
        splits = [split_from_files(dataset, args.split_files)]
    else:
        names = SPLITS if args.split == "all" else (args.split,)
        splits_dir = args.splits_dir or out / "splits"
        splits = []
        for name in names:
            for seed in args.seeds:
                path = splits_dir / f"{dataset.name}-{name}-seed{seed}.npz"
                if path.is_file():
                    splits.append(load_split(path, dataset))
                else:
                    split = make_split(name, dataset, seed)
                    save_split(split, path)
                    splits.append(split)

    config = RunConfig(
        batch_size=args.batch_size,
        part=args.part,
        tracemalloc=args.tracemalloc,
        options=options,
    )
    results = []
    bar = tqdm(
        total=len(splits) * len(args.models),
        desc="eval",
        unit="fit",
        disable=args.quiet,
        file=sys.stderr,
    )

    def progress(message: str) -> None:
        bar.set_postfix_str(message[:70])

    t0 = time.perf_counter()
    for split in splits:
        for name in args.models:
            results.extend(run_split([name], dataset, split, vectors, config, progress))
            bar.update(1)
    bar.close()
    records = report.aggregate(results)
    text = report.table(records, title=f"{dataset.name} ({', '.join(map(str, args.seeds))})")
    print(text)
    payload = {
        "dataset": dataset.name,
        "summary": dataset.summary(),
        "skipped": dict(dataset.skipped),
        "embedder": spec.name,
        "seeds": list(args.seeds),
        "models": list(args.models),
        "options": options,
        "positive_threshold": dataset.positive_threshold,
        "splits": [
            {"name": s.name, "seed": s.seed, "train_interactions": len(s.train_rows), **s.info}
            for s in splits
        ],
        "seconds": time.perf_counter() - t0,
        "records": records,
    }
    report.write_json(out / "results.json", payload)
    (out / "table.txt").write_text(text + "\n", encoding="utf-8")
    (out / "table.md").write_text(report.markdown_table(records) + "\n", encoding="utf-8")
    if not args.no_plots:
        report.plot(records, out, dataset.name)
    print(f"wrote {out}/results.json", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    from services.trainer.data.errors import DataError

    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except (UsageError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
