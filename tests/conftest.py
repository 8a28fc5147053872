import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATASETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets")


@pytest.fixture
def shakespeare_path() -> str:
    path = os.path.abspath(os.path.join(SHARED_DATASETS, "tinyshakespeare", "input.txt"))
    if not os.path.exists(path):
        pytest.skip("../shared/datasets/tinyshakespeare not present")
    return path
