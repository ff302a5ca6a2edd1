from __future__ import annotations

import pytest
import torch

from services.trainer.model.dataset import ModelData
from services.trainer.model.distributed import DistContext
from services.trainer.model.synthetic import small_config, synthetic_model_data
from services.trainer.model.train import RunOptions, TrainResult, train


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data() -> ModelData:
    return synthetic_model_data()


@pytest.fixture(scope="session")
def tiny_trained(tiny_data: ModelData) -> TrainResult:
    """Towers + ranker on the synthetic data (shared: training is the slow part)."""
    torch.set_num_threads(1)
    return train(tiny_data, small_config(epochs=4), DistContext.single(), RunOptions())
