"""`coldstart train` on an exported catalog: two gloo workers, each parsing half of
the interaction rows (services/trainer/data/generic.py, sharded reads), train the same
towers as one worker and record the same data fingerprint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.trainer.data.synthetic import generate
from services.trainer.event_log import EventLog
from services.trainer.training_set import build_training_set, initial_from_dataset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _train(data: Path, workers: int, out: Path) -> dict[str, torch.Tensor]:
    command = [
        sys.executable, "-m", "services.cli", "train", "--workers", str(workers),
        "--data", str(data), "--out", str(out), "--no-ranker", "--embedder", "hashing",
        "--epochs", "1", "--max-steps", "3", "--batch-size", "64", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own session, so that the launcher, torchrun and the workers go together.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    state = torch.load(out / "model" / "model.pt", weights_only=False)
    return {k: v for k, v in state["towers"].items() if torch.is_tensor(v)}


def test_two_workers_reading_half_the_rows_each_train_the_one_worker_model(
    tmp_path: Path,
) -> None:
    initial = initial_from_dataset(generate(n_users=300, n_items=200, mean_interactions=20))
    with EventLog(tmp_path / "log.sqlite").reader() as conn:
        build_training_set(conn, initial, tmp_path / "data", topic="t",
                           holdout_fraction=0.0, holdout_max_events=0)  # fmt: skip
    one = _train(tmp_path / "data", 1, tmp_path / "one")
    two = _train(tmp_path / "data", 2, tmp_path / "two")
    assert one.keys() == two.keys()
    # The same data, exactly: the fingerprint hashes every interaction's user, item, time.
    meta = [json.loads((tmp_path / r / "model" / "meta.json").read_text()) for r in ("one", "two")]
    assert meta[0]["data"] == meta[1]["data"]
    for name, value in one.items():
        # Adam divides by the root of tiny second moments on id rows seen once or twice,
        # so the all-reduce's rounding (1e-9) can move such an entry by ~lr; the dense
        # weights agree to rounding.
        atol = 1e-4 if name.endswith("id_emb.weight") else 1e-6
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=atol, msg=name)
    assert meta[1]["training"]["workers"] == 2


def test_the_export_measurement_bench_scale_calls(tmp_path: Path) -> None:
    from bench.training import export_seconds_and_rss

    row = export_seconds_and_rss(3000, workdir=tmp_path)
    assert row["events"] == 3000
    assert row["training_rows"] + row["held_out_rows"] == row["interactions"]
    assert row["seconds"] > 0 and row["peak_rss_mb"] > 10
