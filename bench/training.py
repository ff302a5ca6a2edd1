"""Training benchmark: tower-training throughput with 1 and 2 gloo workers.

    coldstart bench training [--data ml-100k] [--workers 1 2] [--epochs 1] [--device cpu|cuda]

Each configuration is a real ``torchrun`` launch of the training code (the
same DDP path ``coldstart train --workers N`` takes) that trains the towers
for ``--epochs`` epochs at a fixed *global* batch, so every configuration does
the same work. Reported per configuration: samples/second, seconds per epoch,
the first-to-last loss, and peak resident memory per worker (max over
workers) and summed. Results: bench/results/training.json.

Each worker runs one torch thread by default, so 2 workers use the 2 cores
that 1 worker leaves half idle; each configuration runs ``--repeat`` times and
the fastest run is kept (other processes share the machine; the per-run
throughputs are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> int:
    """One torchrun worker: load data, train the towers, report timings (rank 0 writes)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from services.trainer.model.config import ModelConfig
    from services.trainer.model.distributed import init_distributed, shutdown
    from services.trainer.model.train import RunOptions, train

    torch.set_num_threads(args.threads_per_worker)
    ctx = init_distributed(force_cpu=args.device == "cpu")
    try:
        data = load_data(args.data)
        cfg = ModelConfig(epochs=args.epochs, batch_size=args.batch_size, use_ranker=False)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t0 = time.perf_counter()
        result = train(data, cfg, ctx, RunOptions())
        seconds = time.perf_counter() - t0
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        gpu_mb = (
            torch.cuda.max_memory_allocated(ctx.device) / 2**20
            if ctx.device.type == "cuda"
            else None
        )
        report = {
            "rank": ctx.rank,
            "seconds": seconds,
            "tower_seconds": result.seconds["towers"],
            "samples": result.samples["towers"],
            "steps_per_epoch": result.samples["tower_steps_per_epoch"],
            "global_batch": result.samples["tower_global_batch"],
            "loss_first": float(np.mean(result.losses["towers"][:10])),
            "loss_last": float(np.mean(result.losses["towers"][-10:])),
            "peak_rss_mb": peak_rss_mb,
            "gpu_peak_mb": gpu_mb,
            "backend": ctx.backend or "single",
            "device": str(ctx.device),
        }
        Path(args.report_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report))
    finally:
        shutdown(ctx)
    return 0


def load_data(name: str) -> Any:
    from services.trainer.model.synthetic import synthetic_model_data

    if name == "synthetic":
        return synthetic_model_data(n_users=2000, n_items=1500, text_dim=384, per_user=25)
    from services.trainer.data.registry import load_dataset
    from services.trainer.data.vectors import MINILM, cached_vectors
    from services.trainer.model.config import ModelConfig
    from services.trainer.model.dataset import build_model_data, item_attributes, vocab_from_fields

    cfg = ModelConfig()
    ds = load_dataset(name)
    vectors = cached_vectors(ds.items.text, MINILM)
    item_vocab, item_attrs = item_attributes(ds.items, cfg.derive_year)
    user_vocab = vocab_from_fields({n: c.vocab for n, c in ds.users.categorical.items()})
    pos = ds.positive_mask()
    inter = ds.interactions
    return build_model_data(
        content=vectors,
        item_vocab=item_vocab,
        item_attrs=item_attrs,
        user_vocab=user_vocab,
        user_attrs=user_vocab.from_blocks(
            ds.n_users, {n: c.matrix for n, c in ds.users.categorical.items()}
        ),
        pos_users=inter.user[pos],
        pos_items=inter.item[pos],
        pos_times=inter.timestamp[pos],
        item_vec_dim=cfg.dim + 1,
        max_history=cfg.max_history,
    )


def run_config(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={workers}",
            str(Path(__file__).resolve()),
            "--worker",
            "--data",
            args.data,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
            "--threads-per-worker",
            str(args.threads_per_worker),
            "--report-dir",
            tmp,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=REPO)
        wall = time.perf_counter() - t0
        reports = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    if len(reports) != workers:
        raise RuntimeError(f"{workers} workers but {len(reports)} reports")
    main = next(r for r in reports if r["rank"] == 0)
    epochs = args.epochs
    return {
        "workers": workers,
        "backend": main["backend"],
        "device": main["device"],
        "global_batch": main["global_batch"],
        "samples_per_s": round(main["samples"] / main["tower_seconds"], 1),
        "s_per_epoch": round(main["tower_seconds"] / epochs, 2),
        "loss_first": round(main["loss_first"], 4),
        "loss_last": round(main["loss_last"], 4),
        "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in reports), 1),
        "peak_rss_mb_sum": round(sum(r["peak_rss_mb"] for r in reports), 1),
        "gpu_peak_mb": (round(main["gpu_peak_mb"], 1) if main["gpu_peak_mb"] is not None else None),
        "launch_wall_s": round(wall, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coldstart bench training", description=__doc__.splitlines()[0]
    )
    p.add_argument("--data", default="ml-100k", help="ml-100k | ml-latest-small | synthetic")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512, help="global batch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="torch threads per worker (1: a second OpenMP thread mostly spins on a busy 2-core box)",
    )
    p.add_argument("--repeat", type=int, default=2, help="runs per configuration; the best is kept")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-dir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    for w in args.workers:
        if w < 1 or args.batch_size % w:
            print(f"error: --workers: {w} must be >= 1 and divide --batch-size", file=sys.stderr)
            return 2
    for name in ("epochs", "repeat", "threads_per_worker"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')}: must be >= 1", file=sys.stderr)
            return 2
    from bench.runner import write_results

    rows = []
    for w in args.workers:
        runs = [run_config(args, w) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: r["samples_per_s"])
        best["runs_samples_per_s"] = [r["samples_per_s"] for r in runs]
        rows.append(best)
    write_results(
        "training",
        rows,
        {
            "data": args.data,
            "epochs": args.epochs,
            "threads_per_worker": args.threads_per_worker,
            "note": "towers only (the ranker stage is small); same global batch for every row",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
