"""Checkpoints: everything a run needs to continue bit for bit.

A checkpoint holds the model and optimizer state, the stage ("towers" or
"ranker"), and the position (epoch, step within it). Batches are a pure
function of (seed, epoch, step), so no sampler or RNG state is needed: a
resumed run replays exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state
