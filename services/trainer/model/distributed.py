"""torch.distributed set-up: one code path for one worker or many.

``torchrun`` (``python -m torch.distributed.run``) sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is a single
worker and no process group is created. Backend: NCCL when CUDA is present,
gloo otherwise (the CPU machines this project runs on).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from services.trainer.data.generic import ShardRows


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single worker, no process group

    @classmethod
    def single(cls) -> DistContext:
        """One CPU worker, no process group (the harness's in-process fit)."""
        return cls(0, 1, 0, torch.device("cpu"), None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group (torchrun), even of one: DDP and collectives are used."""
        return self.backend is not None


def init_distributed(force_cpu: bool = False) -> DistContext:
    """Join the process group torchrun describes (if any) and pick the device.

    Under torchrun a group is formed even for one worker (so a one-GPU run
    exercises NCCL); without torchrun's variables the run is plain single-process.
    """
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not force_cpu
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not launched:
        return DistContext(0, 1, 0, device, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, device, backend)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext, *, finished: bool = True) -> None:
    """Leave the process group.

    After a finished run every worker first meets at a barrier: a worker that
    tears gloo down while a peer is still inside the group (rank 0 saving the
    model) can abort the peer with "terminate called without an active
    exception" (seen in CI). After a failure there is no barrier, since the
    peers may never arrive; the launcher reaps them.
    """
    if ctx.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(ctx: DistContext, value: float) -> float:
    """Mean of a scalar over the workers (for logging the global loss)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def all_gather_array(ctx: DistContext, array: np.ndarray) -> list[np.ndarray]:
    """Every worker's 1-d ``array`` (lengths may differ), in rank order.

    Tensors, not pickled objects: a worker holds its own array, the W received ones
    and nothing else (all_gather_object would add a pickled copy of each)."""
    if not ctx.distributed:
        return [array]
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    sizes: list[int | None] = [None] * ctx.world_size
    dist.all_gather_object(sizes, len(array))
    longest = max(int(n) for n in sizes if n is not None)
    mine = torch.zeros(longest, dtype=torch.from_numpy(array[:0]).dtype, device=device)
    mine[: len(array)] = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    received = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(received, mine)
    del mine
    return [t[: int(n or 0)].cpu().numpy() for t, n in zip(received, sizes, strict=True)]


def gather_shard_rows(ctx: DistContext) -> Callable[[ShardRows], list[ShardRows]]:
    """The ``gather`` of a ``services.trainer.data.generic.Shard``: every worker's
    interaction rows (compact row indices) in rank order."""
    from services.trainer.data.generic import SHARD_FIELDS, ShardRows

    def gather(mine: ShardRows) -> list[ShardRows]:
        if not ctx.distributed:
            return [mine]
        meta: list[tuple[dict[str, int], tuple[str, int | None, str | None] | None] | None]
        meta = [None] * ctx.world_size
        dist.all_gather_object(meta, (mine.unknown, mine.error))
        arrays = {name: all_gather_array(ctx, getattr(mine, name)) for name in SHARD_FIELDS}
        out = []
        for r, entry in enumerate(meta):
            assert entry is not None
            out.append(
                ShardRows(
                    **{name: parts[r] for name, parts in arrays.items()},
                    unknown=entry[0],
                    error=entry[1],
                )
            )
        return out

    return gather
