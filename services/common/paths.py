"""Where the project keeps what it makes: caches, run state and the registry.

Everything lives under the repository by default so that a clean clone is
self-contained; ``COLDSTART_HOME`` moves run state elsewhere (a volume on k8s).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_dir() -> Path:
    """Mutable state of running processes: broker data, snapshots, registry."""
    return Path(os.environ.get("COLDSTART_HOME", REPO_ROOT / ".run"))


def cache_dir() -> Path:
    """Reproducible downloads and derived files (Kafka jars, text vectors)."""
    return Path(os.environ.get("COLDSTART_CACHE", REPO_ROOT / ".cache"))


def shared_data_dir() -> Path:
    """The shared evaluation datasets (never committed; may be absent)."""
    return Path(os.environ.get("COLDSTART_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
