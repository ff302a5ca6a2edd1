"""The distributed-equivalence check: W gloo workers with batch B each must take
the same steps as one worker with batch W*B.

``parity_worker`` is a top-level function so ``torch.multiprocessing.spawn``
can start it; it trains the towers for a few steps on the synthetic data and
rank 0 saves the parameters for the caller to compare.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from services.trainer.model.config import ModelConfig
from services.trainer.model.distributed import DistContext, shutdown
from services.trainer.model.synthetic import synthetic_model_data
from services.trainer.model.train import RunOptions, train


def parity_config(global_batch: int, seed: int = 0) -> ModelConfig:
    return ModelConfig(
        dim=16, hidden=32, batch_size=global_batch, epochs=3, n_negatives=32,
        max_history=20, use_ranker=False, seed=seed,
    )  # fmt: skip


def run_steps(ctx: DistContext, global_batch: int, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    data = synthetic_model_data()
    result = train(
        data, parity_config(global_batch), ctx, RunOptions(stop_after_steps=steps, skip_ranker=True)
    )
    if ctx.is_main:
        torch.save(result.towers.state_dict(), out)


def parity_worker(
    rank: int, world: int, port: int, global_batch: int, steps: int, out: str
) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    finished = False
    try:
        run_steps(ctx, global_batch, steps, Path(out))
        finished = True
    finally:
        shutdown(ctx, finished=finished)
