"""``coldstart train``: train the cold-start model (towers, then ranker), optionally
on several workers, and optionally publish it to a registry.

    coldstart train --data ml-100k [--workers 2] [--epochs 12] [--out .run/train/<name>]
                    [--resume] [--registry DIR [--tag T]] [--option key=value ...]

``--workers N`` (N > 1) re-launches this command under torchrun
(``python -m torch.distributed.run --standalone --nproc_per_node N``); each
worker then runs the same code as a single worker does, with DDP (gloo on CPU,
NCCL on CUDA). The run folder gets checkpoint.pt (``--resume`` continues from
it exactly), losses.json, loss_curve.png and model/ (what ``coldstart export
model`` reads). Bad input: one ``error:`` line naming the option, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

WORKER_ENV = "COLDSTART_TRAIN_WORKER"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="coldstart train", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ml-100k | ml-latest-small | synthetic | a folder")
    p.add_argument("--workers", type=int, default=1, help="processes (torchrun when > 1)")
    p.add_argument("--out", type=Path, help="run folder (default .run/train/<data>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--epochs", type=int, help="tower epochs")
    p.add_argument("--batch-size", type=int, help="global batch (split over the workers)")
    p.add_argument("--loss", choices=("softmax", "bpr"))
    p.add_argument("--no-ranker", action="store_true")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any ModelConfig field, e.g. temperature=0.05 (repeatable; JSON values)",
    )
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: every epoch)")
    p.add_argument("--max-steps", type=int, help="stop the towers after this many steps")
    p.add_argument(
        "--validation",
        choices=("last", "none"),
        default="last",
        help="hold out each user's latest positive to report validation metrics",
    )
    p.add_argument("--embedder", choices=("minilm", "hashing"), default="minilm")
    p.add_argument("--registry", type=Path, help="publish the trained model to this registry")
    p.add_argument("--tag", default="", help="suffix of the published version's name")
    p.add_argument("--cpu", action="store_true", help="never use CUDA (same as --device cpu)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA (NCCL) when present, else CPU (gloo); the PyTorchJob passes it",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_config(args: argparse.Namespace) -> Any:
    from services.trainer.model.config import ModelConfig

    options: dict[str, Any] = {}
    for raw in args.option:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {raw!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.epochs is not None:
        options["epochs"] = args.epochs
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.loss is not None:
        options["loss"] = args.loss
    if args.no_ranker:
        options["use_ranker"] = False
    try:
        cfg = ModelConfig().with_options(**options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--option: {exc}") from None
    experiments = cfg.harness_only()  # checked here, not after a whole run fails to export
    if experiments:
        names = ", ".join(experiments)
        raise UsageError(f"--option: {names}: harness experiments, they cannot be served")
    if cfg.batch_size % args.workers:
        raise UsageError(
            f"--batch-size: {cfg.batch_size} is not a multiple of --workers {args.workers}"
        )
    return cfg


def validate(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise UsageError("--workers: must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size: must be >= 1")
    if args.checkpoint_every < 0:
        raise UsageError("--checkpoint-every: must be >= 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError("--max-steps: must be >= 1")
    if args.threads < 0:
        raise UsageError("--threads: must be >= 0")
    if args.resume and args.out is None:
        raise UsageError("--resume: needs --out (the run folder to continue)")


def launch_torchrun(argv: list[str], workers: int, out: Path) -> int:
    """Re-run this command under torchrun with ``workers`` processes."""
    rest = list(argv)
    if "--out" not in rest:
        rest += ["--out", str(out)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={workers}",
        "-m",
        "services.trainer.model.train_cli",
        *rest,
    ]
    env = {**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env)


def _no_interactions() -> Any:
    import numpy as np

    from services.trainer.data.model import Interactions

    none = np.zeros(0, dtype=np.int64)
    return Interactions(none, none, none.astype(np.float32), none)


def _fingerprint(dataset: Any) -> dict[str, Any]:
    inter = dataset.interactions
    h = hashlib.sha256()
    for arr in (inter.user, inter.item, inter.timestamp):
        h.update(arr.tobytes())
    return {
        "dataset": dataset.name,
        "interactions": len(inter),
        "max_timestamp": int(inter.timestamp.max()) if len(inter) else None,
        "sha256": h.hexdigest()[:16],
    }


def load_worker_dataset(spec: str, ctx: Any) -> Any:
    """``--data`` as this worker reads it. A generic catalog folder whose interactions
    are a typed Parquet file (what the retraining export writes) is read sharded: each
    worker parses its range of the rows, a row group at a time, and the workers
    exchange them as compact row indices (one worker: its range is every row). The
    Dataset is the one a whole read gives, on every worker. Anything else is read whole
    by every worker. Memory freed by the parsing is handed back to the system, so that
    the training that follows does not start from the parse's high-water mark."""
    from services.trainer.data.errors import DataError
    from services.trainer.data.generic import Shard, load_generic
    from services.trainer.data.registry import NAMED, detect_format, load_dataset
    from services.trainer.model.distributed import gather_shard_rows

    folder = Path(spec)
    generic = False
    if spec not in NAMED and folder.is_dir():
        try:
            generic = detect_format(folder) == "generic"
        except DataError:
            generic = False
    if generic:
        dataset = load_generic(
            folder, shard=Shard(ctx.rank, ctx.world_size, gather_shard_rows(ctx))
        )
    else:
        dataset = load_dataset(spec)
    release_freed_memory()
    return dataset


