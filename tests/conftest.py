"""Shared pytest fixtures.

`device`: where device-agnostic tests run. CPU by default; benchmarks/gpu_check.sh sets
MINIDETR_TEST_DEVICE=cuda on a GPU machine so the same assertions are checked there.
"""
import os

import pytest
import torch


@pytest.fixture
def device():
    name = os.environ.get("MINIDETR_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"MINIDETR_TEST_DEVICE={name}, but this torch sees no CUDA device")
    return torch.device(name)
