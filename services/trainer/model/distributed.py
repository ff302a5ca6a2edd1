"""torch.distributed set-up: one code path for one worker or many.

``torchrun`` (``python -m torch.distributed.run``) sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is a single
worker and no process group is created. Backend: NCCL when CUDA is present,
gloo otherwise (the CPU machines this project runs on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
