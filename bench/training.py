"""Training benchmark: tower-training throughput with 1 and 2 gloo workers.

    coldstart bench training [--data ml-100k] [--workers 1 2] [--epochs 1] [--device cpu|cuda]
    coldstart bench training --memory [--events 200000 2000000] [--interactions 2000000]
                             [--workers 1 2]

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

``--memory`` measures what grows with the data instead (bench/results/training_memory.json):
the retraining export's seconds and peak RSS for a log of each ``--events`` size
(``export_seconds_and_rss``), and the peak RSS per training worker, with each of
``--workers``, on a synthetic catalog of about ``--interactions`` rows
(``train_rss``; the towers for a few steps: the plan of an epoch, the largest part, is
built in full). Each is one fresh process measured alone (``resource.RUSAGE_CHILDREN``
of a measuring parent), so the figures are peaks of that work and nothing else. The
functions are importable for ``coldstart bench scale``.
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

# Runs the command in its argv and prints its wall seconds and the peak RSS of the
# largest process under it (itself, torchrun, any worker) as JSON. A fresh parent per
# measurement: RUSAGE_CHILDREN is a maximum over every child a process ever reaped.
_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t0 = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "seconds = time.perf_counter() - t0\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print('MEASURED ' + json.dumps({'rc': rc, 'seconds': seconds, 'peak_rss_mb': peak}))\n"
)

# The export alone, in its own process: reads a log, writes the catalog folder.
_EXPORT = (
    "import sys\n"
    "from pathlib import Path\n"
    "from services.trainer.event_log import EventLog\n"
    "from services.trainer.training_set import build_training_set, empty_initial\n"
    "log = EventLog(Path(sys.argv[1]))\n"
    "with log.reader() as conn:\n"
    "    e = build_training_set(conn, empty_initial(), Path(sys.argv[2]), topic='events',\n"
    "                           holdout_fraction=0.1, holdout_max_events=5000)\n"
    "print('ROWS', e.training_rows, e.held_out_rows)\n"
)


def measured(command: list[str], *, cwd: Path = REPO, timeout_s: float = 1800.0) -> dict[str, Any]:
    """{"rc", "seconds", "peak_rss_mb", "output"} of ``python <command>`` run under a fresh
    measuring parent (niced: the machine is shared). The command runs in its own
    session and the whole group is killed on timeout."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        ["nice", "-n", "10", sys.executable, "-c", _MEASURE, sys.executable, *command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    line = next((x for x in output.splitlines() if x.startswith("MEASURED ")), None)
    if line is None:
        raise RuntimeError(f"no measurement (exit {proc.returncode}): {output[-2000:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("MEASURED "))
    result["output"] = output
    if result["rc"] != 0:
        raise RuntimeError(f"{command[:4]}... failed ({result['rc']}): {output[-2000:]}")
    return result


def write_log(path: Path, events: int, *, seed: int = 0) -> dict[str, int]:
    """A trainer event log of ``events`` events: item upserts, user registrations and
    interactions (views, likes and 1-5 ratings, popularity-skewed items, time mostly
    increasing), written the way the consumer writes them (``EventLog.apply_rows``)."""
    import numpy as np
    from coldstart.v1 import events_pb2

    from services.common.events import encode_event, new_event
    from services.trainer.event_log import EventLog

    rng = np.random.default_rng(seed)
    n_items = max(50, events // 200)
    n_users = max(20, events // 20)
    interactions = max(0, events - n_items - n_users)
    log = EventLog(path)
    offset = 0
    batch: list[Any] = []

    def flush() -> None:
        nonlocal batch
        if batch:
            log.apply_rows("events", batch, {0: offset})
            batch = []

    for k in range(n_items):
        e = new_event("bench", timestamp_ms=1000, item_upserted=events_pb2.ItemUpserted(
            item_id=f"i{k}", text=f"item {k}", attributes={"category": f"c{k % 20}"}))  # fmt: skip
        batch.append((e.event_id, 0, offset, 1000, None, f"i{k}", None, None, "item_upserted",
                      encode_event(e)))  # fmt: skip
        offset += 1
    for k in range(n_users):
        e = new_event("bench", timestamp_ms=1000, user_registered=events_pb2.UserRegistered(
            user_id=f"u{k}", attributes={"region": f"r{k % 5}"}))  # fmt: skip
        batch.append((e.event_id, 0, offset, 1000, f"u{k}", None, None, None, "user_registered",
                      encode_event(e)))  # fmt: skip
        offset += 1
    flush()
    popularity = rng.zipf(1.3, size=n_items).astype(np.float64)
    p = popularity / popularity.sum()
    chunk = 50_000
    actions = np.array(["view", "like", "rating"])
    for start in range(0, interactions, chunk):
        n = min(chunk, interactions - start)
        users = rng.integers(0, n_users, size=n)
        items = rng.choice(n_items, size=n, p=p)
        kinds = actions[rng.integers(0, 3, size=n)]
        values = rng.integers(1, 6, size=n).astype(np.float64)
        # Mostly in order, some late arrivals (the export sorts by time, not log order).
        ts = 1_600_000_000_000 + (start + np.arange(n)) * 1000 - rng.integers(0, 5, size=n) * 1000
        ids = rng.bytes(16 * n).hex()
        batch = [
            (ids[32 * j : 32 * j + 32], 0, offset + j, int(ts[j]), f"u{users[j]}",
             f"i{items[j]}", str(kinds[j]), float(values[j]))
            for j in range(n)
        ]  # fmt: skip
        offset += n
        flush()
    log.close()
    return {"events": offset, "items": n_items, "users": n_users, "interactions": interactions}


def export_seconds_and_rss(
    events: int, *, seed: int = 0, workdir: Path | None = None, repo: Path = REPO
) -> dict[str, Any]:
    """Seconds and peak RSS of the retraining export (``build_training_set``, the log
    only) of a synthetic log of ``events`` events, in a process of its own. Writing the
    log is not measured. ``repo``: the checkout whose export runs (to compare with an
    older one). Bounded by the log's size on disk (about 100 bytes an event) twice."""
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=workdir) as tmp:
        log = Path(tmp) / "log.sqlite"
        sizes = write_log(log, events, seed=seed)
        run = measured(["-c", _EXPORT, str(log), str(Path(tmp) / "data")], cwd=repo)
    rows = next(x for x in run["output"].splitlines() if x.startswith("ROWS ")).split()[1:]
    return {
        "what": "export",
        **sizes,
        "training_rows": int(rows[0]),
        "held_out_rows": int(rows[1]),
        "seconds": round(run["seconds"], 2),
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
    }


def write_catalog(folder: Path, interactions: int, *, seed: int = 0) -> dict[str, int]:
    """A synthetic generic catalog of about ``interactions`` rows (the synthetic
    dataset, ~30 per user, 1 item per 200 rows), written as the retraining export
    writes its folder."""
    from services.trainer.data.synthetic import generate
    from services.trainer.event_log import EventLog
    from services.trainer.training_set import build_training_set, initial_from_dataset

    n_users = max(50, interactions // 33)
    n_items = max(100, interactions // 200)
    dataset = generate(n_users=n_users, n_items=n_items, mean_interactions=28.0, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    with EventLog(folder.parent / f"{folder.name}.log.sqlite").reader() as conn:
        out = build_training_set(conn, initial_from_dataset(dataset), folder, topic="events",
                                 holdout_fraction=0.0, holdout_max_events=0)  # fmt: skip
    return {"users": n_users, "items": n_items, "interactions": out.training_rows}


def train_rss(
    workers: int, *, data: Path, steps: int = 5, repo: Path = REPO, timeout_s: float = 1800.0
) -> dict[str, Any]:
    """Peak RSS of the largest training worker (``coldstart train --workers N``, gloo
    on CPU, towers only, hashing text vectors) on the catalog folder ``data``, for
    ``steps`` tower steps: the data is read and the epoch planned in full, so the peak
    is that of a whole run's towers stage. ``repo``: the checkout that trains."""
    with tempfile.TemporaryDirectory(prefix="bench-train-rss-") as tmp:
        run = measured(
            [
                "-m", "services.cli", "train", "--workers", str(workers), "--data", str(data),
                "--out", str(Path(tmp) / "run"), "--no-ranker", "--embedder", "hashing",
                "--epochs", "1", "--max-steps", str(steps), "--quiet", "--cpu",
            ],
            cwd=repo,
            timeout_s=timeout_s,
        )  # fmt: skip
    return {
        "what": "train",
        "workers": workers,
        "seconds": round(run["seconds"], 1),
        "peak_rss_mb_per_worker": round(run["peak_rss_mb"], 1),
    }


def memory(args: argparse.Namespace) -> int:
    from bench.runner import write_results

    rows: list[dict[str, Any]] = []
    for events in args.events:
        rows.append(export_seconds_and_rss(events))
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp:
        sizes = write_catalog(Path(tmp) / "catalog", args.interactions)
        for w in args.workers:
            rows.append({**train_rss(w, data=Path(tmp) / "catalog"), **sizes})
            print(rows[-1], flush=True)
    one = next((r for r in rows if r.get("workers") == 1), None)
    for r in rows:
        if one is not None and r.get("what") == "train":
            r["vs_1_worker"] = round(r["peak_rss_mb_per_worker"] / one["peak_rss_mb_per_worker"], 3)
    write_results("training_memory", rows, {"note": "peak RSS of one fresh process per row"})
    return 0


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
    p.add_argument("--memory", action="store_true", help="export and training peak memory")
    p.add_argument("--events", type=int, nargs="+", default=[200_000, 2_000_000])
    p.add_argument("--interactions", type=int, default=2_000_000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-dir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    if args.memory:
        return memory(args)
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
