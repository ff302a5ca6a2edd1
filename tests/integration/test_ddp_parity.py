"""Two gloo workers with batch B each take exactly the steps one worker takes with 2B."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from services.trainer.model.distributed import DistContext
from services.trainer.model.parity import parity_worker, run_steps

pytestmark = pytest.mark.integration

STEPS = 4
LOCAL_BATCH = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_workers_match_one_worker_with_double_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    one = tmp_path / "one.pt"
    two = tmp_path / "two.pt"
    run_steps(DistContext.single(), 2 * LOCAL_BATCH, STEPS, one)
    # join=True re-raises a worker's exception here; the context reaps both processes.
    mp.spawn(
        parity_worker,
        args=(2, _free_port(), 2 * LOCAL_BATCH, STEPS, str(two)),
        nprocs=2,
        join=True,
    )
    single = torch.load(one)
    double = torch.load(two)
    assert single.keys() == double.keys()
    for name, value in single.items():
        torch.testing.assert_close(double[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Not a vacuous pass: id embeddings start at zero, so non-zero ones were trained.
    assert single["item.id_emb.weight"].abs().sum() > 0