def release_freed_memory() -> None:
    """Return what pyarrow's pool and the C heap hold free to the system (both keep
    freed memory for reuse; after a load that is hundreds of MB no later step needs)."""
    import contextlib
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_worker(args: argparse.Namespace, cfg: Any, out: Path) -> int:
    import numpy as np
    import torch

    from services.trainer.data.vectors import MINILM, cached_vectors, hashing_spec
    from services.trainer.model.bundle import MODEL_DIR, save_bundle
    from services.trainer.model.dataset import build_model_data, vocab_from_fields
    from services.trainer.model.distributed import init_distributed, shutdown
    from services.trainer.model.evaluate import holdout_last, validation_metrics
    from services.trainer.model.train import RunOptions, train

    threads = args.threads or max(1, min(2, (os.cpu_count() or 1) // max(1, args.workers)))
    torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    ctx = init_distributed(force_cpu=args.cpu or args.device == "cpu")
    finished = False  # a finished run's workers meet at a barrier before leaving the group
    try:
        dataset = load_worker_dataset(str(args.data), ctx)
        spec = MINILM if args.embedder == "minilm" else hashing_spec()
        vectors = cached_vectors(dataset.items.text, spec)
        pos = dataset.positive_mask()
        inter = dataset.interactions
        users, items, times = inter.user[pos], inter.item[pos], inter.timestamp[pos]
        data_info = _fingerprint(dataset)
        # Only the positives are needed from here on: the whole interaction arrays
        # would be a second copy of the largest thing every worker holds.
        del pos, inter
        dataset = dataclasses.replace(dataset, interactions=_no_interactions())
        held: dict[int, int] = {}
        if args.validation == "last":
            users, items, times, held = holdout_last(users, items, times)
        item_vocab = vocab_from_fields({n: c.vocab for n, c in dataset.items.categorical.items()})
        user_vocab = vocab_from_fields({n: c.vocab for n, c in dataset.users.categorical.items()})
        interest = None
        if dataset.users.has_text():
            from services.trainer.model.dataset import user_interest_vectors

            interest = user_interest_vectors(list(dataset.users.text), spec)
        data = build_model_data(
            content=vectors,
            item_vocab=item_vocab,
            item_attrs=item_vocab.from_blocks(
                dataset.n_items, {n: c.matrix for n, c in dataset.items.categorical.items()}
            ),
            user_vocab=user_vocab,
            user_attrs=user_vocab.from_blocks(
                dataset.n_users, {n: c.matrix for n, c in dataset.users.categorical.items()}
            ),
            pos_users=users,
            pos_items=items,
            pos_times=times,
            item_vec_dim=cfg.dim + 1,
            max_history=cfg.max_history,
            interest=interest,
        )
        training_positives = len(users)
        del users, items, times
        opts = RunOptions(
            run_dir=out,
            resume=args.resume,
            progress=not args.quiet,
            checkpoint_every=args.checkpoint_every,
            stop_after_steps=args.max_steps,
        )
        t0 = time.perf_counter()
        result = train(data, cfg, ctx, opts)
        seconds = time.perf_counter() - t0
        if not ctx.is_main:
            finished = True
            return 0
        metrics = validation_metrics(result, held) if held else {}
        offsets = Path(str(args.data)) / "offsets.json"
        if offsets.is_file():
            data_info["offsets"] = json.loads(offsets.read_text())
        meta = {
            "metrics": metrics,
            "data": {
                **data_info,
                "training_positives": training_positives,
                "positive_threshold": float(dataset.positive_threshold),
                "validation_users": len(held),
            },
            "training": {
                "workers": ctx.world_size,
                "backend": ctx.backend or "single",
                "device": str(ctx.device),
                "seconds": round(seconds, 2),
                "stage_seconds": result.seconds,
                "embedder": spec.name,
                "ranker_gate_check": result.gate,
            },
        }
        save_bundle(
            out / MODEL_DIR,
            result,
            [str(x) for x in dataset.items.ids.tolist()],
            [str(x) for x in dataset.users.ids.tolist()],
            meta,
            item_texts=[str(t) for t in dataset.items.text] if dataset.items.text else None,
        )
        print(
            f"trained in {seconds:.1f}s on {ctx.world_size} worker(s); "
            f"final tower loss {np.mean(result.losses['towers'][-20:]):.4f}; "
            f"validation {json.dumps(metrics)}; model in {out / MODEL_DIR}"
        )
        if args.registry is not None:
            from services.trainer.model.bundle import load_bundle
            from services.trainer.model.export import publish

            version, path = publish(load_bundle(out / MODEL_DIR), args.registry, tag=args.tag)
            print(f"published {version} -> {path}")
        finished = True
        return 0
    finally:
        shutdown(ctx, finished=finished)


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        cfg = parse_config(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from services.common.paths import run_dir

    name = f"{Path(str(args.data)).name}-{time.strftime('%Y%m%dT%H%M%S')}"
    out: Path = args.out or run_dir() / "train" / name
    if args.workers > 1 and os.environ.get(WORKER_ENV) != "1":
        return launch_torchrun(argv, args.workers, out)
    return run_worker(args, cfg, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
